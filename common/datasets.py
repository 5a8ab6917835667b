"""Dataset readers (ratings, implicit events) that detect the format by content.

Ratings (explicit feedback):
- ml-latest-small / ml-25m / ml-20m ``ratings.csv``: header ``userId,movieId,rating,timestamp``,
  comma-separated, CRLF tolerated (a tab-separated file with such a header reads too);
- ml-100k ``u.data``: ``user<TAB>item<TAB>rating<TAB>timestamp``, no header;
- ml-1m / ml-10m ``ratings.dat``: ``user::item::rating::timestamp``;
- headerless ``user,item,rating[,timestamp]``.

Implicit events: a delimited file WITH a header, ``user<TAB or ,>item<TAB or ,>weight[,timestamp]``
whose third column is not named ``rating...`` (the Last.fm hetrec2011 ``user_artists.dat``,
``userID<TAB>artistID<TAB>weight``, is one example). Each row is an implicit event of type
``play`` (``event_type=`` to name it otherwise) whose weight is a finite number in
[0, max_weight], as :class:`common.schema.Event` wants it.

Every file may be gzip-compressed (detected by its magic bytes). Ids are kept as the file spells
them (UUIDs, leading zeros), only surrounding whitespace is removed.

Catalogues (``movies.csv``, ``u.item``, ``movies.dat``) are read by :mod:`common.catalog`.

A bad row is reported as ``file:line: reason`` and skipped, or raises
:class:`~common.errors.DatasetError` when ``strict=True``.

Scale check: a rating off the configured scale is a bad row, but when more than
``off_scale_limit`` (1 %) of a file's ratings are off it, the file was written on another scale
(0–10, 1–10): the read fails with a :class:`RatingScaleError` naming the observed range and the
settings to change (``RATING_MIN``/``RATING_MAX``, or the commands' ``--rating-min``/``--rating-max``)
instead of silently dropping every rating above 5.
"""

from __future__ import annotations

import gzip
import io
import logging
import math
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple, TypedDict, Unpack

from common.errors import DatasetError
from common.schema import DEFAULT_MAX_WEIGHT, MAX_ID_LENGTH, RATING, Event, RatingScale, parse_event

log = logging.getLogger(__name__)

IMPLICIT_EVENT_TYPE = "play"
# More than this share of a file's ratings off the configured scale means a wrong scale.
OFF_SCALE_LIMIT = 0.01
# Ratings formats (explicit) and implicit-event formats that detect_ratings_format returns.
RATING_FORMATS = ("csv", "csv-noheader", "tab", "tab-header", "dat")
IMPLICIT_FORMATS = ("implicit-csv", "implicit-tab")
_SEPARATORS = {"dat": "::", "tab": "\t", "tab-header": "\t", "implicit-tab": "\t"}
_HEADER_FORMATS = ("csv", "tab-header", "implicit-csv", "implicit-tab")


class RatingRow(NamedTuple):
    user: str
    item: str
    rating: float
    timestamp: int


class EventRow(NamedTuple):
    """One row of any ratings or events file. ``value`` is the rating when ``type`` is
    ``"rating"``, else the implicit weight. The first four fields line up with
    :class:`RatingRow`, so a rating row can be used where ``(user, item, rating, timestamp)``
    is expected."""

    user: str
    item: str
    value: float
    timestamp: int
    type: str = RATING

    @property
    def is_rating(self) -> bool:
        return self.type == RATING

    def to_message(self) -> dict[str, Any]:
        """The wire form of :mod:`common.schema`: a rating or an implicit event."""
        if self.type == RATING:
            return {"user": self.user, "item": self.item, "rating": self.value,
                    "timestamp": self.timestamp}
        return {"user": self.user, "item": self.item, "type": self.type, "weight": self.value,
                "timestamp": self.timestamp}

    def to_event(self, scale: RatingScale | None = None, max_weight: float | None = None) -> Event:
        """Validated :class:`common.schema.Event` (raises ``InvalidRating`` naming the field)."""
        return parse_event(self.to_message(), scale=scale, max_weight=max_weight)


class RatingScaleError(DatasetError):
    """A file's ratings are on another scale than the configured one (see the module doc)."""


@dataclass
class ReadReport:
    """What a read produced: rows kept, and every bad row as ``file:line: reason``.

    ``off_scale`` counts ratings refused for being off the scale; ``observed_min`` /
    ``observed_max`` span every finite rating (or weight) of the file, kept or not."""

    path: str
    format: str = ""
    rows: int = 0
    bad: list[str] = field(default_factory=list)
    implicit: bool = False
    header: str = ""
    off_scale: int = 0
    observed_min: float = math.inf
    observed_max: float = -math.inf

    def observe(self, value: float) -> None:
        if value < self.observed_min:
            self.observed_min = value
        if value > self.observed_max:
            self.observed_max = value


def open_text(path: Path, encoding: str) -> io.TextIOBase:
    raw = path.open("rb")
    head = raw.peek(2)[:2] if hasattr(raw, "peek") else b""
    if head == b"\x1f\x8b":
        return io.TextIOWrapper(gzip.GzipFile(fileobj=raw), encoding=encoding, newline="")
    return io.TextIOWrapper(raw, encoding=encoding, newline="")


