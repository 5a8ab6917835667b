"""The online search's numpy-reference experiment: replay a rating file in time order through
K candidates side by side, prune by halving, serve the leader, and compare the leader's final
test score with the best single candidate in hindsight; and a drift test on a synthetic stream
whose planted model (rank) changes halfway.

``python -m modeler.search_eval RATINGS [--batch-size 1000] [--test-fraction 0.2]``

Protocol (one stream, no peeking): ratings sorted by timestamp; the last ``test_fraction`` is
the test set, never trained on. The first part is cut into micro-batches. Every live candidate
is scored prequentially on a batch (before it learns it), then learns it. The search
(:mod:`modeler.core.search`) prunes and respawns at its rungs and picks the leader. At the end
of the stream the leader's model is evaluated on the test set, and so is every candidate of
the initial grid trained alone on the whole stream (the "hindsight" runs).

Explicit model: prequential and test RMSE (the :class:`LocalStreamingALS` reference).
Ranking model: prequential NDCG@10 of a probe sample and test NDCG@10 (the
``LocalRankingALS`` reference), when :mod:`modeler.core.ranking` is present.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from typing import Any, NamedTuple, Protocol

import numpy as np

from common.datasets import RatingRow, read_ratings
from modeler.core.als_math import ALSParams, LocalStreamingALS, rmse
from modeler.core.search import (
    WARM_USER_POSITIVES,
    BatchLoss,
    HalvingSchedule,
    Params,
    SearchSettings,
    SearchState,
    probe_target_ranks,
    ranking_gains,
)

log = logging.getLogger(__name__)

#: A sensible explicit grid: rank × λ (ALSParams defaults otherwise).
EXPLICIT_GRID: list[Params] = [{"rank": r, "reg_param": lam} for r in (5, 20) for lam in (0.02, 0.1, 0.5, 2.0)]
#: The ranking model's: rank × α.
RANKING_GRID: list[Params] = [{"ranking_rank": r, "ranking_alpha": a} for r in (8, 32) for a in (0.5, 2.0, 8.0, 32.0)]


class Arm(Protocol):
    """One candidate model under replay."""

    def step(self, batch: Sequence[RatingRow]) -> BatchLoss: ...

    def test_score(self, test: Sequence[RatingRow]) -> float: ...


class ExplicitArm:
    """:class:`LocalStreamingALS`; the prequential loss is the batch's squared errors."""

    metric = "rmse"

    def __init__(self, params: ALSParams) -> None:
        self.model = LocalStreamingALS(params)

    def step(self, batch: Sequence[RatingRow]) -> BatchLoss:
        res = self.model.train([tuple(r) for r in batch])
        # The first batch has no model to be scored against: it teaches, it does not count.
        if self.model.batches <= 1:
            return BatchLoss(0.0, 0)
        return BatchLoss(float(res.prequential_sse), int(res.n_ratings))

    def test_score(self, test: Sequence[RatingRow]) -> float:
        pred = self.model.predict([r.user for r in test], [r.item for r in test])
        return float(rmse(np.array([r.rating for r in test]), pred))


def ranking_available() -> bool:
    try:
        import modeler.core.ranking  # noqa: F401
    except ImportError:
        return False
    return True


