"""Redis I/O for the predictor: the model watcher (a background thread per process) and the
few per-request reads (user vector, rated set) done on the event loop.

Layout: :mod:`common.keys`. One key is the predictor's own: ``{p}:prediction:{kind}:{id}``, a
jiminy-style prediction result (JSON, with a TTL).

A little over 450 lines: the catalogue, the version loader (both factor sets, full and
delta) and the per-request user read all follow the same key layout, kept side by side.
"""

from __future__ import annotations

import contextlib
import json
import logging
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import numpy as np
import redis
import redis.asyncio as aioredis
from redis.backoff import ExponentialBackoff
from redis.retry import Retry

from common.codec import decode_record
from common.feedback import Weighting
from common.keys import ITEMS, RANKING_ITEMS, RANKING_USERS, USERS, Keys
from common.snapshot import Meta, Pointer, SnapshotChanged, read_all_factors, read_meta, read_pointer
from predictor.model import FactorModel, RankingSet, UserEntry

log = logging.getLogger(__name__)

REDIS_ERRORS: tuple[type[BaseException], ...] = (
    redis.ConnectionError,
    redis.TimeoutError,
    OSError,
)


def sync_client(url: str, timeout: float) -> redis.Redis:
    return redis.Redis.from_url(
        url,
        socket_timeout=max(timeout, 5.0),  # bulk model reads take longer than one request
        socket_connect_timeout=timeout,
        health_check_interval=10,
        retry=Retry(ExponentialBackoff(cap=0.5, base=0.05), 2),
    )


def async_client(url: str, timeout: float) -> aioredis.Redis:
    return aioredis.Redis.from_url(
        url,
        socket_timeout=timeout,
        socket_connect_timeout=timeout,
        retry=Retry(ExponentialBackoff(cap=0.2, base=0.02), 1),
    )


# ---------------------------------------------------------------------- catalogue


@dataclass(frozen=True)
class Catalog:
    """Item metadata loaded from ``{p}:catalog``: parallel lists, search by title substring."""

    ids: list[str]
    titles: list[str]
    genres: list[list[str]]
    lowered: list[str]
    index: dict[str, int]

    @classmethod
    def empty(cls) -> Catalog:
        return cls([], [], [], [], {})

    @classmethod
    def from_hash(cls, raw: Mapping[bytes | str, bytes | str]) -> Catalog:
        rows: list[tuple[str, str, list[str]]] = []
        for k, v in raw.items():
            try:
                d = json.loads(v)
                title = str(d.get("title", ""))
                genres = [str(g) for g in d.get("genres", [])]
            except (ValueError, AttributeError, TypeError):
                continue
            rows.append((k.decode() if isinstance(k, bytes) else k, title, genres))
        # MovieLens ids are integers: list them in numeric order, other ids after, by text.
        rows.sort(key=lambda r: (0, int(r[0]), "") if r[0].isdigit() else (1, 0, r[0]))
        ids = [r[0] for r in rows]
        titles = [r[1] for r in rows]
        return cls(
            ids=ids,
            titles=titles,
            genres=[r[2] for r in rows],
            lowered=[t.lower() for t in titles],
            index={item: k for k, item in enumerate(ids)},
        )

    def __len__(self) -> int:
        return len(self.ids)

    def get(self, item: str) -> tuple[str | None, list[str]]:
        k = self.index.get(item)
        if k is None:
            return None, []
        return self.titles[k], self.genres[k]

    def search(self, q: str, genre: str | None, limit: int, offset: int) -> tuple[list[int], int]:
        q = q.lower().strip()
        g = genre.lower().strip() if genre else None
        hits = []
        for k, title in enumerate(self.lowered):
            if q and q not in title:
                continue
            if g and g not in (x.lower() for x in self.genres[k]):
                continue
            hits.append(k)
        return hits[offset : offset + limit], len(hits)


# ---------------------------------------------------------------------- model loading


def _ranking_params(client: redis.Redis, keys: Keys, meta: Meta) -> dict[str, Any]:
    """The ranking model's fold-in parameters from the version metadata."""
    try:
        weighting = Weighting.from_dict(meta.ranking_weighting)
    except (TypeError, ValueError) as exc:
        log.warning("version %d: bad ranking_weighting %r (%s); using the defaults",
                    meta.version, meta.ranking_weighting, exc)
        weighting = Weighting()
    # Optional field (additive to the contract): how the modeler scales λ per user.
    scaling = client.hget(keys.meta(meta.version), "ranking_reg_scaling")
    reg_scaling = scaling.decode() if isinstance(scaling, bytes) else (scaling or "count")
    if reg_scaling not in ("count", "constant"):
        reg_scaling = "count"
    return {"reg_param": meta.ranking_reg_param, "alpha": meta.ranking_alpha,
            "weighting": weighting, "reg_scaling": reg_scaling}


