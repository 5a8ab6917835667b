"""Load a MovieLens catalogue (and the popular fallback) into Redis.

``python -m predictor.load_catalog --movies movies.csv [--ratings ratings.csv]`` writes
``{p}:catalog`` (item -> JSON ``{"title", "genres"}``) and, from the ratings file,
``{p}:popular`` (``[[item, count], ...]`` most rated first): what the predictor serves before
the modeler has published a model. Any ratings or implicit-events file ``common.datasets``
reads works (popularity counts the users who rated or played an item).
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from collections import Counter
from collections.abc import Sequence

import redis

from common.catalog import read_movies
from common.datasets import iter_events
from common.errors import DatasetError
from common.keys import Keys
from common.logging import setup_logging
from predictor.config import PredictorSettings

log = logging.getLogger(__name__)

POPULAR_KEEP = 1000  # the API's largest n


def write_catalog(client: redis.Redis, keys: Keys, movies: Sequence[tuple[str, str, Sequence[str]]],
                  chunk: int = 5000) -> int:
    pipe = client.pipeline(transaction=False)
    for start in range(0, len(movies), chunk):
        pipe.hset(keys.catalog, mapping={
            item: json.dumps({"title": title, "genres": list(genres)})
            for item, title, genres in movies[start : start + chunk]
        })
    pipe.execute()
    return len(movies)


def popular_from_ratings(items: Sequence[str] | Counter[str], keep: int = POPULAR_KEEP) -> list[list[object]]:
    counts = items if isinstance(items, Counter) else Counter(items)
    # Most rated first; ties by id so the list is the same on every run.
    ranked = sorted(counts.items(), key=lambda kv: (-kv[1], kv[0]))[:keep]
    return [[item, count] for item, count in ranked]


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m predictor.load_catalog", description=__doc__.split("\n\n")[0])
    parser.add_argument("--movies", help="MovieLens movies file (movies.csv, movies.dat, u.item)")
    parser.add_argument("--ratings", help="ratings or implicit-events file, for the popular fallback")
    parser.add_argument("--keep", type=int, default=POPULAR_KEEP, help="popular items to keep")
    args = parser.parse_args(argv)
    settings = PredictorSettings()  # fields come from the env
    setup_logging(settings.log_level, settings.log_format)
    if not args.movies and not args.ratings:
        parser.error("give --movies and/or --ratings")
    keys = Keys(settings.redis_prefix)
    client = redis.Redis.from_url(settings.redis_url, socket_timeout=30)
    try:
        if args.movies:
            movies = read_movies(args.movies)
            n = write_catalog(client, keys, movies)
            log.info("catalogue: %d items from %s -> %s", n, args.movies, keys.catalog)
        if args.ratings:
            counts = Counter(r.item for r in iter_events(args.ratings, scale=settings.scale))
            popular = popular_from_ratings(counts, args.keep)
            client.set(keys.popular, json.dumps(popular))
            log.info("popular: top %d of %d items -> %s", len(popular), len(counts), keys.popular)
    except DatasetError as exc:
        log.error("%s", exc)
        return 2
    except (redis.ConnectionError, redis.TimeoutError) as exc:
        log.error("redis unreachable at %s: %s", settings.redis_url, exc)
        return 3
    finally:
        client.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())
