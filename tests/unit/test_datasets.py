import gzip
from pathlib import Path

import pytest

from common.datasets import (
    ReadReport,
    detect_ratings_format,
    find_movies_file,
    read_movies,
    read_ratings,
)
from common.errors import DatasetError
from common.synthetic import generate, write_movielens


def test_ml_latest_small(ml_small: Path):
    report = ReadReport("")
    rows = read_ratings(ml_small / "ratings.csv", report=report)
    assert report.format == "csv" and report.bad == []
    assert len(rows) == 100_836
    assert len({r.user for r in rows}) == 610
    assert len({r.item for r in rows}) == 9_724
    assert rows[0].user == "1" and rows[0].item == "1" and rows[0].rating == 4.0
    assert all(0.5 <= r.rating <= 5.0 for r in rows)
    movies = read_movies(ml_small / "movies.csv")
    assert len(movies) == 9_742
    toy = movies[0]
    assert toy.title == "Toy Story (1995)" and "Animation" in toy.genres
    assert find_movies_file(ml_small / "ratings.csv") == ml_small / "movies.csv"


def _write(path: Path, text: str, gz: bool = False, encoding: str = "utf-8") -> Path:
    data = text.encode(encoding)
    path.write_bytes(gzip.compress(data) if gz else data)
    return path


@pytest.mark.parametrize("gz", [False, True])
@pytest.mark.parametrize(
    ("name", "fmt", "text"),
    [
        ("ratings.csv", "csv", "userId,movieId,rating,timestamp\r\n1,31,2.5,1260759144\r\n1,1029,3.0,1260759179\r\n"),
        ("u.data", "tab", "196\t242\t3\t881250949\n186\t302\t3\t891717742\n"),
        ("ratings.dat", "dat", "1::1193::5::978300760\n1::661::3::978302109\n"),
    ],
)
def test_every_format_detected_by_content(tmp_path, name, fmt, text, gz):
    # Misleading file names: detection must look at content, not the name.
    path = _write(tmp_path / ("data.bin" + (".gz" if gz else "")), text, gz)
    assert detect_ratings_format(path) == fmt
    rows = read_ratings(path)
    assert len(rows) == 2
    assert all(isinstance(r.user, str) and isinstance(r.item, str) for r in rows)
    assert rows[0].timestamp > 800_000_000


def test_bad_rows_reported_with_file_and_line(tmp_path):
    path = _write(
        tmp_path / "r.csv",
        "userId,movieId,rating,timestamp\n1,2,4.0,10\n1,3,abc,11\n,4,3.0,12\n1,5,9.0,13\n1,6\n1,7,nan,14\n2,8,3.5,15\n",
    )
    report = ReadReport("")
    rows = read_ratings(path, report=report)
    assert [r.item for r in rows] == ["2", "8"]
    assert report.bad == [
        f"{path}:3: rating: 'abc' is not a number",
        f"{path}:4: user: empty id",
        f"{path}:5: rating: 9.0 is outside 0.5..5.0",
        f"{path}:6: expected user, item, rating[, timestamp], got 2 field(s)",
        f"{path}:7: rating: 'nan' is not finite",
    ]
    with pytest.raises(DatasetError, match=r"r\.csv:3: rating: 'abc' is not a number"):
        read_ratings(path, strict=True)


def test_unknown_format_and_missing_file(tmp_path):
    with pytest.raises(DatasetError, match="no such file"):
        read_ratings(tmp_path / "nope.csv")
    with pytest.raises(DatasetError, match="not a MovieLens ratings file"):
        read_ratings(_write(tmp_path / "x.txt", "hello world\n"))


def test_movie_catalogues(tmp_path):
    csv_path = _write(tmp_path / "movies.csv",
                      'movieId,title,genres\r\n1,Toy Story (1995),Adventure|Animation\r\n'
                      '2,"American President, The (1995)",Comedy|Drama|Romance\r\n'
                      "3,Nothing (2000),(no genres listed)\r\n")
    movies = read_movies(csv_path)
    assert movies[1].title == "American President, The (1995)"
    assert movies[1].genres == ("Comedy", "Drama", "Romance") and movies[2].genres == ()
    flags = "|".join(["0", "0", "0", "1", "1", "1"] + ["0"] * 13)
    item = _write(tmp_path / "u.item", f"1|Toy Story (1995)|01-Jan-1995||http://x|{flags}\n"
                  f"2|Caf\xe9 (1996)|01-Jan-1996||http://y|{flags}\n", encoding="latin-1")
    movies = read_movies(item)
    assert movies[0].genres == ("Animation", "Children's", "Comedy")
    assert movies[1].title == "Caf\xe9 (1996)"
    dat = _write(tmp_path / "movies.dat", "1::Toy Story (1995)::Animation|Children's|Comedy\n"
                 "2::Jumanji (1995)::Adventure\n", gz=True, encoding="latin-1")
    assert read_movies(dat)[1] == ("2", "Jumanji (1995)", ("Adventure",))


def test_synthetic_data_is_movielens_shaped(tmp_path):
    rows, movies, planted = generate(200, 500, 8000, rank=4, seed=3, return_model=True)
    assert len(rows) == 8000 and len(movies) == 500
    assert len({(r.user, r.item) for r in rows}) == 8000
    assert all(r.rating * 2 == int(r.rating * 2) and 0.5 <= r.rating <= 5.0 for r in rows)
    ts = [r.timestamp for r in rows]
    assert ts == sorted(ts)
    # Popularity skew: the most rated decile of items holds far more than a tenth.
    from collections import Counter
    counts = sorted(Counter(r.item for r in rows).values(), reverse=True)
    assert sum(counts[: len(counts) // 10]) > 0.3 * len(rows)
    assert planted.user_factors.shape == (200, 4)
    # Same seed, same data; the CSV writer round-trips through the reader.
    assert generate(200, 500, 8000, rank=4, seed=3)[0] == rows
    r_path, m_path = write_movielens(tmp_path, rows, movies)
    assert read_ratings(r_path) == rows
    assert read_movies(m_path) == movies