def load_model(
    client: redis.Redis, keys: Keys, pointer: Pointer, base: FactorModel | None = None
) -> tuple[FactorModel, str]:
    """Build the model of ``pointer``'s version; ``(model, "delta" | "full")``.

    Reads the explicit set when the version has one and the ranking set when it has one
    (:attr:`common.snapshot.Meta.models`). If ``base``'s segments are a prefix of the new
    version's (same sets, same ranks), only the newer (delta) segments are read and applied
    to a copy of ``base``. Raises ``SnapshotChanged`` if the version was collected meanwhile.
    """
    meta = read_meta(client, keys, pointer.version)
    if meta is None:
        raise SnapshotChanged(f"version {pointer.version} has no metadata (collected?)")
    fields: dict[str, Any] = {
        "version": meta.version,
        "rank": meta.rank,
        "mu": meta.mu,
        "reg_param": meta.reg_param,
        "n_users": meta.n_users,
        "ratings_seen": meta.ratings_seen,
        "created": meta.created,
        "segments": pointer.segments,
        "rating_min": meta.rating_min,
        "rating_max": meta.rating_max,
        "metrics": meta.metrics,
        "popular": list(meta.popular),
        "candidates": meta.candidates,
    }
    has_explicit, has_ranking = meta.has_explicit, meta.has_ranking
    k = len(base.segments) if base is not None else 0
    if (
        base is not None
        and base.rank == meta.rank
        and base.has_explicit == has_explicit
        and (base.ranking.rank if base.ranking is not None else 0) == (meta.ranking_rank if has_ranking else 0)
        and 0 < k < len(pointer.segments)
        and pointer.segments[:k] == base.segments
    ):
        delta = Pointer(version=pointer.version, segments=pointer.segments[k:])
        ids: list[str] = []
        biases = np.zeros(0, np.float32)
        vectors = np.zeros((0, meta.rank), np.float32)
        if has_explicit:
            ids, biases, vectors = read_all_factors(client, keys, delta, ITEMS, meta.rank)
        r_ids: list[str] = []
        r_vectors = None
        if has_ranking:
            r_ids, _, r_vectors = read_all_factors(client, keys, delta, RANKING_ITEMS, meta.ranking_rank)
        return base.with_item_delta(ids, biases, vectors, r_ids, r_vectors, **fields), "delta"
    item_ids: list[str] = []
    index: dict[str, int] = {}
    biases = np.zeros(0, np.float32)
    vectors = np.zeros((0, meta.rank), np.float32)
    if has_explicit:
        item_ids, biases, vectors = read_all_factors(client, keys, pointer, ITEMS, meta.rank)
        index = {item: row for row, item in enumerate(item_ids)}
    ranking = None
    if has_ranking:
        r_ids, _, r_vectors = read_all_factors(client, keys, pointer, RANKING_ITEMS, meta.ranking_rank)
        # One row space for both sets: items of the ranking set only are appended (their
        # explicit rows stay zero), items of the explicit set only keep a zero y_i.
        for item in r_ids:
            if item not in index:
                index[item] = len(item_ids)
                item_ids.append(item)
        n = len(item_ids)
        y = np.zeros((n, meta.ranking_rank), np.float32)
        if r_ids:
            y[np.fromiter((index[i] for i in r_ids), np.int64, len(r_ids))] = r_vectors
        ranking = RankingSet.build(y, **_ranking_params(client, keys, meta))
        if len(biases) < n:
            biases = np.concatenate([biases, np.zeros(n - len(biases), np.float32)])
            vectors = np.concatenate([vectors, np.zeros((n - len(vectors), meta.rank), np.float32)])
    model = FactorModel.build(item_ids=item_ids, item_bias=biases, item_factors=vectors, index=index,
                              has_explicit=has_explicit, ranking=ranking, **fields)
    return model, "full"


def parse_popular(raw: bytes | str | None) -> list[tuple[str, int]]:
    if not raw:
        return []
    try:
        return [(str(i), int(c)) for i, c in json.loads(raw)]
    except (ValueError, TypeError):
        log.warning("ignoring malformed popular list")
        return []


