"""Synthetic MovieLens-shaped data for demos and scale tests when no dataset is at hand.

Ratings follow the model the recommender learns, so there is a right answer to recover:
``r = clip_to_half_stars(mu + b_u + b_i + U_u . P_i + noise)`` with planted low-rank factors,
user and item biases, a Zipf-like item popularity and a skewed user activity, unique
(user, item) pairs, increasing timestamps, and titles/genres for a catalogue.

``python -m common.synthetic --out DIR --ratings 100000`` writes ``ratings.csv`` and
``movies.csv`` in the ml-latest-small format.
"""

from __future__ import annotations

import argparse
import csv
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from common.datasets import Movie, RatingRow

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

    pairs: set[tuple[int, int]] = set()
    users_out: list[np.ndarray] = []
    items_out: list[np.ndarray] = []
    while len(pairs) < n_ratings:
        need = int((n_ratings - len(pairs)) * 1.3) + 16
        us = rng.choice(n_users, need, p=user_weight)
        its = rng.choice(n_items, need, p=item_weight)
        keep_u, keep_i = [], []
        for u, i in zip(us.tolist(), its.tolist()):
            if (u, i) not in pairs:
                pairs.add((u, i))
                keep_u.append(u)
                keep_i.append(i)
                if len(pairs) == n_ratings:
                    break
        users_out.append(np.array(keep_u, dtype=np.int64))
        items_out.append(np.array(keep_i, dtype=np.int64))
    u_idx = np.concatenate(users_out)
    i_idx = np.concatenate(items_out)
    raw = (
        mu + user_bias[u_idx] + item_bias[i_idx]
        + np.einsum("ij,ij->i", user_factors[u_idx], item_factors[i_idx])
        + rng.normal(0.0, noise, n_ratings)
    )
    ratings = np.clip(np.round(raw * 2.0) / 2.0, 0.5, 5.0)
    gaps = rng.exponential(30.0, n_ratings).astype(np.int64) + 1
    timestamps = start_timestamp + np.cumsum(gaps)

    rows = [
        RatingRow(str(u + 1), str(i + 1), float(r), int(t))
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


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m common.synthetic", description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--users", type=int, default=600)
    parser.add_argument("--items", type=int, default=2000)
    parser.add_argument("--ratings", type=int, default=50_000)
    parser.add_argument("--rank", type=int, default=8)
    parser.add_argument("--seed", type=int, default=42)
    args = parser.parse_args(argv)
    rows, movies = generate(args.users, args.items, args.ratings, args.rank, args.seed)[:2]
    r, m = write_movielens(args.out, rows, movies)
    print(f"wrote {len(rows)} ratings to {r} and {len(movies)} movies to {m}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
