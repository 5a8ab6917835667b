"""Online hyper-parameter search on the stream: candidates, prequential scores, halving, leader.
Long because the parameter parsing, the fading score, the halving schedule and the leader rule
form one state machine whose JSON state is stored and restored whole.

numpy and the standard library only (no Spark, no Redis): the service feeds it one batch's
prequential losses per candidate and acts on what it answers (prune, respawn, switch).

The loop, per micro-batch (every candidate has seen exactly the same events):

1. Each live candidate is scored on the batch BEFORE it learns it (prequential): the batch's
   squared errors for the explicit model (RMSE), NDCG@10 / recall@10 gains of probed events
   for the ranking model. :meth:`SearchState.observe` folds them into a fading score.
2. At a rung of the halving schedule, the worse half of the live candidates old enough to be
   judged is pruned; the candidate being served (the leader) never is.
3. Freed slots may respawn around the current best: its parameters perturbed (multiplied or
   divided by a step), in the spirit of SSPT (Veloso et al., 2021, "Hyperparameter
   self-tuning for data streams"), which keeps a small population moving around the best
   model instead of a fixed grid. Respawns refill the population only up to ``population``
   live candidates (default 2: the leader and one challenger), never beyond the initial
   size K: the halving's savings are kept (K live candidates forever would cost K times one
   model for the whole stream), and memory stays at most K times one model.
4. The leader is switched when another live candidate has beaten it by ``switch_margin`` for
   ``patience`` consecutive batches; the answer carries the reason (a new version is then
   published by the caller).

Fading score (Gama, Sebastião & Rodrigues, 2013, "On evaluating stream learning algorithms"):
with fading factor β per event and a batch of n events whose losses sum to L::

    S ← β^n · S + L          N ← β^n · N + n          score = S / N   (RMSE: √(S / N))

(the batch's events are treated as simultaneous, so the order inside a batch does not
matter). The effective window is about 1 / (1 − β) events, which is what lets a change in the
stream change the winner.

State round-trips through JSON (:meth:`SearchState.to_json` / :meth:`SearchState.from_json`),
so after a crash the same candidates resume with their scores.
"""

from __future__ import annotations

import json
import math
import zlib
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, NamedTuple

import numpy as np

from common.errors import StreamrecError


class SearchConfigError(StreamrecError, ValueError):
    """``MODEL_CANDIDATES`` or a search setting is invalid; the message names the field."""


# ---------------------------------------------------------------------------------------------
# The parameter space and MODEL_CANDIDATES
# ---------------------------------------------------------------------------------------------


class ParamSpec(NamedTuple):
    """One tunable parameter: integer or float, inclusive bounds, and whether it is searched on
    a log scale (perturbation multiplies it rather than adding to it)."""

    integer: bool
    low: float
    high: float
    log: bool = True


#: Every parameter a candidate may set. ``rank``/``reg_param``/... are the explicit model's,
#: ``ranking_*`` the ranking model's (names of :class:`modeler.core.als_math.ALSParams`).
PARAM_SPACE: dict[str, ParamSpec] = {
    "rank": ParamSpec(True, 1, 512),
    "reg_param": ParamSpec(False, 0.0, 100.0),
    "reg_bias": ParamSpec(False, 0.0, 100.0),
    "learning_rate": ParamSpec(False, 1e-6, 10.0),
    "iterations": ParamSpec(True, 1, 50),
    "forgetting": ParamSpec(False, 0.5, 1.0, log=False),
    "maturity": ParamSpec(False, 0.0, 1e4),
    "replay_ratio": ParamSpec(False, 0.0, 100.0),
    "reservoir_size": ParamSpec(True, 0, 10_000_000),
    "ranking_rank": ParamSpec(True, 1, 512),
    "ranking_reg_param": ParamSpec(False, 0.0, 100.0),
    "ranking_alpha": ParamSpec(False, 0.0, 1e4),
    "ranking_iterations": ParamSpec(True, 1, 50),
    "ranking_forgetting": ParamSpec(False, 0.5, 1.0, log=False),
    "ranking_replay_ratio": ParamSpec(False, 0.0, 100.0),
}

Params = dict[str, float | int]