class RankingArm:
    """``LocalRankingALS``; the prequential loss is Σ NDCG@10 over a probe sample of the
    batch's positives (users known, items they had not seen), measured before learning."""

    metric = "ndcg@10"

    def __init__(self, params: Any, probe: int = 256, min_user_positives: int = WARM_USER_POSITIVES) -> None:
        from modeler.core.ranking import LocalRankingALS, event_weights

        self.model = LocalRankingALS(params)
        self.params = params
        self.probe = probe
        self.min_user_positives = min_user_positives
        self._weights = event_weights

    def _weights_of(self, ratings: np.ndarray) -> np.ndarray:
        p = self.params
        return np.asarray(self._weights(ratings, np.zeros_like(ratings), p.weighting, p.rating_min, p.rating_max))

    def _target_ranks(self, batch: Sequence[RatingRow]) -> list[int]:
        w = self._weights_of(np.array([r.rating for r in batch], dtype=np.float64))
        return probe_target_ranks(self.model, [r.user for r in batch], [r.item for r in batch], w > 0,
                                  np.array([r.timestamp for r in batch], dtype=np.int64), self.probe,
                                  min_user_positives=self.min_user_positives)

    def step(self, batch: Sequence[RatingRow]) -> BatchLoss:
        ranks = self._target_ranks(batch)
        ratings = np.array([r.rating for r in batch], dtype=np.float64)
        self.model.train([r.user for r in batch], [r.item for r in batch], ratings,
                         np.zeros_like(ratings), np.array([r.timestamp for r in batch], dtype=np.int64))
        ndcg, _ = ranking_gains(ranks)
        return BatchLoss(ndcg, len(ranks))

    def test_score(self, test: Sequence[RatingRow]) -> float:
        """Mean NDCG@10 over test users known to the model with a positive test item
        (:meth:`user_test_scores`)."""
        return mean_score(self.user_test_scores(test))

    def user_test_scores(self, test: Sequence[RatingRow]) -> dict[str, float]:
        """NDCG@10 per test user known to the model with a positive test item: binary
        relevance, DCG = Σ_{hits at 0-based position p < 10} 1/log2(p + 2), divided by the
        ideal DCG of min(10, #relevant) hits."""
        w = self._weights_of(np.array([r.rating for r in test], dtype=np.float64))
        relevant: dict[str, set[str]] = {}
        for r, wt in zip(test, w):
            if wt > 0:
                relevant.setdefault(r.user, set()).add(r.item)
        scores: dict[str, float] = {}
        for user, rel in relevant.items():
            if user not in self.model.users.index:
                continue
            top = self.model.recommend(user, 10)
            dcg = sum(1.0 / math.log2(p + 2.0) for p, i in enumerate(top) if i in rel)
            ideal = sum(1.0 / math.log2(p + 2.0) for p in range(min(10, len(rel))))
            scores[user] = dcg / ideal
        return scores


def mean_score(scores: dict[str, float]) -> float:
    return float(np.mean(list(scores.values()))) if scores else 0.0


def scored(arm: Arm, test: Sequence[RatingRow]) -> tuple[float, dict[str, float]]:
    """An arm's test score, and its per-user scores where it has them (the ranking arm)."""
    per_user = getattr(arm, "user_test_scores", None)
    if per_user is None:
        return arm.test_score(test), {}
    users = per_user(test)
    return mean_score(users), users


ArmFactory = Callable[[Params], Arm]


def explicit_factory(base: ALSParams | None = None) -> ArmFactory:
    base = base or ALSParams()

    def make(params: Params) -> Arm:
        kw: dict[str, Any] = dict(params)
        return ExplicitArm(replace(base, **kw))

    return make


def ranking_factory(base: Any = None) -> ArmFactory:
    base = base or ALSParams()
    return lambda params: RankingArm(replace(base, **params))


def time_split(rows: Sequence[RatingRow], test_fraction: float) -> tuple[list[RatingRow], list[RatingRow]]:
    """The stream's last ``test_fraction`` by time is the test set."""
    ordered = sorted(rows, key=lambda r: r.timestamp)
    cut = round(len(ordered) * (1.0 - test_fraction))
    return ordered[:cut], ordered[cut:]


#: A user with fewer ratings than this keeps them all in the stream (nothing to learn from).
PER_USER_MIN_RATINGS = 5