class ModelWatcher:
    """Holds the current model; a daemon thread keeps it up to date.

    New versions are noticed through the ``{p}:events`` channel, and by polling
    ``{p}:current`` every ``poll_interval`` seconds in case a message was missed (pub/sub is
    fire-and-forget: a restart or a dropped connection loses announcements).
    Readers take ``watcher.model`` once per request: the attribute is replaced whole, never
    mutated, so a request sees exactly one version.
    """

    def __init__(
        self,
        url: str,
        keys: Keys,
        poll_interval: float = 2.0,
        timeout: float = 1.0,
        on_swap: Callable[[FactorModel, str], None] | None = None,
    ) -> None:
        self.url = url
        self.keys = keys
        self.poll_interval = poll_interval
        self.timeout = timeout
        self.on_swap = on_swap
        self.model: FactorModel | None = None
        self.fallback_popular: list[tuple[str, int]] = []
        self.catalog = Catalog.empty()
        self.redis_ok = False
        self.last_error: str | None = None
        self._catalog_len = -1
        self._stop = threading.Event()
        self._wake = threading.Event()
        self._thread: threading.Thread | None = None
        self._client: redis.Redis | None = None

    @property
    def popular(self) -> list[tuple[str, int]]:
        return self.popular_for(self.model)

    def popular_for(self, model: FactorModel | None) -> list[tuple[str, int]]:
        """The version's own popular list (what it learned from), else the loader's."""
        if model is not None and model.popular:
            return model.popular
        return self.fallback_popular

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="model-watcher", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._wake.set()
        if self._thread is not None:
            self._thread.join(timeout=10)
        if self._client is not None:
            with contextlib.suppress(Exception):
                self._client.close()

    def poke(self) -> None:
        """Check Redis now rather than at the next poll (used after a request saw trouble)."""
        self._wake.set()

    # -- the thread

    def _run(self) -> None:
        backoff = 0.1
        while not self._stop.is_set():
            pubsub = None
            try:
                self._client = self._client or sync_client(self.url, self.timeout)
                pubsub = self._client.pubsub(ignore_subscribe_messages=True)
                pubsub.subscribe(self.keys.events)
                self.refresh()
                backoff = 0.1
                next_poll = time.monotonic() + self.poll_interval
                while not self._stop.is_set():
                    wait = max(0.0, min(0.2, next_poll - time.monotonic()))
                    msg = pubsub.get_message(timeout=wait)
                    if msg is not None or self._wake.is_set() or time.monotonic() >= next_poll:
                        self._wake.clear()
                        self.refresh()
                        next_poll = time.monotonic() + self.poll_interval
            except REDIS_ERRORS as exc:
                if self.redis_ok or self.last_error is None:
                    log.warning("redis unreachable (%s); retrying", exc)
                self.redis_ok = False
                self.last_error = str(exc)
                self._wake.wait(backoff)
                self._wake.clear()
                backoff = min(backoff * 2, 2.0)
            except Exception:
                # Anything else (a malformed snapshot) must not kill the thread: keep serving
                # the model we have and try again later.
                log.exception("model refresh failed; keeping version %s", self._version())
                self.last_error = "model refresh failed"
                self._wake.wait(self.poll_interval)
            finally:
                if pubsub is not None:
                    with contextlib.suppress(Exception):
                        pubsub.close()

    def _version(self) -> int | None:
        return self.model.version if self.model is not None else None

    def refresh(self) -> bool:
        """One check of Redis: swap in a new version if there is one; True if swapped."""
        if self._client is None:
            self._client = sync_client(self.url, self.timeout)
        client = self._client
        self.fallback_popular = parse_popular(client.get(self.keys.popular))
        n = int(client.hlen(self.keys.catalog))
        if n != self._catalog_len:
            self.catalog = Catalog.from_hash(client.hgetall(self.keys.catalog))
            self._catalog_len = n
            log.info("catalogue loaded: %d items", n)
        self.redis_ok = True
        self.last_error = None
        for _ in range(5):
            pointer = read_pointer(client, self.keys)
            current = self.model
            if pointer is None:
                return False
            base = current
            if current is not None and current.version == pointer.version:
                # Same number, same version, unless Redis lost its data and the modeler
                # started counting again: then the creation time differs; reload in full.
                created = client.hget(self.keys.meta(pointer.version), "created")
                if created is None or float(created) == current.created:
                    return False
                base = None
            try:
                model, kind = load_model(client, self.keys, pointer, base)
            except SnapshotChanged:
                log.info("version %s collected while loading; re-reading the pointer", pointer.version)
                continue
            kept = 0
            if kind == "delta" and current is not None:
                kept = carry_user_cache(client, self.keys, current, model)
            self.model = model
            log.info(
                "model version %d loaded (%s): %d items, rank %d, %d cached users kept",
                model.version, kind, model.n_items, model.rank, kept,
            )
            if self.on_swap is not None:
                self.on_swap(model, kind)
            return True
        return False