def _check_value(where: str, name: str, value: Any) -> float | int:
    spec = PARAM_SPACE.get(name)
    if spec is None:
        raise SearchConfigError(f"{where}.{name}: unknown parameter (known: {', '.join(sorted(PARAM_SPACE))})")
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise SearchConfigError(f"{where}.{name}: must be a number, got {value!r}")
    if not math.isfinite(value):
        raise SearchConfigError(f"{where}.{name}: must be finite, got {value!r}")
    if spec.integer and float(value) != int(value):
        raise SearchConfigError(f"{where}.{name}: must be an integer, got {value!r}")
    if not spec.low <= value <= spec.high:
        raise SearchConfigError(f"{where}.{name}: must be in [{spec.low:g}, {spec.high:g}], got {value!r}")
    return int(value) if spec.integer else float(value)


def validate_params(obj: Any, where: str = "candidate") -> Params:
    """One candidate's parameter object, checked against :data:`PARAM_SPACE`."""
    if not isinstance(obj, Mapping):
        raise SearchConfigError(f"{where}: must be a JSON object of parameters, got {type(obj).__name__}")
    if not obj:
        raise SearchConfigError(f"{where}: must set at least one parameter")
    return {str(k): _check_value(where, str(k), v) for k, v in sorted(obj.items())}


def _range_values(where: str, name: str, spec_obj: Any) -> list[float | int]:
    """Values of one ``ranges`` entry: a list, or ``{"min", "max", "num"[, "log"]}``."""
    if isinstance(spec_obj, list):
        if not spec_obj:
            raise SearchConfigError(f"{where}.{name}: empty list of values")
        return [_check_value(where, name, v) for v in spec_obj]
    if not isinstance(spec_obj, Mapping):
        raise SearchConfigError(f"{where}.{name}: must be a list or {{\"min\", \"max\", \"num\"}}")
    for key in ("min", "max", "num"):
        if key not in spec_obj:
            raise SearchConfigError(f"{where}.{name}.{key}: missing")
    lo = _check_value(where, name, spec_obj["min"])
    hi = _check_value(where, name, spec_obj["max"])
    num = spec_obj["num"]
    if isinstance(num, bool) or not isinstance(num, int) or not 1 <= num <= 64:
        raise SearchConfigError(f"{where}.{name}.num: must be an integer in [1, 64], got {num!r}")
    if hi < lo:
        raise SearchConfigError(f"{where}.{name}: max {hi!r} is below min {lo!r}")
    log = bool(spec_obj.get("log", PARAM_SPACE[name].log)) and lo > 0
    vals: list[float] = []
    for j in range(num):
        t = j / (num - 1) if num > 1 else 0.0
        # Log ranges are evenly spaced in log(x): x_j = lo·(hi/lo)^t; linear ones lo + t·(hi − lo).
        vals.append(lo * (hi / lo) ** t if log else lo + t * (hi - lo))
    out = [_check_value(where, name, round(v) if PARAM_SPACE[name].integer else v) for v in vals]
    return list(dict.fromkeys(out))  # integer rounding may merge neighbours


def parse_candidates(raw: str | Sequence[Any] | Mapping[str, Any], name: str = "MODEL_CANDIDATES",
                     max_candidates: int = 64) -> list[Params]:
    """The candidate parameter sets of ``MODEL_CANDIDATES``.

    Either a JSON list of parameter objects (``[{"rank": 10, "reg_param": 0.05}, ...]``), or
    ``{"ranges": {"rank": [5, 10, 20], "reg_param": {"min": 0.01, "max": 1, "num": 3}}}``
    whose cross product is taken (``"base": {...}`` sets the fixed ones). Duplicates are an
    error: they would waste a slot.
    """
    if isinstance(raw, str):
        try:
            raw = json.loads(raw)
        except json.JSONDecodeError as exc:
            raise SearchConfigError(
                f"{name}: not valid JSON ({exc.msg} at line {exc.lineno} column {exc.colno})") from exc
    cands: list[Params]
    if isinstance(raw, Mapping):
        unknown = set(raw) - {"ranges", "base"}
        if unknown:
            raise SearchConfigError(f"{name}.{sorted(unknown)[0]}: unknown key (expected 'ranges', 'base')")
        ranges = raw.get("ranges")
        if not isinstance(ranges, Mapping) or not ranges:
            raise SearchConfigError(f"{name}.ranges: must be a non-empty object of parameter -> values")
        base = validate_params(raw["base"], f"{name}.base") if raw.get("base") else {}
        cands = [dict(base)]
        for pname in sorted(ranges):
            values = _range_values(f"{name}.ranges", str(pname), ranges[pname])
            cands = [{**c, str(pname): v} for c in cands for v in values]
            if len(cands) > max_candidates:
                raise SearchConfigError(f"{name}.ranges: more than {max_candidates} candidates")
    elif isinstance(raw, Sequence):
        cands = [validate_params(obj, f"{name}[{j}]") for j, obj in enumerate(raw)]
    else:
        raise SearchConfigError(f"{name}: must be a JSON list of parameter objects or {{\"ranges\": ...}}")
    if not cands:
        raise SearchConfigError(f"{name}: no candidates")
    if len(cands) > max_candidates:
        raise SearchConfigError(f"{name}: {len(cands)} candidates, at most {max_candidates}")
    seen: dict[str, int] = {}
    for j, c in enumerate(cands):
        key = json.dumps(c, sort_keys=True)
        if key in seen:
            raise SearchConfigError(f"{name}[{j}]: duplicate of candidate {seen[key]}")
        seen[key] = j
    return [dict(sorted(c.items())) for c in cands]


