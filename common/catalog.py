"""Movie catalogue readers (MovieLens ``movies.csv``, ml-100k ``u.item``, ml-1m ``movies.dat``).

``movies.csv``: ``movieId,title,genres`` with ``|``-separated genres, UTF-8; ml-100k
``u.item``: ``|``-separated with 19 genre flags, latin-1; ml-1m ``movies.dat``:
``id::title::genres``, latin-1. Files may be gzip-compressed. A bad row is reported as
``file:line: reason`` and skipped, or raises :class:`~common.errors.DatasetError` when
``strict=True`` (as :mod:`common.datasets` does for ratings).
"""

from __future__ import annotations

import csv
import logging
from collections.abc import Iterator
from pathlib import Path
from typing import NamedTuple

from common.datasets import ReadReport, first_line, open_text
from common.errors import DatasetError

log = logging.getLogger(__name__)

ML100K_GENRES = (
    "unknown", "Action", "Adventure", "Animation", "Children's", "Comedy", "Crime",
    "Documentary", "Drama", "Fantasy", "Film-Noir", "Horror", "Musical", "Mystery",
    "Romance", "Sci-Fi", "Thriller", "War", "Western",
)
NO_GENRES = "(no genres listed)"
MOVIE_FILE_NAMES = ("movies.csv", "movies.csv.gz", "u.item", "u.item.gz", "movies.dat", "movies.dat.gz")


class Movie(NamedTuple):
    item: str
    title: str
    genres: tuple[str, ...]


def detect_movies_format(path: str | Path) -> str:
    line = first_line(Path(path))
    if "::" in line:
        return "dat"
    if line.count("|") >= 5:
        return "item"
    if line.lower().startswith("movieid") or "," in line:
        return "csv"
    raise DatasetError(f"{path}:1: not a MovieLens movies file")


def iter_movies(
    path: str | Path, strict: bool = False, report: ReadReport | None = None
) -> Iterator[Movie]:
    path = Path(path)
    if not path.exists():
        raise DatasetError(f"{path}: no such file")
    fmt = detect_movies_format(path)
    report = report if report is not None else ReadReport(str(path))
    report.format = fmt

    def bad(lineno: int, reason: str) -> None:
        where = f"{path}:{lineno}: {reason}"
        if strict:
            raise DatasetError(where)
        report.bad.append(where)
        log.warning("skipping bad row %s", where)

    if fmt == "csv":
        with open_text(path, "utf-8") as fh:
            reader = csv.reader(fh)
            for lineno, parts in enumerate(reader, start=1):
                if lineno == 1 and parts and parts[0].strip().lower() == "movieid":
                    continue
                if not parts:
                    continue
                if len(parts) < 2 or not parts[0].strip():
                    bad(reader.line_num, "expected movieId,title,genres")
                    continue
                genres = parts[2].strip() if len(parts) > 2 else ""
                report.rows += 1
                yield Movie(parts[0].strip(), parts[1].strip(), _split_genres(genres))
        return
    with open_text(path, "latin-1") as fh:
        for lineno, line in enumerate(fh, start=1):
            line = line.rstrip("\r\n")
            if not line.strip():
                continue
            if fmt == "dat":
                parts = line.split("::")
                if len(parts) < 2 or not parts[0].strip():
                    bad(lineno, "expected id::title::genres")
                    continue
                report.rows += 1
                yield Movie(parts[0].strip(), parts[1].strip(),
                            _split_genres(parts[2] if len(parts) > 2 else ""))
            else:
                parts = line.split("|")
                if len(parts) < 5 or not parts[0].strip():
                    bad(lineno, "expected id|title|release date|...|genre flags")
                    continue
                flags = parts[-len(ML100K_GENRES):] if len(parts) >= 5 + len(ML100K_GENRES) else []
                flagged = tuple(g for g, f in zip(ML100K_GENRES, flags) if f.strip() == "1")
                report.rows += 1
                yield Movie(parts[0].strip(), parts[1].strip(), flagged)


def _split_genres(text: str) -> tuple[str, ...]:
    text = text.strip()
    if not text or text == NO_GENRES:
        return ()
    return tuple(g.strip() for g in text.split("|") if g.strip())


def read_movies(path: str | Path, strict: bool = False) -> list[Movie]:
    return list(iter_movies(path, strict=strict))


def find_movies_file(ratings_path: str | Path) -> Path | None:
    """The catalogue that ships beside a ratings file, if any."""
    folder = Path(ratings_path).parent
    for name in MOVIE_FILE_NAMES:
        candidate = folder / name
        if candidate.exists():
            return candidate
    return None