def first_line(path: Path, encoding: str = "latin-1") -> str:
    with open_text(path, encoding) as fh:
        for line in fh:
            if line.strip():
                return line.rstrip("\r\n")
    return ""


def detect_ratings_format(path: str | Path) -> str:
    """One of :data:`RATING_FORMATS` or :data:`IMPLICIT_FORMATS`, from the first line.

    A first line whose third field is not a number is a header; a header whose third column
    is named ``rating...`` heads a ratings file, any other (``weight``, ``plays``, ``count``)
    an implicit-events file. Without a header a file holds ratings."""
    line = first_line(Path(path))
    if not line:
        raise DatasetError(f"{path}: empty file")
    if "::" in line:
        return "dat"
    if "\t" in line:
        sep, kind = "\t", "tab"
    elif "," in line:
        sep, kind = ",", "csv"
    else:
        raise DatasetError(f"{path}:1: not a ratings or events file (no ',', '::' or tab separator)")
    fields = [f.strip().strip('"') for f in line.split(sep)]
    if len(fields) < 3:
        raise DatasetError(f"{path}:1: expected user, item, rating or weight[, timestamp] columns, "
                           f"got {len(fields)}")
    if is_number(fields[2]):
        return "tab" if kind == "tab" else "csv-noheader"
    if fields[2].lower().startswith("rating"):
        return "tab-header" if kind == "tab" else "csv"
    return f"implicit-{kind}"


def is_implicit_format(fmt: str) -> bool:
    return fmt in IMPLICIT_FORMATS


def is_number(text: str) -> bool:
    """Whether a field parses as a float (how a header line is told from a first data row)."""
    try:
        float(text)
    except ValueError:
        return False
    return True


def _parse_fields(
    parts: list[str], scale: RatingScale, implicit: bool, max_weight: float, report: ReadReport
) -> tuple[tuple[str, str, float, int] | None, str]:
    """``(user, item, value, timestamp)`` of one row, or ``None`` and the reason."""
    what = "weight" if implicit else "rating"
    if len(parts) < 3:
        return None, f"expected user, item, {what}[, timestamp], got {len(parts)} field(s)"
    user, item, value_text = parts[0].strip(), parts[1].strip(), parts[2].strip()
    if not user:
        return None, "user: empty id"
    if not item:
        return None, "item: empty id"
    if len(user) > MAX_ID_LENGTH or len(item) > MAX_ID_LENGTH:
        return None, f"id longer than {MAX_ID_LENGTH} characters"
    try:
        value = float(value_text)
    except ValueError:
        return None, f"{what}: {value_text!r} is not a number"
    if not math.isfinite(value):
        return None, f"{what}: {value_text!r} is not finite"
    report.observe(value)
    if implicit:
        if value < 0:
            return None, f"weight: {value_text} is negative"
        if value > max_weight:
            return None, f"weight: {value_text} is above the cap {max_weight:g} (EVENT_MAX_WEIGHT)"
    elif not scale.min <= value <= scale.max:
        report.off_scale += 1
        return None, f"rating: {value} is outside {scale.min}..{scale.max}"
    timestamp = 0
    if len(parts) > 3 and parts[3].strip():
        try:
            timestamp = int(float(parts[3]))
        except (ValueError, OverflowError):
            return None, f"timestamp: {parts[3].strip()!r} is not a number"
        if timestamp < 0:
            return None, "timestamp: negative"
    return (user, item, value, timestamp), ""


def _fmt_number(x: float) -> str:
    return f"{x:g}"


def check_off_scale(report: ReadReport, scale: RatingScale, limit: float | None = OFF_SCALE_LIMIT) -> None:
    """Raise :class:`RatingScaleError` when more than ``limit`` of the ratings read so far
    fell off ``scale`` (``None`` turns the check off)."""
    if limit is None or report.implicit or not report.off_scale:
        return
    seen = report.rows + report.off_scale
    if report.off_scale <= limit * seen:
        return
    lo, hi = report.observed_min, report.observed_max
    new_lo, new_hi = min(lo, scale.min), max(hi, scale.max)
    raise RatingScaleError(
        f"{report.path}: {report.off_scale:,} of {seen:,} ratings "
        f"({100.0 * report.off_scale / seen:.1f}%) are outside the configured rating scale "
        f"{_fmt_number(scale.min)}..{_fmt_number(scale.max)}; this file's ratings span "
        f"{_fmt_number(lo)}..{_fmt_number(hi)}. Set RATING_MIN={_fmt_number(new_lo)} "
        f"RATING_MAX={_fmt_number(new_hi)} (or pass --rating-min {_fmt_number(new_lo)} "
        f"--rating-max {_fmt_number(new_hi)})"
    )


