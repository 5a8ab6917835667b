"""Every Redis key this project reads or writes, in one place.

All keys start with a prefix (``REDIS_PREFIX``, default ``rec``); tests isolate by prefix.
A model *version* is an immutable snapshot of the streaming ALS model. It is made of
*segments*: the segment written by version ``s`` holds the factor records of every user and
item that changed in that micro-batch (a *delta*), or of all of them (a *full* segment).
A version carries up to two *factor sets*: the explicit rating model (``users``/``items``:
μ + b_u + b_i + U·P predicts a rating) and the ranking model (``ranking_users``/
``ranking_items``: implicit-feedback ALS, x_u·y_i is a ranking score, not a rating). The
metadata field ``models`` lists which sets the version has; a stream of implicit events
only has no explicit set. A version's segments, read oldest to newest with later records overriding earlier ones,
give the complete model. The modeler starts a new full segment when the chain grows long,
so readers touch a bounded number of hashes.

========================================  ========  =============================================
key                                       type      contents
========================================  ========  =============================================
``{p}:current``                           string    JSON pointer ``{"version": v, "segments":
                                                    [s0, ..., v]}``: the visible version. Flipped
                                                    last, in MULTI/EXEC with ``{p}:ver:{v}``.
``{p}:ver:{v}``                           hash      version metadata (see :data:`META_FIELDS`);
                                                    ``offsets`` = JSON ``{"topic:partition":
                                                    next offset}`` consumed by this version;
                                                    extra field ``model_state`` (modeler-only
                                                    JSON: running rating sum, batch number,
                                                    hyper-parameters) for an exact restore;
                                                    with a search, field ``search_state`` (JSON:
                                                    the search's candidates, scores, schedule,
                                                    leader and each live candidate's scalars).
``{p}:versions``                          zset      live versions, score = created unix time;
                                                    garbage collection walks it.
``{p}:seg:{s}:users``                     hash      user id -> factor record (float32 LE bytes:
                                                    ``[bias, f1..f_rank]``, see ``codec``)
``{p}:seg:{s}:items``                     hash      item id -> factor record
``{p}:seg:{s}:ranking:users``             hash      the RANKING model's (implicit-feedback ALS)
                                                    user id -> record, same codec, bias slot 0.0
                                                    (reserved); rank ``ranking_rank`` of the meta
``{p}:seg:{s}:ranking:items``             hash      the ranking model's item id -> record
``{p}:seg:{s}:state:{name}``              hash      modeler-only per-key state versioned like the
                                                    factor segments (``user_counts``,
                                                    ``item_counts``: id -> decimal count); GC'd
                                                    with its segment. Readers may ignore it.
``{p}:seg:{s}:search:{kind}``             hash      modeler-only: the online search's candidates
                                                    (``MODEL_CANDIDATES``), field ``{cid}:{id}``
                                                    -> factor record of candidate ``cid`` (same
                                                    codec, its own rank; kinds as above), the
                                                    changed rows of every live candidate (all of
                                                    them in a full segment); restore after a
                                                    crash reads them. GC'd with its segment.
``{p}:seg:{s}:search:{kind}:counts``      hash      ``{cid}:{id}`` -> decimal count of that row
``{p}:rated:{user}``                      hash      item id -> rating (decimal string): what the
                                                    user has rated (top-N excludes these).
                                                    Not versioned; writes are idempotent.
``{p}:rated_order:{user}``                zset      only with ``MODELER_RATED_CAP`` > 0: item ->
                                                    batch that last wrote it (recency); the
                                                    rated hash keeps the newest ``cap`` items.
``{p}:metrics``                           list      JSON per micro-batch, newest first, capped
                                                    (version, ratings_seen, prequential_rmse,
                                                    ratings_per_s, batch_seconds, lag, time)
``{p}:catalog``                           hash      item id -> JSON ``{"title", "genres": [..]}``
``{p}:popular``                           string    JSON ``[[item, count], ...]`` most rated
                                                    first: the fallback before any model exists
``{p}:lease:modeler``                     string    owner token of the one modeler allowed to
                                                    publish (SET NX PX, renewed each batch)
``{p}:events`` (pub/sub channel)          channel   a new version's number, published in the
                                                    same MULTI/EXEC that flips ``current``
``{p}:prediction:{kind}:{id}``            string    JSON result of a jiminy-compatible request
                                                    (kind ``ratings`` or ``ranks``), with a TTL
========================================  ========  =============================================

Readers: ``GET {p}:current``, then read ``{p}:ver:{v}`` and the listed segments. A segment
referenced by any version still in ``{p}:versions`` is never deleted, and the modeler keeps
the last few versions, so a reader that fetched the pointer a moment ago can finish. A
reader that finds a segment missing re-reads the pointer and starts over.
"""