def per_user_time_split(rows: Sequence[RatingRow], test_fraction: float) -> tuple[list[RatingRow], list[RatingRow]]:
    """Each user's newest ``test_fraction`` of ratings (by time) is held out; the rest is the
    stream, in time order. Every user with ≥ :data:`PER_USER_MIN_RATINGS` ratings is tested,
    where :func:`time_split` tests only the users whose activity straddles one cut (28 users
    on ml-latest-small, 97 on ml-100k: too few to tell candidates 2% apart, docs/online_search.md)."""
    by_user: dict[str, list[RatingRow]] = {}
    for r in rows:
        by_user.setdefault(r.user, []).append(r)
    train: list[RatingRow] = []
    test: list[RatingRow] = []
    for user_rows in by_user.values():
        user_rows.sort(key=lambda r: (r.timestamp, r.item))
        n_test = round(len(user_rows) * test_fraction) if len(user_rows) >= PER_USER_MIN_RATINGS else 0
        cut = len(user_rows) - n_test
        train += user_rows[:cut]
        test += user_rows[cut:]
    train.sort(key=lambda r: r.timestamp)
    return train, test


SPLITS = {"time": time_split, "per_user": per_user_time_split}


def batches_of(rows: Sequence[RatingRow], size: int) -> list[list[RatingRow]]:
    return [list(rows[j:j + size]) for j in range(0, len(rows), size)]


@dataclass
class SearchRun:
    """What a replay with the search produced."""

    leader: str
    leader_params: Params
    leader_test: float
    switches: list[dict[str, Any]]
    live_final: list[str]
    candidates: list[dict[str, Any]]
    seconds: float
    max_live: int
    leader_user_scores: dict[str, float] = field(default_factory=dict)


def replay_search(factory: ArmFactory, candidates: Sequence[Params], settings: SearchSettings,
                  batches: Sequence[Sequence[RatingRow]], test: Sequence[RatingRow] | None = None,
                  on_batch: Callable[[int, SearchState], None] | None = None) -> SearchRun:
    """Every live candidate steps on each batch (scored, then learns), the search decides."""
    state = SearchState(candidates, settings)
    arms: dict[str, Arm] = {c.cid: factory(c.params) for c in state.live()}
    t0 = time.perf_counter()
    max_live = len(arms)
    for b, batch in enumerate(batches):
        losses = {cid: arm.step(batch) for cid, arm in arms.items()}
        d = state.observe(len(batch), losses)
        for cid in d.pruned:
            del arms[cid]
        for cid in d.spawned:
            # A respawned candidate starts cold at this point of the stream.
            arms[cid] = factory(state.get(cid).params)
        max_live = max(max_live, len(arms))
        if on_batch is not None:
            on_batch(b, state)
    seconds = time.perf_counter() - t0
    lead = state.leader_candidate()
    leader_test, leader_users = scored(arms[lead.cid], test) if test else (float("nan"), {})
    return SearchRun(
        leader=lead.cid, leader_params=dict(lead.params), leader_test=leader_test,
        switches=[s._asdict() for s in state.switches], live_final=[c.cid for c in state.live()],
        candidates=state.summary(), seconds=seconds, max_live=max_live, leader_user_scores=leader_users)


def hindsight(factory: ArmFactory, candidates: Sequence[Params], batches: Sequence[Sequence[RatingRow]],
              test: Sequence[RatingRow]) -> list[dict[str, Any]]:
    """Each candidate trained alone on the whole stream: its test score and time."""
    out = []
    for params in candidates:
        arm = factory(params)
        t0 = time.perf_counter()
        for batch in batches:
            arm.step(batch)
        score, users = scored(arm, test)
        out.append({"params": dict(params), "test": score, "seconds": time.perf_counter() - t0,
                    "user_scores": users})
    return out


def paired_gap_interval(leader: dict[str, float], best: dict[str, float], draws: int = 2000,
                        seed: int = 0) -> tuple[float, float] | None:
    """95% bootstrap interval (over test users, paired) of the relative gap (best − leader) /
    best of two per-user test scores: how finely the test set can tell two candidates apart.
    None without common users."""
    users = sorted(set(leader) & set(best))
    if not users:
        return None
    a = np.array([leader[u] for u in users])
    b = np.array([best[u] for u in users])
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, len(users), (draws, len(users)))
    gaps = (b[idx].mean(axis=1) - a[idx].mean(axis=1)) / np.maximum(b[idx].mean(axis=1), 1e-12)
    return float(np.percentile(gaps, 2.5)), float(np.percentile(gaps, 97.5))


