"""How events become the ranking model's confidence weights: one mapping for every service.

The ranking model (implicit-feedback ALS, Hu, Koren & Volinsky 2008) treats every observed
(user, item) pair as a positive with confidence ``c = 1 + α·w``. This module turns an event
into ``w``; the modeler trains with it and the predictor's fold-in uses the same mapping (the
version metadata carries its parameters as ``ranking_weighting``), so a visitor folded in
is scored as the model was trained.

* A rating r on the scale [lo, hi] is first placed on [0, 1]: t = (r − lo)/(hi − lo).
  A rating at or above ``liked`` (default 0.7: 3.65 on 0.5–5, so 4 and above on MovieLens;
  7.3 on 1–10) is a positive of weight ``1 + slope·(t − liked)``. A rating below it weighs
  ``low_weight`` (default 0: not a positive at all, the item is only excluded from the
  user's lists).
* An implicit event of weight v (a play count, a click) weighs ``log1p(v)`` with
  ``implicit="log"`` (the paper's c = 1 + α·log(1 + v/ε) with ε = 1), or v with "linear".

A weight of 0 means "seen, not liked": the pair is not a positive.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Any

from common.schema import RatingScale


@dataclass(frozen=True)
class Weighting:
    """Parameters of the event -> weight mapping (see the module docstring)."""

    liked: float = 0.7
    slope: float = 0.0
    low_weight: float = 0.0
    implicit: str = "log"

    def __post_init__(self) -> None:
        if not 0.0 <= self.liked <= 1.0:
            raise ValueError("liked must be a fraction of the scale in [0, 1]")
        if self.slope < 0 or self.low_weight < 0:
            raise ValueError("slope and low_weight must be >= 0")
        if self.implicit not in ("log", "linear"):
            raise ValueError("implicit must be 'log' or 'linear'")

    def rating_weight(self, rating: float, scale: RatingScale) -> float:
        span = scale.max - scale.min
        t = (rating - scale.min) / span if span > 0 else 1.0
        if t + 1e-9 >= self.liked:
            return 1.0 + self.slope * (t - self.liked)
        return self.low_weight

    def implicit_weight(self, weight: float) -> float:
        return math.log1p(weight) if self.implicit == "log" else float(weight)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any] | None) -> Weighting:
        return cls(**{k: v for k, v in (d or {}).items() if k in cls.__dataclass_fields__})
