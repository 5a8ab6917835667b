"""Settings of the modeler service (environment variables; built in ``main()``)."""

from __future__ import annotations

from typing import Literal

from pydantic import Field, field_validator

from common.settings import CommonSettings, renamed


class ModelerSettings(CommonSettings):
    # Streaming ALS parameters; unset means the default of modeler.spark.streaming_als (tuned there).
    model_rank: int | None = Field(None, alias="MODEL_RANK", ge=1, le=512)
    model_iterations: int | None = Field(None, alias="MODEL_ITERATIONS", ge=1)
    model_reg_param: float | None = Field(None, alias="MODEL_REG_PARAM", ge=0.0)
    model_learning_rate: float | None = Field(None, alias="MODEL_LEARNING_RATE", gt=0.0)
    model_seed: int | None = Field(None, alias="MODEL_SEED")
    # Partitions of the model's state RDD; unset: 1 on a local master (one fused task per
    # batch, see modeler.spark.default_model_partitions), the executors' cores on a cluster.
    # A stored model keeps its own.
    model_num_partitions: int | None = Field(None, alias="MODEL_NUM_PARTITIONS", ge=1)
    model_init_scale: float | None = Field(None, alias="MODEL_INIT_SCALE", gt=0.0)
    # Bounded replay of past ratings (0 turns it off).
    model_reservoir_size: int | None = Field(None, alias="MODEL_RESERVOIR_SIZE", ge=0)
    model_replay_ratio: float | None = Field(None, alias="MODEL_REPLAY_RATIO", ge=0.0)
    # "rls" (vectors solve their accumulated least squares) or "sgd" (the seeds' step).
    model_vector_step: Literal["rls", "sgd"] | None = Field(None, alias="MODEL_VECTOR_STEP")

    # The ranking model (implicit-feedback ALS, docs/ranking_model.md); unset means the
    # default of modeler.core.als_math.ALSParams (chosen on validation there).
    model_ranking: bool | None = Field(None, alias="MODEL_RANKING")
    model_ranking_rank: int | None = Field(None, alias="MODEL_RANKING_RANK", ge=1, le=512)
    model_ranking_reg_param: float | None = Field(None, alias="MODEL_RANKING_REG_PARAM", ge=0.0)
    model_ranking_alpha: float | None = Field(None, alias="MODEL_RANKING_ALPHA", ge=0.0)
    model_ranking_iterations: int | None = Field(None, alias="MODEL_RANKING_ITERATIONS", ge=1)
    model_ranking_replay_ratio: float | None = Field(None, alias="MODEL_RANKING_REPLAY_RATIO", ge=0.0)
    # Per-key history: newest positives kept per key for exact re-solves (0: off, then the
    # replay above is used), and the sweep (history entries re-solved per batch positive).
    model_ranking_history: int | None = Field(None, alias="MODEL_RANKING_HISTORY", ge=0, le=100_000)
    model_ranking_sweep: float | None = Field(None, alias="MODEL_RANKING_SWEEP", ge=0.0)
    # Positives per batch probed for prequential recall@10 (one-partition layout; 0: off).
    model_ranking_probe_size: int | None = Field(None, alias="MODEL_RANKING_PROBE_SIZE", ge=0)
    # Rating -> weight (common.feedback.Weighting): a rating at or above LIKED (fraction of
    # the scale) is a positive of weight 1 + SLOPE·(t − LIKED), one below weighs LOW_WEIGHT;
    # an implicit weight v becomes log1p(v) ("log") or v ("linear").
    model_ranking_liked: float | None = Field(None, alias="MODEL_RANKING_LIKED", ge=0.0, le=1.0)
    model_ranking_slope: float | None = Field(None, alias="MODEL_RANKING_SLOPE", ge=0.0)
    model_ranking_low_weight: float | None = Field(None, alias="MODEL_RANKING_LOW_WEIGHT", ge=0.0)
    model_ranking_implicit: Literal["log", "linear"] | None = Field(None, alias="MODEL_RANKING_IMPLICIT")
    # Implicit events with a weight above this are dead-lettered (reason "weight: ...").
    event_max_weight: float = Field(1_000_000.0, alias="EVENT_MAX_WEIGHT", gt=0.0)

    # The online hyper-parameter search (docs/online_search.md, modeler.core.search): a JSON
    # list of parameter objects, or {"ranges": ..., "base": ...}; unset: one model, no search.
    # Each candidate is ALSParams (the settings above) with its own values.
    model_candidates: str | None = Field(None, alias="MODEL_CANDIDATES")
    # What the candidates are judged on; unset: "ndcg@10" when every searched parameter is
    # the ranking model's (ranking_*), else "rmse". Unset ones below: SearchSettings defaults.
    model_search_metric: Literal["rmse", "ndcg@10", "recall@10"] | None = Field(None, alias="MODEL_SEARCH_METRIC")
    model_search_budget: int | None = Field(None, alias="MODEL_SEARCH_BUDGET", ge=1)  # events to the first rung
    model_search_eta: float | None = Field(None, alias="MODEL_SEARCH_ETA", gt=1.0)  # a rung keeps ⌈m/η⌉
    model_search_max_gap: int | None = Field(None, alias="MODEL_SEARCH_MAX_GAP", ge=0)  # events between late rungs
    model_search_fading: float | None = Field(None, alias="MODEL_SEARCH_FADING", gt=0.0, le=1.0)  # β per event
    model_search_min_events: int | None = Field(None, alias="MODEL_SEARCH_MIN_EVENTS", ge=0)
    model_search_switch_margin: float | None = Field(None, alias="MODEL_SEARCH_SWITCH_MARGIN", ge=0.0)
    model_search_patience: int | None = Field(None, alias="MODEL_SEARCH_PATIENCE", ge=1)
    model_search_respawn: bool | None = Field(None, alias="MODEL_SEARCH_RESPAWN")
    model_search_population: int | None = Field(None, alias="MODEL_SEARCH_POPULATION", ge=0)  # live after respawns
    model_search_perturb: float | None = Field(None, alias="MODEL_SEARCH_PERTURB", gt=1.0)
    # Ranking search: positives probed per batch, and how many a user must have learned.
    model_search_probe_size: int | None = Field(None, alias="MODEL_SEARCH_PROBE_SIZE", ge=1)
    model_search_min_user_positives: int | None = Field(None, alias="MODEL_SEARCH_MIN_USER_POSITIVES", ge=1)

    # Micro-batch trigger: a batch reads at most this many records (over all partitions)...
    batch_max_records: int = Field(
        20_000, validation_alias=renamed("MODELER_BATCH_MAX_RECORDS", was="BATCH_MAX_RECORDS"), ge=1)
    # ...and the stream is polled at least this often while it is idle.
    batch_max_interval_s: float = Field(
        1.0, validation_alias=renamed("MODELER_BATCH_MAX_INTERVAL_S", was="BATCH_MAX_INTERVAL_S"), gt=0.0)
    # Partitions of the ratings topic created when it does not exist yet.
    ratings_topic_partitions: int = Field(
        4, validation_alias=renamed("MODELER_RATINGS_TOPIC_PARTITIONS", was="RATINGS_TOPIC_PARTITIONS"), ge=1)

    # Publishing: keep this many versions live; start a full segment after this many deltas.
    keep_versions: int = Field(3, validation_alias=renamed("MODELER_KEEP_VERSIONS", was="KEEP_VERSIONS"), ge=2)
    max_segment_chain: int = Field(
        8, validation_alias=renamed("MODELER_MAX_SEGMENT_CHAIN", was="MAX_SEGMENT_CHAIN"), ge=1)
    # ... but only once the deltas since the last full segment hold this share of its
    # records (0: always at the cap); a chain never grows past 8 × the cap. On a large model
    # each delta is a small share of it, so a full segment (the whole model, a spike in the
    # batch that writes it) is written every ~1/share × model / delta versions, not every 8.
    full_segment_share: float = Field(1.0, alias="MODELER_FULL_SEGMENT_SHARE", ge=0.0)
    # A replaced version stays readable at least this long (readers finishing a read).
    gc_min_age_s: float = Field(5.0, validation_alias=renamed("MODELER_GC_MIN_AGE_S", was="GC_MIN_AGE_S"), ge=0.0)
    # Items in the published popular list (the fallback for unknown users).
    popular_size: int = Field(100, validation_alias=renamed("MODELER_POPULAR_SIZE", was="POPULAR_SIZE"), ge=1)
    # Items kept per user in {p}:rated:{user} (the exclusion list and the predictor's
    # refit): the newest N, ordered by a companion sorted set; 0 keeps every one, without
    # that index. Off by default: on ML-25M-shaped data a cap of 1,000 keeps 95% of the
    # entries while the index costs about as much as the hash again (docs/scale.md), so it
    # pays only for streams with unbounded per-user histories (plays, bots).
    rated_cap: int = Field(0, alias="MODELER_RATED_CAP", ge=0)
    # Where the model's partitions live between batches (docs/scale.md §8): "rdd", a cached
    # RDD pickled through the JVM whole every batch (cheaper for small models: ml-latest-small
    # runs ~1.5x faster); "resident", a state server per application and host, so a batch
    # moves only the rows it touches (faster from ~175k keys on ML-25M-shaped data, and
    # 0.8-1.5 GB smaller there).
    state_store: Literal["resident", "rdd"] = Field("rdd", alias="MODELER_STATE_STORE")
    # Per-batch metrics records kept in Redis ({p}:metrics).
    metrics_history: int = Field(1000, validation_alias=renamed("MODELER_METRICS_HISTORY", was="METRICS_HISTORY"), ge=1)
    # Single-writer lease: another modeler waits until this has expired.
    lease_ttl_s: float = Field(15.0, alias="MODELER_LEASE_TTL_S", gt=0.0)

    # Retries of Kafka/Redis/Spark trouble: exponential backoff capped here.
    retry_max_backoff_s: float = Field(
        10.0, validation_alias=renamed("MODELER_RETRY_MAX_BACKOFF_S", was="RETRY_MAX_BACKOFF_S"), gt=0.0)

    metrics_port: int = Field(9400, alias="MODELER_METRICS_PORT", ge=0)
    # Optional batch bootstrap (file of ratings) used only when Redis holds no model.
    bootstrap_ratings: str | None = Field(
        None, validation_alias=renamed("MODELER_BOOTSTRAP_RATINGS", was="BOOTSTRAP_RATINGS"))
    checkpoint_dir: str | None = Field(
        None, validation_alias=renamed("MODELER_CHECKPOINT_DIR", was="SPARK_CHECKPOINT_DIR"))
    log_format: str = Field("json", alias="LOG_FORMAT")

    @field_validator("model_candidates")
    @classmethod
    def _check_candidates(cls, value: str | None) -> str | None:
        """A bad MODEL_CANDIDATES fails at start-up with the field named (not at the first batch)."""
        if value is None or not value.strip():
            return None
        from modeler.core.search import parse_candidates

        parse_candidates(value)  # SearchConfigError is a ValueError: pydantic names the field
        return value