class Comparison(NamedTuple):
    metric: str
    leader_test: float
    best_test: float
    best_params: Params
    gap: float  # relative shortfall of the leader against the best, ≥ 0 means worse


def compare(metric: str, run: SearchRun, solo: list[dict[str, Any]]) -> Comparison:
    higher = metric != "rmse"
    best = max(solo, key=lambda s: s["test"]) if higher else min(solo, key=lambda s: s["test"])
    # gap: how much worse the leader is, relative to the best: (best − leader)/best for a
    # score, (leader − best)/best for an error.
    gap = ((best["test"] - run.leader_test) if higher else (run.leader_test - best["test"])) / best["test"]
    return Comparison(metric, run.leader_test, best["test"], best["params"], gap)


def dataset_experiment(path: str, batch_size: int = 1000, test_fraction: float = 0.2,
                       settings: SearchSettings | None = None, models: Sequence[str] = ("explicit", "ranking"),
                       split: str = "time") -> dict[str, Any]:
    """The issue's goal on one rating file: leader vs best-in-hindsight, per model.
    ``split``: ``"time"`` (:func:`time_split`) or ``"per_user"`` (:func:`per_user_time_split`)."""
    train, test = SPLITS[split](read_ratings(path), test_fraction)
    batches = batches_of(train, batch_size)
    out: dict[str, Any] = {"ratings": path, "split": split, "train": len(train), "test": len(test),
                           "test_users": len({r.user for r in test}),
                           "batch_size": batch_size, "batches": len(batches)}
    plans: list[tuple[str, str, ArmFactory, list[Params]]] = [("explicit", "rmse", explicit_factory(), EXPLICIT_GRID)]
    if ranking_available():
        plans.append(("ranking", "ndcg@10", ranking_factory(), RANKING_GRID))
    else:
        out["ranking"] = {"skipped": "modeler.core.ranking is not on this branch"}
    for name, metric, factory, grid in plans:
        if name not in models:
            continue
        st = replace(settings or default_settings(len(batches) * batch_size), metric=metric)
        run = replay_search(factory, grid, st, batches, test)
        solo = hindsight(factory, grid, batches, test)
        cmp_ = compare(metric, run, solo)
        best_scores = next(h["user_scores"] for h in solo if h["params"] == cmp_.best_params)
        interval = paired_gap_interval(run.leader_user_scores, best_scores)
        for h in solo:
            h.pop("user_scores")
        out[name] = {
            "metric": metric, "settings": st.to_dict(), "leader": run.leader,
            "leader_params": run.leader_params, "leader_test": cmp_.leader_test,
            "best_single_test": cmp_.best_test, "best_single_params": cmp_.best_params,
            "relative_gap": cmp_.gap, "within_2pct": cmp_.gap <= 0.02,
            "relative_gap_ci95": interval, "test_users_scored": len(run.leader_user_scores) or None,
            "switches": run.switches, "live_at_end": run.live_final, "max_live": run.max_live,
            "search_seconds": run.seconds, "solo_seconds_total": sum(s["seconds"] for s in solo),
            "hindsight": solo,
            "candidates": [{k: c[k] for k in ("id", "params", "score", "state", "served", "parent", "events")}
                           for c in run.candidates],
        }
        log.info("%s %s: leader %s %s test %.4f, best single %.4f (%s), gap %+.2f%%", path, name,
                 run.leader, run.leader_params, cmp_.leader_test, cmp_.best_test, cmp_.best_params,
                 100 * cmp_.gap)
    return out