# ---------------------------------------------------------------------------------------------
# Prequential scores
# ---------------------------------------------------------------------------------------------


class Metric(NamedTuple):
    """What a score is: its name, whether higher is better, whether it is √(S/N) (RMSE)."""

    name: str
    higher_is_better: bool
    root: bool = False


METRICS: dict[str, Metric] = {
    "rmse": Metric("rmse", higher_is_better=False, root=True),
    "ndcg@10": Metric("ndcg@10", higher_is_better=True),
    "recall@10": Metric("recall@10", higher_is_better=True),
}


class BatchLoss(NamedTuple):
    """One candidate's prequential sums on one batch: ``total`` (Σ squared errors, or Σ
    NDCG/recall gains) over ``n`` scored events."""

    total: float
    n: int


@dataclass
class FadingScore:
    """Fading-factor prequential mean (module docstring): S ← β^n·S + L, N ← β^n·N + n."""

    fading: float
    s: float = 0.0
    n: float = 0.0
    events: int = 0  # scored events ever, unfaded: the "age" the schedule judges

    def add(self, loss: BatchLoss) -> None:
        if loss.n <= 0:
            return
        decay = self.fading ** loss.n
        self.s = decay * self.s + float(loss.total)
        self.n = decay * self.n + float(loss.n)
        self.events += int(loss.n)

    def value(self, metric: Metric) -> float | None:
        if self.n <= 0:
            return None
        mean = self.s / self.n
        return math.sqrt(max(mean, 0.0)) if metric.root else mean


# ---------------------------------------------------------------------------------------------
# Successive halving schedule
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class HalvingSchedule:
    """Rungs at a budget of events, and how many of the judged candidates a rung keeps.

    Rung k is reached when the stream has delivered ``rung_events(k)`` events::

        r_0 = budget,   r_{k+1} = r_k + min(r_k·(η − 1), max_gap)

    i.e. geometric (budget·η^k, classic successive halving) until the gap reaches
    ``max_gap`` events, then every ``max_gap`` events, so that respawned candidates keep
    being judged on an endless stream. A rung keeps ⌈m / η⌉ of the m candidates it judges
    (never fewer than ``min_live`` live candidates overall).
    """

    budget: int = 2000
    eta: float = 2.0
    min_live: int = 1
    max_gap: int = 0  # 0: budget·η³

    def __post_init__(self) -> None:
        if self.budget < 1:
            raise SearchConfigError(f"budget: must be >= 1 event, got {self.budget!r}")
        if not self.eta > 1.0:
            raise SearchConfigError(f"eta: must be > 1, got {self.eta!r}")
        if self.min_live < 1:
            raise SearchConfigError(f"min_live: must be >= 1, got {self.min_live!r}")
        if self.max_gap < 0:
            raise SearchConfigError(f"max_gap: must be >= 0, got {self.max_gap!r}")

    @property
    def gap_cap(self) -> int:
        return self.max_gap or round(self.budget * self.eta ** 3)

    def rung_events(self, k: int) -> int:
        r = float(self.budget)
        for _ in range(k):
            r += min(r * (self.eta - 1.0), float(self.gap_cap))
        return round(r)

    def keep(self, judged: int) -> int:
        """How many of ``judged`` candidates survive a rung: ⌈judged / η⌉."""
        return max(1, math.ceil(judged / self.eta - 1e-9))


