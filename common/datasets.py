"""MovieLens readers that detect the format by content, not by file name.

Ratings:
- ml-latest-small / ml-25m / ml-20m ``ratings.csv``: header ``userId,movieId,rating,timestamp``,
  comma-separated, CRLF tolerated;
- ml-100k ``u.data``: ``user<TAB>item<TAB>rating<TAB>timestamp``, no header;
- ml-1m / ml-10m ``ratings.dat``: ``user::item::rating::timestamp``;
each optionally gzip-compressed (detected by its magic bytes).

Catalogues: ``movies.csv`` (``movieId,title,genres`` with ``|``-separated genres, UTF-8),
ml-100k ``u.item`` (``|``-separated with 19 genre flags, latin-1), ml-1m ``movies.dat``
(``id::title::genres``, latin-1).

A bad row is reported as ``file:line: reason`` and skipped, or raises
:class:`~common.errors.DatasetError` when ``strict=True``.
"""

from __future__ import annotations

import csv
import gzip
import io
import logging
import math
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import NamedTuple

from common.errors import DatasetError
from common.schema import MAX_ID_LENGTH, RatingScale

log = logging.getLogger(__name__)

ML100K_GENRES = (
    "unknown", "Action", "Adventure", "Animation", "Children's", "Comedy", "Crime",
    "Documentary", "Drama", "Fantasy", "Film-Noir", "Horror", "Musical", "Mystery",
    "Romance", "Sci-Fi", "Thriller", "War", "Western",
)
NO_GENRES = "(no genres listed)"
MOVIE_FILE_NAMES = ("movies.csv", "movies.csv.gz", "u.item", "u.item.gz", "movies.dat", "movies.dat.gz")


class RatingRow(NamedTuple):
    user: str
    item: str
    rating: float
    timestamp: int


class Movie(NamedTuple):
    item: str
    title: str
    genres: tuple[str, ...]


@dataclass
class ReadReport:
    """What a read produced: rows kept, and every bad row as ``file:line: reason``."""

    path: str
    format: str = ""
    rows: int = 0
    bad: list[str] = field(default_factory=list)


def _open_text(path: Path, encoding: str) -> io.TextIOBase:
    raw = path.open("rb")
    head = raw.peek(2)[:2] if hasattr(raw, "peek") else b""
    if head == b"\x1f\x8b":
        return io.TextIOWrapper(gzip.GzipFile(fileobj=raw), encoding=encoding, newline="")
    return io.TextIOWrapper(raw, encoding=encoding, newline="")


def _first_line(path: Path, encoding: str = "latin-1") -> str:
    with _open_text(path, encoding) as fh:
        for line in fh:
            if line.strip():
                return line.rstrip("\r\n")
    return ""


def detect_ratings_format(path: str | Path) -> str:
    """``csv`` (with header), ``dat`` (``::``), ``tab`` (u.data) or ``csv-noheader``."""
    line = _first_line(Path(path))
    if not line:
        raise DatasetError(f"{path}: empty file")
    if "::" in line:
        return "dat"
    if "\t" in line:
        return "tab"
    if "," in line:
        first = line.split(",")[0].strip().strip('"').lower()
        return "csv" if not _is_number(first) else "csv-noheader"
    raise DatasetError(f"{path}:1: not a MovieLens ratings file (no ',', '::' or tab separator)")


def _is_number(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return True


def _parse_rating_fields(
    parts: list[str], scale: RatingScale
) -> tuple[RatingRow | None, str]:
    if len(parts) < 3:
        return None, f"expected user, item, rating[, timestamp], got {len(parts)} field(s)"
    user, item, rating_text = parts[0].strip(), parts[1].strip(), parts[2].strip()
    if not user:
        return None, "user: empty id"
    if not item:
        return None, "item: empty id"
    if len(user) > MAX_ID_LENGTH or len(item) > MAX_ID_LENGTH:
        return None, f"id longer than {MAX_ID_LENGTH} characters"
    try:
        rating = float(rating_text)
    except ValueError:
        return None, f"rating: {rating_text!r} is not a number"
    if not math.isfinite(rating):
        return None, f"rating: {rating_text!r} is not finite"
    if not scale.min <= rating <= scale.max:
        return None, f"rating: {rating} is outside {scale.min}..{scale.max}"
    timestamp = 0
    if len(parts) > 3 and parts[3].strip():
        try:
            timestamp = int(float(parts[3]))
        except ValueError:
            return None, f"timestamp: {parts[3].strip()!r} is not a number"
        if timestamp < 0:
            return None, "timestamp: negative"
    return RatingRow(user, item, rating, timestamp), ""


def iter_ratings(
    path: str | Path,
    strict: bool = False,
    scale: RatingScale | None = None,
    report: ReadReport | None = None,
) -> Iterator[RatingRow]:
    """Yield valid ratings from any supported format; bad rows are reported (or fatal)."""
    path = Path(path)
    if not path.exists():
        raise DatasetError(f"{path}: no such file")
    scale = scale or RatingScale()
    fmt = detect_ratings_format(path)
    report = report if report is not None else ReadReport(str(path))
    report.format = fmt
    sep = {"dat": "::", "tab": "\t"}.get(fmt, ",")
    with _open_text(path, "utf-8" if fmt.startswith("csv") else "latin-1") as fh:
        for lineno, line in enumerate(fh, start=1):
            line = line.rstrip("\r\n")
            if not line.strip() or (lineno == 1 and fmt == "csv"):
                continue
            row, reason = _parse_rating_fields(line.split(sep), scale)
            if row is None:
                where = f"{path}:{lineno}: {reason}"
                if strict:
                    raise DatasetError(where)
                report.bad.append(where)
                if len(report.bad) <= 10:
                    log.warning("skipping bad row %s", where)
                continue
            report.rows += 1
            yield row
    if len(report.bad) > 10:
        log.warning("%s: skipped %d bad rows in all", path, len(report.bad))


def read_ratings(
    path: str | Path,
    strict: bool = False,
    scale: RatingScale | None = None,
    report: ReadReport | None = None,
) -> list[RatingRow]:
    """All valid ratings of a file, in file order."""
    return list(iter_ratings(path, strict=strict, scale=scale, report=report))


def detect_movies_format(path: str | Path) -> str:
    line = _first_line(Path(path))
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
        with _open_text(path, "utf-8") as fh:
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
    with _open_text(path, "latin-1") as fh:
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