def default_settings(stream_events: int) -> SearchSettings:
    """Halving budget ~1/16 of the stream (rungs at 1/16, 1/8, 1/4, 1/2 of it), fading
    window ~1/8 of it."""
    budget = max(1000, stream_events // 16)
    return SearchSettings(fading=1.0 - 8.0 / max(stream_events, 8), min_events=budget // 2,
                          schedule=HalvingSchedule(budget=budget, eta=2.0))


def drift_experiment(rank_before: int = 2, rank_after: int = 16, n_users: int = 500, n_items: int = 1000,
                     per_half: int = 40_000, batch_size: int = 500, seed: int = 3,
                     settings: SearchSettings | None = None) -> dict[str, Any]:
    """A synthetic stream (:mod:`common.synthetic`) whose planted model changes halfway, from
    rank ``rank_before`` to a new model of rank ``rank_after`` over the same users and items.
    Candidates: ranks {2, 4, 8, 16} × λ {0.05, 0.5}, no pruning (so the drift is about the
    leader rule alone). Reports the leader before and after and how many events after the
    change the leader switched."""
    from common.synthetic import generate

    first = generate(n_users, n_items, per_half, rank=rank_before, seed=seed)[0]
    second = generate(n_users, n_items, per_half, rank=rank_after, seed=seed + 1,
                      start_timestamp=first[-1].timestamp + 1)[0]
    st = settings or SearchSettings(metric="rmse", fading=0.9993, min_events=2000, patience=2,
                                    switch_margin=0.005, respawn=False,
                                    schedule=HalvingSchedule(budget=10**12))
    grid: list[Params] = [{"rank": r, "reg_param": lam} for r in (2, 4, 8, 16) for lam in (0.05, 0.5)]
    drifted = _leader_track(list(first) + list(second), len(first), grid, st, batch_size)
    # Control: the same length of stream from ONE planted model: switches after "halfway"
    # here are the rule's false alarms.
    steady = generate(n_users, n_items, 2 * per_half, rank=rank_before, seed=seed)[0]
    control = _leader_track(list(steady), per_half, grid, st, batch_size)
    return {"rank_before": rank_before, "rank_after": rank_after, "batch_size": batch_size,
            "settings": st.to_dict(), "drift": drifted, "control_no_drift": control}


def _leader_track(stream: list[RatingRow], change: int, grid: list[Params], st: SearchSettings,
                  batch_size: int) -> dict[str, Any]:
    leaders: list[tuple[int, str]] = []

    def watch(b: int, state: SearchState) -> None:
        leaders.append((state.events, state.leader))

    run = replay_search(explicit_factory(), grid, st, batches_of(stream, batch_size), None, on_batch=watch)
    before = [cid for ev, cid in leaders if ev <= change]
    leader_at_change = before[-1] if before else leaders[0][1]
    after = [s for s in run.switches if s["events"] > change]
    params = {c["id"]: c["params"] for c in run.candidates}
    return {
        "events": len(stream), "change_at_events": change,
        "leader_at_change": leader_at_change, "leader_at_change_params": params[leader_at_change],
        "final_leader": run.leader, "final_leader_params": run.leader_params,
        "switches": run.switches, "switches_after_change": len(after),
        "events_to_switch_after_change": (after[0]["events"] - change) if after else None,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m modeler.search_eval", description=__doc__.splitlines()[0])
    parser.add_argument("ratings", nargs="*")
    parser.add_argument("--batch-size", type=int, default=1000)
    parser.add_argument("--test-fraction", type=float, default=0.2)
    parser.add_argument("--split", choices=sorted(SPLITS), default="time",
                        help="time: the stream's last part is the test; per_user: each user's newest part")
    parser.add_argument("--drift", action="store_true", help="run the drift experiment too")
    args = parser.parse_args(argv)
    from common.logging import setup_logging

    setup_logging("INFO")
    out: dict[str, Any] = {"datasets": [dataset_experiment(p, args.batch_size, args.test_fraction, split=args.split)
                                        for p in args.ratings]}
    if args.drift:
        out["drift"] = drift_experiment()
    print(json.dumps(out, indent=2, default=str))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
