import gzip
from pathlib import Path

import pytest

from common.catalog import find_movies_file, read_movies
from common.datasets import (
    EventRow,
    RatingRow,
    RatingScaleError,
    ReadReport,
    check_scale,
    detect_ratings_format,
    read_events,
    read_ratings,
)
from common.errors import DatasetError
from common.schema import Event, RatingScale
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
    # One off-scale rating in six is a wrong scale (tested below); here only the reasons.
    rows = read_ratings(path, report=report, off_scale_limit=None)
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
    with pytest.raises(RatingScaleError, match=r"1 of 3 ratings"):
        read_ratings(path)


def test_unknown_format_and_missing_file(tmp_path):
    with pytest.raises(DatasetError, match="no such file"):
        read_ratings(tmp_path / "nope.csv")
    with pytest.raises(DatasetError, match=r"x\.txt:1: not a ratings or events file"):
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


LASTFM = "userID\tartistID\tweight\r\n2\t51\t13883\r\n2\t52\t11690\r\n3\t0051\t0\r\n"


@pytest.mark.parametrize("gz", [False, True])
def test_lastfm_user_artists_is_an_implicit_file(tmp_path, gz):
    path = _write(tmp_path / ("user_artists.bin" + (".gz" if gz else "")), LASTFM, gz)
    assert detect_ratings_format(path) == "implicit-tab"
    report = ReadReport("")
    rows = read_events(path, report=report)
    assert report.implicit and report.bad == [] and report.header == "userID\tartistID\tweight"
    assert rows == [EventRow("2", "51", 13883.0, 0, "play"), EventRow("2", "52", 11690.0, 0, "play"),
                    EventRow("3", "0051", 0.0, 0, "play")]
    # A weight of 0 is "seen, not a positive": kept. Rows become schema Events as they are.
    event = rows[0].to_event()
    assert isinstance(event, Event) and not event.is_rating
    assert (event.user, event.item, event.type, event.weight) == ("2", "51", "play", 13883.0)
    assert rows[2].to_message() == {"user": "3", "item": "0051", "type": "play", "weight": 0.0,
                                    "timestamp": 0}
    # Weights are no ratings: the ratings reader refuses the file and says what it is.
    with pytest.raises(DatasetError, match=r"implicit-feedback file.*read_events"):
        read_ratings(path)


def test_implicit_csv_with_string_ids_and_timestamps(tmp_path):
    uid = "0f8fad5b-d9cb-469f-a165-70867728950e"
    path = _write(tmp_path / "events.csv",
                  f"user,item,clicks,timestamp\n{uid},00042,3,1700000000\n007,abc-1,1.5,1700000001\n")
    assert detect_ratings_format(path) == "implicit-csv"
    rows = read_events(path, event_type="click")
    assert rows == [EventRow(uid, "00042", 3.0, 1700000000, "click"),
                    EventRow("007", "abc-1", 1.5, 1700000001, "click")]
    assert rows[1].to_event().item == "abc-1"


def test_bad_weights_reported_with_file_and_line(tmp_path):
    path = _write(tmp_path / "plays.tsv",
                  "user\titem\tweight\n1\t2\t5\n1\t3\t-1\n1\t4\tnan\n1\t5\tlots\n"
                  "1\t6\t2000000\n1\t7\n1\t8\t1\n")
    report = ReadReport("")
    rows = read_events(path, report=report)
    assert [r.item for r in rows] == ["2", "8"]
    assert report.bad == [
        f"{path}:3: weight: -1 is negative",
        f"{path}:4: weight: 'nan' is not finite",
        f"{path}:5: weight: 'lots' is not a number",
        f"{path}:6: weight: 2000000 is above the cap 1e+06 (EVENT_MAX_WEIGHT)",
        f"{path}:7: expected user, item, weight[, timestamp], got 2 field(s)",
    ]
    assert len(read_events(path, max_weight=5e6)) == 3
    with pytest.raises(DatasetError, match=r"plays\.tsv:3: weight: -1 is negative"):
        read_events(path, strict=True)


def test_rating_files_read_as_events_and_headers_decide_the_kind(tmp_path):
    # A tab file with a rating header is a ratings file; a headerless file with UUIDs too
    # (its third field is a number, so its first line is data).
    tab = _write(tmp_path / "a", "user\titem\trating\ttimestamp\nu1\ti1\t4.5\t10\n")
    assert detect_ratings_format(tab) == "tab-header"
    assert read_ratings(tab) == [RatingRow("u1", "i1", 4.5, 10)]
    uid = "9b2c1e0a-0000-4000-8000-000000000001"
    bare = _write(tmp_path / "b", f"{uid},0001,3.5,7\n{uid},0002,2,8\n")
    assert detect_ratings_format(bare) == "csv-noheader"
    events = read_events(bare)
    assert events[0] == EventRow(uid, "0001", 3.5, 7, "rating") and events[0].is_rating
    assert tuple(events[0])[:4] == tuple(read_ratings(bare)[0])
    assert events[1].to_event().rating == 2.0


def _zero_to_ten(n: int = 300) -> str:
    lines = ["userId,movieId,rating,timestamp"]
    lines += [f"{u % 17},{u},{u % 11},{1000 + u}" for u in range(n)]  # ratings 0..10
    return "\n".join(lines) + "\n"


def test_a_file_on_another_scale_is_an_error_naming_the_range_and_the_settings(tmp_path):
    path = _write(tmp_path / "ten.csv", _zero_to_ten())
    # Default scale 0.5..5: 0 and 6..10 are off it - far more than 1 %.
    with pytest.raises(RatingScaleError) as exc:
        read_ratings(path)
    msg = str(exc.value)
    assert str(path) in msg and "outside the configured rating scale 0.5..5" in msg
    assert "span 0..10" in msg and "RATING_MIN=0 RATING_MAX=10" in msg and "--rating-max 10" in msg
    with pytest.raises(RatingScaleError):
        read_events(path)
    with pytest.raises(RatingScaleError, match=r"span 0\.\.10"):
        check_scale(path)
    # On the right scale every rating is kept.
    rows = read_ratings(path, scale=RatingScale(min=0, max=10))
    assert len(rows) == 300 and max(r.rating for r in rows) == 10
    assert check_scale(path, RatingScale(min=0, max=10)).rows == 300


def test_a_few_off_scale_ratings_are_bad_rows_not_a_scale_error(tmp_path):
    body = [f"1,{i},{1 + i % 5},{i}" for i in range(400)]
    body[100] = "1,100,7.0,100"  # 1 of 400 = 0.25 %: a typo, reported and skipped
    path = _write(tmp_path / "r.csv", "userId,movieId,rating,timestamp\n" + "\n".join(body) + "\n")
    report = ReadReport("")
    rows = read_ratings(path, report=report)
    assert len(rows) == 399 and report.off_scale == 1
    assert report.bad == [f"{path}:102: rating: 7.0 is outside 0.5..5.0"]
    # check_scale on a prefix: the first 50 rows hold no off-scale rating.
    assert check_scale(path, max_rows=50).rows == 50


def test_implicit_files_have_no_scale(tmp_path):
    path = _write(tmp_path / "p.csv", "user,item,weight\n" + "".join(f"u,{i},{i * 100}\n" for i in range(50)))
    assert check_scale(path).implicit
    assert max(r.value for r in read_events(path)) == 4900
