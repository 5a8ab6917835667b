"""Synthetic MovieLens-shaped data for demos and scale tests when no dataset is at hand.

Ratings follow the model the recommender learns, so there is a right answer to recover:
``r = clip_to_half_stars(mu + b_u + b_i + U_u . P_i + noise)`` with planted low-rank factors,
user and item biases, a Zipf-like item popularity and a skewed user activity, unique
(user, item) pairs, increasing timestamps, and titles/genres for a catalogue.

``python -m common.synthetic --out DIR --ratings 100000`` writes ``ratings.csv`` and
``movies.csv`` in the ml-latest-small format.

:func:`generate_events` is the large-scale, columnar variant (ML-25M-shaped by default: 162,541
users × 59,047 items, 25M interactions): log-normal user activity with a floor of 20, Zipf item
popularity, string ids (digits, zero-padded digits or UUIDs), implicit play counts or explicit
half-star ratings, optionally with a planted low-rank preference to recover.
``python -m common.synthetic --events --out FILE ...`` writes it as a delimited file.
"""

from __future__ import annotations

import argparse
import csv
import uuid
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from common.catalog import Movie
from common.datasets import RatingRow

GENRES = (
    "Action", "Adventure", "Animation", "Children", "Comedy", "Crime", "Documentary",
    "Drama", "Fantasy", "Film-Noir", "Horror", "Musical", "Mystery", "Romance", "Sci-Fi",
    "Thriller", "War", "Western",
)
_WORDS = (
    "Night", "River", "Silent", "Return", "Empire", "Summer", "Glass", "Last", "Iron", "Blue",
    "Garden", "Storm", "City", "Dream", "Secret", "Winter", "Echo", "Shadow", "Golden", "Lost",
)


@dataclass(frozen=True)
class Planted:
    """The generating model, for tests that check recovery."""

    mu: float
    user_bias: np.ndarray
    item_bias: np.ndarray
    user_factors: np.ndarray
    item_factors: np.ndarray
    noise: float


def generate(
    n_users: int = 600,
    n_items: int = 2000,
    n_ratings: int = 50_000,
    rank: int = 8,
    seed: int = 42,
    noise: float = 0.35,
    mu: float = 3.5,
    start_timestamp: int = 1_000_000_000,
    return_model: bool = False,
) -> tuple[list[RatingRow], list[Movie]] | tuple[list[RatingRow], list[Movie], Planted]:
    """Return ``(ratings in timestamp order, movies[, planted model])``."""
    if n_ratings > n_users * n_items // 2:
        raise ValueError("n_ratings must be at most half of n_users * n_items")
    rng = np.random.default_rng(seed)
    # Entries ~ N(0, s) with rank * s^4 = 0.3: the dot product has std ~0.55, about half the
    # spread of the biases together, like MovieLens.
    scale = (0.3 / rank) ** 0.25
    user_factors = rng.normal(0.0, scale, (n_users, rank))
    item_factors = rng.normal(0.0, scale, (n_items, rank))
    user_bias = rng.normal(0.0, 0.35, n_users)
    item_bias = rng.normal(0.0, 0.45, n_items)

    # Popular items are rated more often (Zipf-like), active users rate more (log-normal).
    item_weight = 1.0 / np.arange(1, n_items + 1) ** 0.9
    item_weight = item_weight[rng.permutation(n_items)]
    item_weight /= item_weight.sum()
    user_weight = rng.lognormal(0.0, 1.0, n_users)
    user_weight /= user_weight.sum()

    u_idx, i_idx = _unique_pairs(rng, n_users, n_items, n_ratings, user_weight, item_weight)
    raw = (
        mu + user_bias[u_idx] + item_bias[i_idx]
        + np.einsum("ij,ij->i", user_factors[u_idx], item_factors[i_idx])
        + rng.normal(0.0, noise, n_ratings)
    )
    ratings = np.clip(np.round(raw * 2.0) / 2.0, 0.5, 5.0)
    gaps = rng.exponential(30.0, n_ratings).astype(np.int64) + 1
    timestamps = start_timestamp + np.cumsum(gaps)

    users = [str(u) for u in range(1, n_users + 1)]
    items = [str(i) for i in range(1, n_items + 1)]
    rows = [
        RatingRow(users[u], items[i], r, t)
        for u, i, r, t in zip(u_idx.tolist(), i_idx.tolist(), ratings.tolist(), timestamps.tolist())
    ]
    movies = []
    for i in range(n_items):
        words = rng.choice(len(_WORDS), 2, replace=False)
        year = 1950 + int(rng.integers(0, 75))
        genres = tuple(GENRES[g] for g in sorted(rng.choice(len(GENRES), int(rng.integers(1, 4)), replace=False)))
        movies.append(Movie(str(i + 1), f"{_WORDS[words[0]]} {_WORDS[words[1]]} {i + 1} ({year})", genres))
    if return_model:
        return rows, movies, Planted(mu, user_bias, item_bias, user_factors, item_factors, noise)
    return rows, movies