def carry_user_cache(client: redis.Redis, keys: Keys, old: FactorModel, new: FactorModel) -> int:
    """Copy ``old``'s cached users that ``new``'s delta segments leave alone into ``new``'s
    cache; the number copied.

    ``new`` is ``old`` plus delta segments. A user's factors are those of the newest segment
    holding them, so a user absent from every delta segment has the same factors in both
    versions. Their rated set is unchanged too: the modeler records a batch's ratings in the
    same publish step that writes the users who made them into the batch's segment (see
    ``modeler.io.publish.SegmentSink``). Without this, each new
    version (every few seconds when streaming) would send every request back to Redis.
    Nothing is carried if the delta added items: a cached user's rated rows could miss one.
    """
    if new.n_items != old.n_items or new.segments[: len(old.segments)] != old.segments:
        return 0
    touched: set[str] = set()
    kinds = ([USERS] if new.has_explicit else []) + ([RANKING_USERS] if new.ranking is not None else [])
    for s in new.segments[len(old.segments) :]:
        for kind in kinds:
            touched.update(k.decode() if isinstance(k, bytes) else k
                           for k in client.hkeys(keys.segment(s, kind)))
    # One C-level copy of the items: requests may be adding to the old cache meanwhile.
    entries = list(old.user_cache.items())
    new.user_cache.update((user, e) for user, e in entries if user not in touched)
    return len(new.user_cache)


# ---------------------------------------------------------------------- per request


async def read_user(
    client: aioredis.Redis, keys: Keys, model: FactorModel, user: str, refit: bool = True
) -> UserEntry:
    """The user's factors as of ``model``'s version and their rated items: one round trip.

    With ``refit`` (``PREDICTOR_REFIT_USERS``, the default) the ranking model's user vector
    is folded in from the user's whole history in ``{p}:rated:{user}`` against this
    version's item vectors (:meth:`~predictor.model.RankingSet.fold_in`, the exact iALS user
    step): the streamed x_u was solved against statistics that hold the items' vectors as
    they were, and on long streams that staleness costs a fifth of NDCG@10 (ml-1m: 0.29 with
    the streamed vectors, 0.35 refit; docs/ranking_model.md). A user without a positive in
    the history keeps the streamed vector.
    """
    pipe = client.pipeline(transaction=False)
    newest_first = list(reversed(model.segments))
    kinds = ([USERS] if model.has_explicit else []) + ([RANKING_USERS] if model.ranking is not None else [])
    for kind in kinds:
        for s in newest_first:
            pipe.hget(keys.segment(s, kind), user)
    pipe.hgetall(keys.rated(user))
    pipe.exists(keys.meta(model.version))
    replies = await pipe.execute()
    if not replies[-1]:
        raise SnapshotChanged(f"version {model.version} was collected")
    records: dict[str, bytes | None] = {}
    for k, kind in enumerate(kinds):
        chunk = replies[k * len(newest_first) : (k + 1) * len(newest_first)]
        records[kind] = next((r for r in chunk if r is not None), None)
    history = {k.decode(): v.decode() for k, v in replies[len(kinds) * len(newest_first)].items()}
    rated_ids = frozenset(history)
    index = model.index
    known = [i for i in history if i in index]
    rated = np.fromiter((index[i] for i in known), dtype=np.int64, count=len(known))
    rank_vector = None
    ranking_record = records.get(RANKING_USERS)
    if ranking_record is not None and model.ranking is not None:
        rank_vector = decode_record(ranking_record, model.ranking.rank)[1]
    if refit and model.ranking is not None and len(rated):
        weights = model.ranking.history_weights([history[i] for i in known], model.rating_min, model.rating_max)
        folded = model.ranking.fold_in(rated, weights)
        if folded is not None:
            rank_vector = folded
    record = records.get(USERS)
    if record is None:
        return UserEntry(0.0, None, rated, rated_ids, rank_vector)
    bias, vector = decode_record(record, model.rank)
    return UserEntry(bias, vector, rated, rated_ids, rank_vector)


async def user_entry(
    client: aioredis.Redis, keys: Keys, model: FactorModel, user: str, cache_size: int, refit: bool = True
) -> UserEntry:
    """:func:`read_user` through the model's own cache (so a new version starts empty)."""
    entry = model.user_cache.get(user)
    if entry is not None:
        return entry
    entry = await read_user(client, keys, model, user, refit)
    if cache_size:
        cache = model.user_cache
        if len(cache) >= cache_size:
            # FIFO eviction: dicts keep insertion order; cheap and good enough here.
            with contextlib.suppress(StopIteration, KeyError, RuntimeError):
                del cache[next(iter(cache))]
        cache[user] = entry
    return entry