from __future__ import annotations

from dataclasses import dataclass

USERS = "users"
ITEMS = "items"
RANKING_USERS = "ranking_users"
RANKING_ITEMS = "ranking_items"
EXPLICIT_KINDS = (USERS, ITEMS)
RANKING_KINDS = (RANKING_USERS, RANKING_ITEMS)
KINDS = EXPLICIT_KINDS + RANKING_KINDS

# Names of the factor sets a version may carry (meta field ``models``).
EXPLICIT = "explicit"
RANKING = "ranking"
MODEL_KINDS = {EXPLICIT: EXPLICIT_KINDS, RANKING: RANKING_KINDS}

# Fields of {p}:ver:{v}. Scalars are decimal strings; structured values are JSON.
META_FIELDS = (
    "version",  # int
    "rank",  # int
    "mu",  # float: global mean of every rating seen
    "reg_param",  # float: λ, used by the predictor's fold-in
    "n_users",  # int
    "n_items",  # int
    "ratings_seen",  # int: valid ratings the model has learned from, ever
    "created",  # float unix time
    "segments",  # JSON list of segment ids, oldest first
    "offsets",  # JSON {"topic:partition": next offset to read}
    "metrics",  # JSON dict of this batch's training metrics
    "popular",  # JSON [[item, count], ...], top items by number of ratings
    "rating_min",  # float
    "rating_max",  # float
    "models",  # JSON list of factor sets present: ["explicit", "ranking"] (default ["explicit"])
    "ranking_rank",  # int: rank of the ranking set (0 when absent)
    "ranking_reg_param",  # float: λ of the ranking model, used by the iALS fold-in
    "ranking_alpha",  # float: confidence scale α (c = 1 + α·w), used by the iALS fold-in
    "ranking_weighting",  # JSON common.feedback.Weighting: event -> w, for the same fold-in
    # JSON list, the online hyper-parameter search's candidates (default []): per candidate
    # {"id", "params": {...}, "metric", "score", "events", "state": "live"|"pruned",
    #  "served": bool, "parent", "history": [[events, score], ...] (bounded)}
    "candidates",
)


@dataclass(frozen=True)
class Keys:
    """Key names under one prefix: ``Keys("rec").segment(7, "items") == "rec:seg:7:items"``."""

    prefix: str = "rec"

    @property
    def current(self) -> str:
        return f"{self.prefix}:current"

    @property
    def versions(self) -> str:
        return f"{self.prefix}:versions"

    @property
    def events(self) -> str:
        return f"{self.prefix}:events"

    @property
    def metrics(self) -> str:
        return f"{self.prefix}:metrics"

    @property
    def catalog(self) -> str:
        return f"{self.prefix}:catalog"

    @property
    def popular(self) -> str:
        return f"{self.prefix}:popular"

    @property
    def lease(self) -> str:
        return f"{self.prefix}:lease:modeler"

    def meta(self, version: int) -> str:
        return f"{self.prefix}:ver:{version}"

    def segment(self, segment: int, kind: str) -> str:
        if kind not in KINDS:
            raise ValueError(f"kind must be one of {KINDS}, not {kind!r}")
        if kind in RANKING_KINDS:
            return f"{self.prefix}:seg:{segment}:ranking:{kind.removeprefix('ranking_')}"
        return f"{self.prefix}:seg:{segment}:{kind}"

    def search(self, segment: int, kind: str) -> str:
        """The search candidates' factor records of one kind in a segment (see the table)."""
        if kind not in KINDS:
            raise ValueError(f"kind must be one of {KINDS}, not {kind!r}")
        return f"{self.prefix}:seg:{segment}:search:{kind}"

    def search_counts(self, segment: int, kind: str) -> str:
        return f"{self.search(segment, kind)}:counts"

    def search_keys(self, segment: int) -> list[str]:
        """Every search key a segment may have (for clearing and garbage collection)."""
        return [name for k in KINDS for name in (self.search(segment, k), self.search_counts(segment, k))]

    def state(self, segment: int, name: str) -> str:
        """Modeler-only per-key state of a segment (e.g. rating counts), see the table."""
        return f"{self.prefix}:seg:{segment}:state:{name}"

    def prediction(self, kind: str, prediction_id: str) -> str:
        return f"{self.prefix}:prediction:{kind}:{prediction_id}"

    def rated(self, user: str) -> str:
        return f"{self.prefix}:rated:{user}"

    def rated_order(self, user: str) -> str:
        """Recency index of a capped rated history (see the table)."""
        return f"{self.prefix}:rated_order:{user}"