# ---------------------------------------------------------------------------------------------
# Candidates and the search state
# ---------------------------------------------------------------------------------------------

LIVE = "live"
PRUNED = "pruned"


@dataclass
class Candidate:
    """One configuration under evaluation; its score and a bounded history of it."""

    cid: str
    params: Params
    born: int  # stream events delivered before it started learning
    parent: str | None = None
    state: str = LIVE
    score: FadingScore = field(default_factory=lambda: FadingScore(1.0))
    history: list[list[float]] = field(default_factory=list)  # [[events, score], ...]
    pruned_at: int | None = None

    def value(self, metric: Metric) -> float | None:
        return self.score.value(metric)


class Switch(NamedTuple):
    """A change of the served candidate, and why."""

    events: int
    old: str
    new: str
    reason: str


class Decision(NamedTuple):
    """What one batch changed: pruned and respawned candidates, a leader switch (or None)."""

    pruned: tuple[str, ...]
    spawned: tuple[str, ...]
    switch: Switch | None


@dataclass(frozen=True)
class SearchSettings:
    """How the search judges: metric, fading factor β per event, schedule, switch rule,
    respawn (perturbation step, multiplicative), history bound, RNG seed."""

    metric: str = "rmse"
    fading: float = 0.9995
    schedule: HalvingSchedule = field(default_factory=HalvingSchedule)
    switch_margin: float = 0.01
    patience: int = 2
    min_events: int = 500  # no switch to, nor pruning of, a candidate scored on fewer events
    respawn: bool = True
    # Live candidates respawns refill up to (0: the initial K, every freed slot respawns).
    population: int = 2
    perturb: float = 1.5
    history_points: int = 64
    seed: int = 42

    def __post_init__(self) -> None:
        if self.metric not in METRICS:
            raise SearchConfigError(f"metric: must be one of {sorted(METRICS)}, got {self.metric!r}")
        if not 0.0 < self.fading <= 1.0:
            raise SearchConfigError(f"fading: must be in (0, 1], got {self.fading!r}")
        if self.switch_margin < 0:
            raise SearchConfigError(f"switch_margin: must be >= 0, got {self.switch_margin!r}")
        if self.patience < 1:
            raise SearchConfigError(f"patience: must be >= 1, got {self.patience!r}")
        if self.population < 0:
            raise SearchConfigError(f"population: must be >= 0, got {self.population!r}")
        if self.perturb <= 1.0:
            raise SearchConfigError(f"perturb: must be > 1, got {self.perturb!r}")
        if self.history_points < 2:
            raise SearchConfigError(f"history_points: must be >= 2, got {self.history_points!r}")

    def to_dict(self) -> dict[str, Any]:
        d = {k: getattr(self, k) for k in ("metric", "fading", "switch_margin", "patience",
                                           "min_events", "respawn", "population", "perturb", "history_points", "seed")}
        s = self.schedule
        d["schedule"] = {"budget": s.budget, "eta": s.eta, "min_live": s.min_live, "max_gap": s.max_gap}
        return d

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> SearchSettings:
        d = dict(d)
        sched = HalvingSchedule(**d.pop("schedule", {}))
        return cls(schedule=sched, **d)


