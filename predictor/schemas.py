"""Request and response models of the predictor's API: what the OpenAPI document declares.

Response models forbid undeclared fields (``additionalProperties: false`` in the schema) and
declare every field they always carry as required, so a schema-driven check of real
responses fails on a field too many or one missing. Optional fields (``rating`` without a
rating model, ``count`` outside popular lists, ``field`` of an error) are left out of the
JSON when they do not apply, never sent as null.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from fastapi import Path
from pydantic import BaseModel, BeforeValidator, ConfigDict, Field

from common.schema import MAX_ID_LENGTH

MAX_N = 1000
MAX_BATCH = 1000


def _id_from_json(value: Any) -> Any:
    # MovieLens ids often arrive as JSON numbers (jiminy clients send ints); bools are not ids.
    if isinstance(value, bool):
        raise ValueError("must be a string id, not a boolean")
    if isinstance(value, int):
        return str(value)
    return value


Id = Annotated[str, BeforeValidator(_id_from_json), Field(min_length=1, max_length=MAX_ID_LENGTH)]
PathId = Annotated[str, Path(min_length=1, max_length=MAX_ID_LENGTH)]
N = Annotated[int, Field(ge=1, le=MAX_N)]
RankBy = Literal["ranking", "rating"]
Strategy = Literal["model", "fold_in", "popular"]


# ---------------------------------------------------------------------- requests


class Body(BaseModel):
    model_config = ConfigDict(extra="ignore")


class Pair(Body):
    user: Id
    item: Id


class PredictBatch(Body):
    pairs: list[Pair] = Field(min_length=1, max_length=MAX_BATCH)


class RecommendBody(Body):
    n: N = 10
    include_rated: bool = False
    candidates: list[Id] | None = Field(None, max_length=100_000)
    rank_by: RankBy | None = None


class ItemRating(Body):
    item: Id
    rating: float = Field(allow_inf_nan=False)


class FoldInBody(Body):
    ratings: list[ItemRating] = Field(min_length=1, max_length=MAX_BATCH)
    n: N = 10
    exclude_rated: bool = True


# jiminy clients send MovieLens integer ids; echo them back as sent (64-bit: JSON-safe).
# Strict: a JSON boolean is not an id (lax mode would read true as 1).
JiminyId = Annotated[int, Field(ge=0, le=2**63 - 1, strict=True)] | Annotated[
    str, Field(min_length=1, max_length=MAX_ID_LENGTH)
]


class JiminyRatingsRequest(Body):
    user: JiminyId
    products: list[JiminyId] = Field(min_length=1, max_length=MAX_BATCH)


class JiminyRanksRequest(Body):
    user: JiminyId
    topk: N


# ---------------------------------------------------------------------- responses


class Out(BaseModel):
    model_config = ConfigDict(extra="forbid")


class ScoredItem(Out):
    item: str
    score: float = Field(description=(
        "Ranking score: what the list is ordered by, higher first. With the ranking model "
        "x_u·y_i (not a rating), for similar items a cosine, for popular items the number of "
        "ratings, with rank_by=rating the unclipped predicted rating."))
    rating: Annotated[float | None, Field(description=(
        "Predicted rating, clipped to the rating scale (popular items: the item's baseline "
        "mu + b_i); absent when the version has no rating model (implicit-only stream)."))] = None
    count: Annotated[int | None, Field(description="Ratings seen (popular items only).")] = None
    title: str | None
    genres: list[str]


class ItemList(Out):
    strategy: Strategy
    version: int | None
    items: list[ScoredItem]


class UserItems(ItemList):
    user: str
    rank_by: RankBy | None = Field(description="Which model ordered the list (null: popular).")


class SimilarItems(ItemList):
    item: str


class FoldInItems(ItemList):
    unknown_items: list[str] = Field(description="Rated items the served model does not know.")


class Prediction(Out):
    user: str
    item: str
    rating: float = Field(description="Predicted rating, clipped to the rating scale.")
    strategy: Literal["model", "popular"]
    version: int | None


class Predictions(Out):
    predictions: list[Prediction]
    strategy: Literal["model", "popular"]
    version: int | None


class RatedItem(Out):
    item: str
    rating: float
    title: str | None
    genres: list[str]


class UserRatings(Out):
    user: str
    total: int
    ratings: list[RatedItem]


class CatalogItem(Out):
    item: str
    title: str | None
    genres: list[str]


class ItemSearch(Out):
    items: list[CatalogItem]
    total: int


class ItemInfo(CatalogItem):
    in_model: bool
    version: int | None
    bias: Annotated[float | None, Field(description="b_i of the rating model, when it knows the item.")] = None


class GenreCount(Out):
    genre: str
    items: int


class Genres(Out):
    genres: list[GenreCount]


class SearchCandidate(Out):
    """One configuration of the modeler's online hyper-parameter search."""

    id: str
    params: dict[str, float] = Field(description="Hyper-parameters, e.g. rank, reg_param, ranking_alpha.")
    metric: str = Field(description="What score is: rmse (lower is better), ndcg@10, recall@10.")
    score: float | None = Field(description="Fading-window prequential score; null before scored.")
    events: int = Field(description="Events the candidate has been scored on.")
    state: Literal["live", "pruned"]
    served: bool = Field(description="True for the one candidate the version serves (the leader).")
    parent: str | None = Field(default=None, description="Candidate it was respawned around, if any.")
    history: list[tuple[float, float]] = Field(
        default_factory=list, description="[events, score] points over time, oldest first (bounded).")


class ModelInfo(Out):
    version: int
    models: list[str] = Field(description='Factor sets served: "explicit" (ratings), "ranking".')
    rank: int
    ranking_rank: int
    n_users: int
    n_items: int
    ratings_seen: int
    created: float
    reg_param: float
    mu: float
    rating_min: float
    rating_max: float
    segments: list[int]
    metrics: dict[str, Any]
    history: list[dict[str, Any]]
    candidates: list[SearchCandidate] = Field(
        default_factory=list, description="The online search's candidates; empty when no search runs.")


class Health(Out):
    status: Literal["ok"]


class Ready(Out):
    status: Literal["ready"]
    version: int | None
    strategy: Literal["model", "popular"]
    worker: int


class ErrorBody(Out):
    """Every error of the ``/v1`` API (and of the frontend's ``/api``)."""

    error: str = Field(description="Stable machine-readable code, e.g. unknown_item.")
    detail: str = Field(description="Human-readable explanation.")
    field: Annotated[str | None, Field(description="The request field at fault, when one is.")] = None


# -- jiminy (radanalytics jiminy-predictor's REST API)


class JiminyApplication(Out):
    name: str
    version: str


class ServerInfo(Out):
    application: JiminyApplication


class JiminyProduct(Out):
    id: int | str
    rating: float = Field(description="Predicted rating clipped to the scale, or with the ranking "
                                      "model and no rating model, the ranking score.")


class JiminyRatings(Out):
    id: str
    user: int | str
    products: list[JiminyProduct]


class JiminyRanks(JiminyRatings):
    topk: int
    strategy: Strategy
    version: int | None


class JiminyRatingsResponse(Out):
    prediction: JiminyRatings


class JiminyRanksResponse(Out):
    prediction: JiminyRanks


class JiminyError(Out):
    status: int
    title: str
    details: str


class JiminyErrors(Out):
    errors: list[JiminyError] = Field(min_length=1)