def _unique_pairs(rng: np.random.Generator, n_users: int, n_items: int, n: int,
                  user_weight: np.ndarray, item_weight: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """``n`` distinct (user, item) pairs drawn by the weights, in draw order.

    Rounds of ``1.3 × missing + 16`` draws; a draw is kept when its pair is new (not kept
    before, and its first occurrence in the round), until ``n`` are kept: the same pairs, in
    the same order, as a loop over the draws with a set, but vectorised (pair key u·n_items + i).
    """
    kept_keys = np.zeros(0, dtype=np.int64)
    kept: list[np.ndarray] = []
    total = 0
    while total < n:
        need = int((n - total) * 1.3) + 16
        us = rng.choice(n_users, need, p=user_weight)
        its = rng.choice(n_items, need, p=item_weight)
        keys = us.astype(np.int64) * n_items + its
        _, first = np.unique(keys, return_index=True)
        first.sort()  # first occurrences, in draw order
        fresh = first[~np.isin(keys[first], kept_keys)]
        fresh = fresh[: n - total]
        kept.append(keys[fresh])
        kept_keys = np.union1d(kept_keys, keys[fresh])
        total += len(fresh)
    order = np.concatenate(kept)
    return order // n_items, order % n_items


def write_movielens(out: Path, rows: list[RatingRow], movies: list[Movie]) -> tuple[Path, Path]:
    """Write ``ratings.csv`` and ``movies.csv`` in the ml-latest-small format."""
    out.mkdir(parents=True, exist_ok=True)
    ratings_path, movies_path = out / "ratings.csv", out / "movies.csv"
    with ratings_path.open("w", newline="") as fh:
        fh.write("userId,movieId,rating,timestamp\n")
        fh.writelines(f"{r.user},{r.item},{r.rating:g},{r.timestamp}\n" for r in rows)
    with movies_path.open("w", newline="", encoding="utf-8") as fh:
        writer = csv.writer(fh)
        writer.writerow(["movieId", "title", "genres"])
        for m in movies:
            writer.writerow([m.item, m.title, "|".join(m.genres) or "(no genres listed)"])
    return ratings_path, movies_path


# ML-25M's shape: users, items (rated at least once), ratings; every user rated >= 20 movies.
ML25M_USERS = 162_541
ML25M_ITEMS = 59_047
ML25M_RATINGS = 25_000_095


@dataclass
class Events:
    """Columnar interactions: row j is (``user_ids[users[j]]``, ``item_ids[items[j]]``, ``values[j]``)."""

    users: np.ndarray  # int64 index into user_ids
    items: np.ndarray  # int64 index into item_ids
    values: np.ndarray  # float64: play count (implicit) or rating (explicit)
    timestamps: np.ndarray  # int64, increasing
    user_ids: list[str]
    item_ids: list[str]
    implicit: bool
    user_factors: np.ndarray | None = None  # planted preference (rank > 0)
    item_factors: np.ndarray | None = None
    item_popularity: np.ndarray = field(default_factory=lambda: np.zeros(0))

    def __len__(self) -> int:
        return len(self.users)

    def rows(self) -> list[tuple[str, str, float, int]]:
        """As ``(user, item, value, timestamp)`` tuples (small sets only)."""
        return [(self.user_ids[u], self.item_ids[i], v, t) for u, i, v, t in
                zip(self.users.tolist(), self.items.tolist(), self.values.tolist(), self.timestamps.tolist())]


def make_ids(n: int, style: str, rng: np.random.Generator, width: int = 0) -> list[str]:
    """``n`` distinct string ids: ``digits`` ("1".."n"), ``padded`` ("0000001": leading zeros
    that a cast to a number would lose) or ``uuid`` (random UUID4 strings from ``rng``)."""
    if style == "digits":
        return [str(j) for j in range(1, n + 1)]
    if style == "padded":
        width = width or len(str(n)) + 2
        return [str(j).zfill(width) for j in range(1, n + 1)]
    if style == "uuid":
        raw = rng.integers(0, 256, (n, 16), dtype=np.uint8)
        return [str(uuid.UUID(bytes=bytes(row), version=4)) for row in raw]
    raise ValueError(f"id style must be digits, padded or uuid, not {style!r}")


def generate_events(
    n_users: int = ML25M_USERS,
    n_items: int = ML25M_ITEMS,
    n_events: int = ML25M_RATINGS,
    *,
    implicit: bool = True,
    rank: int = 0,
    signal: float = 4.0,
    min_per_user: int = 20,
    activity_sigma: float = 1.2,
    zipf: float = 1.0,
    ids: str = "digits",
    seed: int = 42,
    start_timestamp: int = 1_000_000_000,
) -> Events:
    """Interactions with MovieLens-25M's marginals, vectorised (the default 25M rows in about a minute).

    * Activity: user u has ``n_u = min_per_user + e_u`` interactions, e_u log-normal(0, σ)
      scaled so Σ n_u ≈ ``n_events`` (capped at half the catalogue).
    * Popularity: item weights ``p_i ∝ 1 / rank_i^zipf`` over a random permutation of the items.
    * ``rank == 0``: a user's items are distinct draws from p (draws with replacement, duplicates
      dropped, topped up for a few rounds; the very heaviest users may end a little short).
      ``rank > 0``: planted factors x_u, y_i ~ N(0, 1/√rank) and the items are a sample without replacement from
      ``softmax(log p_i + signal·x_u·y_i)`` (Gumbel top-n_u; O(users × items), small sets only).
    * Values: implicit play counts ``1 + floor(lognormal(0.5, 1))``; explicit half-star ratings
      ``clip(3.5 + b_u + b_i (+ x_u·y_i) + noise)``.
    """
    rng = np.random.default_rng(seed)
    per_user, weight = marginals(rng, n_users, n_items, n_events, min_per_user, activity_sigma, zipf)
    xu = yi = None
    if rank > 0:
        xu = rng.normal(0.0, rank ** -0.5, (n_users, rank))
        yi = rng.normal(0.0, rank ** -0.5, (n_items, rank))
        users, items = _planted_sample(rng, per_user, np.log(weight), xu, yi, signal)
    else:
        users, items = sample_user_items(rng, per_user, weight)
    # Interleave users over time, as a live service sees them.
    order = rng.permutation(len(users))
    users, items = users[order], items[order]
    n = len(users)
    if implicit:
        values = 1.0 + np.floor(rng.lognormal(0.5, 1.0, n))
    else:
        raw = 3.5 + rng.normal(0, 0.35, n_users)[users] + rng.normal(0, 0.45, n_items)[items]
        if xu is not None and yi is not None:
            raw += np.einsum("ij,ij->i", xu[users], yi[items])
        raw += rng.normal(0.0, 0.35, n)
        values = np.clip(np.round(raw * 2.0) / 2.0, 0.5, 5.0)
    timestamps = start_timestamp + np.cumsum(rng.integers(1, 60, n))
    return Events(users, items, values, timestamps, make_ids(n_users, ids, rng), make_ids(n_items, ids, rng),
                  implicit, xu, yi, weight)


def marginals(rng: np.random.Generator, n_users: int, n_items: int, n_events: int, min_per_user: int = 20,
              activity_sigma: float = 1.2, zipf: float = 1.0) -> tuple[np.ndarray, np.ndarray]:
    """``(n_u per user, item weights p_i)`` of :func:`generate_events` (see its docstring)."""
    if n_users < 1 or n_items < 2:
        raise ValueError("need at least one user and two items")
    cap = max(1, n_items // 2)
    floor_n = min(min_per_user, cap)
    extra = rng.lognormal(0.0, activity_sigma, n_users)
    budget = max(0, n_events - floor_n * n_users)
    per_user = np.minimum(cap, floor_n + np.floor(extra * budget / extra.sum()).astype(np.int64))
    weight = 1.0 / np.arange(1, n_items + 1) ** zipf
    weight = weight[rng.permutation(n_items)]
    return per_user, weight / weight.sum()


def sample_user_items(rng: np.random.Generator, per_user: np.ndarray, weight: np.ndarray
                      ) -> tuple[np.ndarray, np.ndarray]:
    """Per user j (0-based index into ``per_user``), up to n_j distinct items drawn by ``weight``:
    ``(users, items)`` sorted by user, in chunks of ~4M draws. Usable per partition on executors
    (a block of users with its own ``rng``), so large sets need never exist on one machine."""
    cdf = np.cumsum(weight)
    cdf[-1] = 1.0
    n_items = len(weight)
    out_u: list[np.ndarray] = []
    out_i: list[np.ndarray] = []
    start = 0
    n_users = len(per_user)
    while start < n_users:
        stop = start + 1
        budget = 0
        while stop < n_users and budget < 4_000_000:
            budget += int(per_user[stop])
            stop += 1
        want = per_user[start:stop]
        users = np.arange(start, stop, dtype=np.int64)
        u = np.zeros(0, np.int64)
        i = np.zeros(0, np.int64)
        short = want.copy()
        for _ in range(4):  # top-up rounds for the users whose draws were mostly duplicates
            draws = (short * 1.25 + 4 * (short > 0)).astype(np.int64)
            new_u = np.repeat(users, draws)
            new_i = np.searchsorted(cdf, rng.random(len(new_u)), side="right").astype(np.int64)
            u, i = np.concatenate([u, new_u]), np.concatenate([i, new_i])
            _, first = np.unique(u * n_items + i, return_index=True)
            first.sort()  # distinct pairs, earlier rounds and draws first (not by item index)
            u, i = u[first], i[first]
            order = np.argsort(u, kind="stable")
            u, i = u[order], i[order]
            # Keep the first n_u of each user: position within the user's run < n_u.
            run_start = np.searchsorted(u, u, side="left")
            keep = (np.arange(len(u)) - run_start) < per_user[u]
            u, i = u[keep], i[keep]
            short = want - np.bincount(u - start, minlength=len(want))
            if short.sum() <= want.sum() // 1000:
                break
        out_u.append(u)
        out_i.append(i)
        start = stop
    return np.concatenate(out_u), np.concatenate(out_i)


def _planted_sample(rng: np.random.Generator, per_user: np.ndarray, log_weight: np.ndarray,
                    xu: np.ndarray, yi: np.ndarray, signal: float) -> tuple[np.ndarray, np.ndarray]:
    # Gumbel top-k: the n largest of (logit + Gumbel noise) are a sample without replacement
    # from softmax(logit) (Vieira 2014; Kool et al. 2019).
    out_u: list[np.ndarray] = []
    out_i: list[np.ndarray] = []
    for start in range(0, len(per_user), 512):
        block = slice(start, min(start + 512, len(per_user)))
        logits = log_weight[None, :] + signal * (xu[block] @ yi.T)
        logits += rng.gumbel(size=logits.shape)
        order = np.argsort(-logits, axis=1)
        for j, n in enumerate(per_user[block].tolist()):
            out_u.append(np.full(n, start + j, dtype=np.int64))
            out_i.append(order[j, :n].astype(np.int64))
    return np.concatenate(out_u), np.concatenate(out_i)


def write_events(path: Path, events: Events, sep: str = ",", header: bool = True, chunk: int = 1_000_000) -> Path:
    """Write ``user,item,weight|rating,timestamp`` lines (a header names the value column)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    value_name = "weight" if events.implicit else "rating"
    users, items = events.user_ids, events.item_ids
    with path.open("w", newline="") as fh:
        if header:
            fh.write(sep.join(("user", "item", value_name, "timestamp")) + "\n")
        for start in range(0, len(events), chunk):
            stop = start + chunk
            fh.write("".join(
                f"{users[u]}{sep}{items[i]}{sep}{v:g}{sep}{t}\n" for u, i, v, t in zip(
                    events.users[start:stop].tolist(), events.items[start:stop].tolist(),
                    events.values[start:stop].tolist(), events.timestamps[start:stop].tolist())))
    return path


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m common.synthetic", description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--users", type=int, default=600)
    parser.add_argument("--items", type=int, default=2000)
    parser.add_argument("--ratings", type=int, default=50_000)
    parser.add_argument("--rank", type=int, default=8)
    parser.add_argument("--seed", type=int, default=42)
    parser.add_argument("--events", action="store_true",
                        help="ML-25M-shaped interactions (generate_events) into the file --out")
    parser.add_argument("--explicit", action="store_true", help="with --events: ratings, not play counts")
    parser.add_argument("--ids", choices=("digits", "padded", "uuid"), default="digits")
    args = parser.parse_args(argv)
    if args.events:
        events = generate_events(args.users, args.items, args.ratings, implicit=not args.explicit,
                                 rank=0, ids=args.ids, seed=args.seed)
        write_events(args.out, events)
        print(f"wrote {len(events)} interactions of {args.users} users x {args.items} items to {args.out}")
        return 0
    rows, movies = generate(args.users, args.items, args.ratings, args.rank, args.seed)[:2]
    r, m = write_movielens(args.out, rows, movies)
    print(f"wrote {len(rows)} ratings to {r} and {len(movies)} movies to {m}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