class SearchState:
    """The population, the leader and the schedule's progress; see the module docstring."""

    def __init__(self, candidates: Sequence[Params], settings: SearchSettings | None = None,
                 leader: int = 0) -> None:
        self.settings = settings or SearchSettings()
        if not candidates:
            raise SearchConfigError("candidates: at least one is needed")
        if not 0 <= leader < len(candidates):
            raise SearchConfigError(f"leader: index {leader} outside the {len(candidates)} candidates")
        self.candidates: list[Candidate] = []
        self.capacity = len(candidates)  # K: the memory bound, K times one model
        self.events = 0
        self.next_rung = 0
        self.next_id = 0
        self.leader = ""
        self.challenger: str | None = None
        self.streak = 0
        self.switches: list[Switch] = []
        for p in candidates:
            self._spawn(validate_params(p), parent=None)
        self.leader = self.candidates[leader].cid

    # -- views ----------------------------------------------------------------------------

    @property
    def metric(self) -> Metric:
        return METRICS[self.settings.metric]

    def live(self) -> list[Candidate]:
        return [c for c in self.candidates if c.state == LIVE]

    def get(self, cid: str) -> Candidate:
        for c in self.candidates:
            if c.cid == cid:
                return c
        raise KeyError(cid)

    def leader_candidate(self) -> Candidate:
        return self.get(self.leader)

    def _better(self, a: float, b: float) -> bool:
        return a > b if self.metric.higher_is_better else a < b

    def _improvement(self, new: float, old: float) -> float:
        """Relative improvement of ``new`` over ``old``, positive when ``new`` is better."""
        denom = max(abs(old), 1e-12)
        return (new - old) / denom if self.metric.higher_is_better else (old - new) / denom

    def ranked(self, candidates: Sequence[Candidate]) -> list[Candidate]:
        """Best first; unscored candidates last (ties by id, for determinism)."""
        sign = -1.0 if self.metric.higher_is_better else 1.0

        def key(c: Candidate) -> tuple[int, float, int]:
            v = c.value(self.metric)
            return (1, 0.0, _cid_no(c.cid)) if v is None else (0, sign * v, _cid_no(c.cid))

        return sorted(candidates, key=key)

    # -- the per-batch step ---------------------------------------------------------------

    def observe(self, n_events: int, losses: Mapping[str, BatchLoss]) -> Decision:
        """Fold one batch's prequential losses (keyed by candidate id) in, then prune,
        respawn and maybe switch the leader. ``n_events``: the batch's events (the stream
        clock the schedule runs on), counted once whatever the number of candidates."""
        live_ids = {c.cid for c in self.live()}
        stray = set(losses) - live_ids
        if stray:
            raise SearchConfigError(f"losses: not a live candidate: {sorted(stray)}")
        self.events += max(0, int(n_events))
        for c in self.live():
            loss = losses.get(c.cid)
            if loss is not None:
                c.score.add(loss)
            v = c.value(self.metric)
            if v is not None and loss is not None and loss.n > 0:
                self._record(c, v)
        pruned: list[str] = []
        spawned: list[str] = []
        sched = self.settings.schedule
        while self.events >= sched.rung_events(self.next_rung):
            p, s = self._rung()
            pruned += p
            spawned += s
            self.next_rung += 1
        return Decision(tuple(pruned), tuple(spawned), self._maybe_switch())

    def _record(self, c: Candidate, v: float) -> None:
        c.history.append([float(self.events), float(v)])
        if len(c.history) > self.settings.history_points:
            # Halve the resolution of the older part, keep the newest point: bounded, whole span.
            c.history = [*c.history[:-1][::2], c.history[-1]]

    def _rung(self) -> tuple[list[str], list[str]]:
        """Successive halving over the live candidates old enough to be judged."""
        st = self.settings
        live = self.live()
        judged = [c for c in live if c.score.events >= st.min_events and c.value(self.metric) is not None]
        if len(judged) < 2:
            return [], []
        keep = st.schedule.keep(len(judged))
        # Never below min_live live candidates in total.
        keep = max(keep, len(judged) - (len(live) - st.schedule.min_live))
        ranked = self.ranked(judged)
        doomed = [c for c in ranked[keep:]]
        # The served candidate is never pruned: if it ranks among the doomed, the worst
        # survivor-by-rank is not spared in its place - the leader simply stays in addition,
        # so a rung may keep one more than ⌈m/η⌉.
        doomed = [c for c in doomed if c.cid != self.leader]
        for c in doomed:
            c.state = PRUNED
            c.pruned_at = self.events
            if self.challenger == c.cid:
                self.challenger, self.streak = None, 0
        spawned: list[str] = []
        room = min(self.capacity, st.population or self.capacity) - len(self.live())
        if st.respawn and doomed and room > 0:
            best = self.ranked(self.live())[0]
            for j in range(min(len(doomed), room)):
                params = self._perturbed(best.params, salt=self.next_id * 7919 + j)
                if params is not None:
                    spawned.append(self._spawn(params, parent=best.cid).cid)
        return [c.cid for c in doomed], spawned

    def _perturbed(self, params: Params, salt: int) -> Params | None:
        """The parent's parameters, each multiplied or divided by ``perturb`` (log-scale
        ones) or moved by ±(perturb − 1)·(high − low)/10 (linear ones), the direction from a
        seeded hash; None when every draw duplicates a live candidate."""
        taken = {json.dumps(c.params, sort_keys=True) for c in self.live()}
        step = self.settings.perturb
        for attempt in range(8):
            out: Params = {}
            for name in sorted(params):
                spec = PARAM_SPACE[name]
                x = float(params[name])
                h = zlib.crc32(f"{self.settings.seed}:{salt}:{attempt}:{name}".encode())
                up = h & 1 == 1
                if spec.log and x > 0:
                    y = x * step if up else x / step
                elif spec.log:  # a log-scale parameter at 0 can only grow, from a small value
                    y = 1e-3 if up else 0.0
                else:
                    y = x + (step - 1.0) * (spec.high - spec.low) * 0.1 * (1 if up else -1)
                y = min(max(y, spec.low), spec.high)
                if spec.integer:
                    y = round(y)
                    if y == int(x):
                        y = int(min(max(x + (1 if up else -1), spec.low), spec.high))
                out[name] = int(y) if spec.integer else float(y)
            if json.dumps(out, sort_keys=True) not in taken:
                return out
        return None

    def _spawn(self, params: Params, parent: str | None) -> Candidate:
        c = Candidate(cid=f"c{self.next_id}", params=dict(sorted(params.items())), born=self.events,
                      parent=parent, score=FadingScore(self.settings.fading))
        self.next_id += 1
        self.candidates.append(c)
        return c

    def _maybe_switch(self) -> Switch | None:
        """Switch rule: the best live candidate (scored on ≥ min_events) beats the leader by
        more than ``switch_margin`` (relative) on ``patience`` consecutive batches."""
        st = self.settings
        lead = self.leader_candidate()
        lv = lead.value(self.metric)
        eligible = [c for c in self.live() if c.cid != self.leader and c.score.events >= st.min_events
                    and c.value(self.metric) is not None]
        if not eligible:
            self.challenger, self.streak = None, 0
            return None
        best = self.ranked(eligible)[0]
        bv = best.value(self.metric)
        assert bv is not None
        gain = math.inf if lv is None else self._improvement(bv, lv)
        if gain <= st.switch_margin:
            self.challenger, self.streak = None, 0
            return None
        if self.challenger == best.cid:
            self.streak += 1
        else:
            self.challenger, self.streak = best.cid, 1
        if self.streak < st.patience:
            return None
        m = self.metric.name
        lead_txt = "unscored" if lv is None else f"{lv:.4f}"
        reason = (f"{best.cid} {m} {bv:.4f} vs leader {lead.cid} {lead_txt} "
                  f"({gain * 100:+.1f}%) for {self.streak} batches at {self.events} events")
        sw = Switch(self.events, lead.cid, best.cid, reason)
        self.switches.append(sw)
        self.leader = best.cid
        self.challenger, self.streak = None, 0
        return sw

    # -- visibility and persistence -------------------------------------------------------

    def summary(self) -> list[dict[str, Any]]:
        """The ``candidates`` list of the version metadata and ``GET /v1/model``."""
        out = []
        for c in self.candidates:
            v = c.value(self.metric)
            out.append({
                "id": c.cid, "params": dict(c.params), "metric": self.metric.name,
                "score": None if v is None else float(v), "events": c.score.events,
                "state": c.state, "served": c.cid == self.leader, "parent": c.parent,
                "history": [list(h) for h in c.history],
            })
        return out

    def to_json(self) -> str:
        return json.dumps({
            "settings": self.settings.to_dict(), "capacity": self.capacity, "events": self.events,
            "next_rung": self.next_rung, "next_id": self.next_id, "leader": self.leader,
            "challenger": self.challenger, "streak": self.streak,
            "switches": [list(s) for s in self.switches],
            "candidates": [{
                "cid": c.cid, "params": c.params, "born": c.born, "parent": c.parent,
                "state": c.state, "s": c.score.s, "n": c.score.n, "scored": c.score.events,
                "history": c.history, "pruned_at": c.pruned_at,
            } for c in self.candidates],
        }, sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> SearchState:
        try:
            d = json.loads(text)
            settings = SearchSettings.from_dict(d["settings"])
            self = cls.__new__(cls)
            self.settings = settings
            self.capacity = int(d["capacity"])
            self.events = int(d["events"])
            self.next_rung = int(d["next_rung"])
            self.next_id = int(d["next_id"])
            self.leader = str(d["leader"])
            self.challenger = d["challenger"]
            self.streak = int(d["streak"])
            self.switches = [Switch(int(e), str(o), str(n), str(r)) for e, o, n, r in d["switches"]]
            self.candidates = []
            for c in d["candidates"]:
                self.candidates.append(Candidate(
                    cid=str(c["cid"]), params=validate_params(c["params"], f"state.{c['cid']}"),
                    born=int(c["born"]), parent=c["parent"], state=str(c["state"]),
                    score=FadingScore(settings.fading, float(c["s"]), float(c["n"]), int(c["scored"])),
                    history=[[float(a), float(b)] for a, b in c["history"]], pruned_at=c["pruned_at"]))
            self.get(self.leader)
        except (KeyError, TypeError, ValueError, json.JSONDecodeError) as exc:
            raise SearchConfigError(f"search state: unreadable ({exc!r})") from exc
        return self


def _cid_no(cid: str) -> int:
    return int(cid[1:]) if cid[1:].isdigit() else 0


# ---------------------------------------------------------------------------------------------
# Prequential gains of a ranking: the per-event NDCG@10 / recall@10 terms
# ---------------------------------------------------------------------------------------------


def ranking_gains(rank_of_target: Sequence[int], k: int = 10) -> tuple[float, float]:
    """Σ NDCG@k and Σ recall@k over probed events whose held-out item came at 0-based rank
    ``r`` among the user's unseen items. One relevant item per probe, so the ideal DCG is 1::

        NDCG@k = 1 / log2(r + 2)  if r < k else 0        recall@k = [r < k]
    """
    ndcg = 0.0
    hits = 0.0
    for r in rank_of_target:
        if 0 <= r < k:
            ndcg += 1.0 / math.log2(r + 2.0)
            hits += 1.0
    return ndcg, hits


#: Users probed for the ranking score have learned at least this many positives. Measured
#: (docs/online_search.md): probing every known user let cold-start sessions decide, and the
#: search served α 2 on ml-100k where α 8 is best on the test split (gap 20.6% -> 4.3% with 20).
WARM_USER_POSITIVES = 20


def probe_target_ranks(model: Any, users: Sequence[str], items: Sequence[str], positive: np.ndarray,
                       stamps: np.ndarray, size: int, seed: int = 7, min_user_positives: int = 1) -> list[int]:
    """Before a ranking model (``modeler.core.ranking.LocalRankingALS``) learns a batch: for a
    sample of the batch's positives whose user and item it knows and whose pair it has not
    seen, the 0-based rank of the item among the user's unseen items by x_u·y_i (the count of
    unseen items scoring strictly higher). Feed them to :func:`ranking_gains`.

    The sample is a hash of the event (the ``rating_priority`` of user, item, time), not of
    the model: candidates sharing a stream and a weighting are probed on the same events.
    The model must keep its seen pairs (``ranking_probe_size > 0``), or none are excluded.
    ``min_user_positives``: only users with at least that many positives learned are probed
    (a session's next events right after a user's first batch measure cold start rather than
    the ranking the user will be served for most of the stream).
    """
    from modeler.core.als_math import hash_ids, rating_priority

    if size <= 0 or not len(model.users) or not len(model.items):
        return []
    urows = model.users.lookup(list(users))
    irows = model.items.lookup(list(items))
    known = urows >= 0
    known[known] = model.users.count[urows[known]] >= min_user_positives
    ok = np.asarray(positive, bool) & known & (irows >= 0) & ~model.seen.contains(users, items)
    idx = np.flatnonzero(ok)
    if not len(idx):
        return []
    prio = rating_priority([users[int(j)] for j in idx], [items[int(j)] for j in idx],
                           np.asarray(stamps, np.int64)[idx], seed)
    idx = idx[np.argsort(prio, kind="stable")[:size]]
    item_hash = hash_ids(model.items.ids)
    iv = model.items.vec.astype(np.float64)
    ranks = []
    for j in idx:
        s = iv @ model.users.vec[urows[j]].astype(np.float64)
        target = s[irows[j]]
        s[np.isin(item_hash, model.seen.items_of(users[int(j)]))] = -np.inf
        ranks.append(int((s > target).sum()))
    return ranks