def _iter_fields(
    path: Path,
    strict: bool,
    scale: RatingScale,
    report: ReadReport,
    max_weight: float,
    off_scale_limit: float | None,
    max_rows: int | None = None,
) -> Iterator[tuple[str, str, float, int]]:
    fmt = report.format
    implicit = is_implicit_format(fmt)
    sep = _SEPARATORS.get(fmt, ",")
    encoding = "latin-1" if fmt in ("dat", "tab") else "utf-8"
    lineno = 0
    seen = 0
    try:
        with open_text(path, encoding) as fh:
            for lineno, line in enumerate(fh, start=1):
                line = line.rstrip("\r\n")
                if not line.strip():
                    continue
                if fmt in _HEADER_FORMATS and not report.header:
                    report.header = line
                    continue
                seen += 1
                if max_rows is not None and seen > max_rows:
                    break
                row, reason = _parse_fields(line.split(sep), scale, implicit, max_weight, report)
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
    except UnicodeDecodeError as exc:
        raise DatasetError(f"{path}:{lineno + 1}: not valid {encoding} text ({exc.reason})") from exc
    except (OSError, EOFError) as exc:  # a truncated gzip stream, an unreadable file
        raise DatasetError(f"{path}:{lineno + 1}: cannot read: {exc}") from exc
    if len(report.bad) > 10:
        log.warning("%s: skipped %d bad rows in all", path, len(report.bad))
    check_off_scale(report, scale, off_scale_limit)


def _start(path: str | Path, report: ReadReport | None) -> tuple[Path, ReadReport]:
    path = Path(path)
    if not path.exists():
        raise DatasetError(f"{path}: no such file")
    fmt = detect_ratings_format(path)
    report = report if report is not None else ReadReport(str(path))
    report.path = report.path or str(path)
    report.format = fmt
    report.implicit = is_implicit_format(fmt)
    return path, report


def iter_events(
    path: str | Path,
    strict: bool = False,
    scale: RatingScale | None = None,
    report: ReadReport | None = None,
    max_weight: float | None = None,
    off_scale_limit: float | None = OFF_SCALE_LIMIT,
    event_type: str = IMPLICIT_EVENT_TYPE,
) -> Iterator[EventRow]:
    """Yield the valid rows of a ratings OR implicit-events file as :class:`EventRow` tuples
    (type ``"rating"``, or ``event_type`` for an implicit file); bad rows are reported (or
    fatal), a wrong rating scale raises :class:`RatingScaleError` once the file is read."""
    path, report = _start(path, report)
    kind = event_type if report.implicit else RATING
    for user, item, value, ts in _iter_fields(path, strict, scale or RatingScale(), report,
                                              max_weight or DEFAULT_MAX_WEIGHT, off_scale_limit):
        yield EventRow(user, item, value, ts, kind)


class RatingReadOptions(TypedDict, total=False):
    """The keyword options of :func:`iter_ratings`, which :func:`read_ratings` passes on."""

    strict: bool
    scale: RatingScale | None
    report: ReadReport | None
    off_scale_limit: float | None


class EventReadOptions(RatingReadOptions, total=False):
    """The keyword options of :func:`iter_events`, which :func:`read_events` passes on."""

    max_weight: float | None
    event_type: str


def read_events(path: str | Path, **options: Unpack[EventReadOptions]) -> list[EventRow]:
    """All valid rows of a ratings or implicit-events file, in file order."""
    return list(iter_events(path, **options))


def iter_ratings(
    path: str | Path,
    strict: bool = False,
    scale: RatingScale | None = None,
    report: ReadReport | None = None,
    off_scale_limit: float | None = OFF_SCALE_LIMIT,
) -> Iterator[RatingRow]:
    """Yield valid ratings from any ratings format; bad rows are reported (or fatal). An
    implicit-events file is refused (it has weights, not ratings: see :func:`iter_events`)."""
    path, report = _start(path, report)
    if report.implicit:
        raise DatasetError(
            f"{path}: an implicit-feedback file (header {first_line(path)!r}): it holds weights, "
            f"not ratings; read it as events (common.datasets.read_events)")
    for user, item, value, ts in _iter_fields(path, strict, scale or RatingScale(), report,
                                              DEFAULT_MAX_WEIGHT, off_scale_limit):
        yield RatingRow(user, item, value, ts)


def read_ratings(path: str | Path, **options: Unpack[RatingReadOptions]) -> list[RatingRow]:
    """All valid ratings of a file, in file order."""
    return list(iter_ratings(path, **options))


def check_scale(path: str | Path, scale: RatingScale | None = None, max_rows: int | None = 200_000,
                off_scale_limit: float = OFF_SCALE_LIMIT) -> ReadReport:
    """Read (the first ``max_rows`` rows of) a file only to check its ratings against
    ``scale``: raises :class:`RatingScaleError` (or :class:`DatasetError` for an unreadable
    file), returns the report otherwise. Implicit files pass (weights have no scale).
    Off-scale ratings of another scale are spread over a file, so a prefix tells."""
    path, report = _start(path, None)
    scale = scale or RatingScale()
    for _ in _iter_fields(path, False, scale, report, DEFAULT_MAX_WEIGHT, None, max_rows):
        pass
    check_off_scale(report, scale, off_scale_limit)
    return report
