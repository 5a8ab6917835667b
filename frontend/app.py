"""The frontend service: the page, the write path (POST /api/ratings -> Kafka) and a
same-origin read API that forwards to the predictor.

Readiness (``/readyz``): answers 200 as soon as the app can serve its page, and reports in the
body whether the predictor and the broker are reachable. It deliberately does not go unready
when one of them is down: the page then still loads and tells the visitor what is wrong
(reads "predictor unreachable", writes 503), which is better than every frontend replica
dropping out of the Service at once because a shared dependency blinked.
"""

from __future__ import annotations

import asyncio
import hmac
import json
import logging
import re
import time
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Annotated, Any
from urllib.parse import quote

import httpx
from fastapi import Depends, FastAPI, Query, Request
from fastapi.concurrency import run_in_threadpool
from fastapi.exceptions import RequestValidationError
from fastapi.responses import FileResponse, JSONResponse, Response
from fastapi.staticfiles import StaticFiles
from starlette.exceptions import HTTPException as StarletteHTTPException

from common.schema import InvalidRating, Rating, parse_rating
from frontend.config import FrontendSettings
from frontend.kafka_writer import BrokerUnavailable, RatingWriter

log = logging.getLogger(__name__)

STATIC_DIR = Path(__file__).resolve().parent / "static"
VISITOR_COOKIE = "visitor_id"
_VISITOR_RE = re.compile(r"^[A-Za-z0-9-]{8,64}$")
_COOKIE_MAX_AGE = 365 * 24 * 3600
_GENRES_TTL_S = 300.0
_READY_CHECK_S = 1.5


def error(status: int, code: str, detail: str, field: str | None = None) -> JSONResponse:
    """The one error body of our APIs (the predictor's ``/v1`` answers the same shape):
    ``{"error": <code>, "detail": <human text>, "field"?: <name>}``."""
    body: dict[str, Any] = {"error": code, "detail": detail}
    if field is not None:
        body["field"] = field
    return JSONResponse(body, status_code=status)


def _as_error_body(status: int, payload: Any) -> JSONResponse:
    """A predictor error passed on in our shape, whatever shape it came in."""
    if isinstance(payload, dict) and isinstance(payload.get("error"), str) and isinstance(payload.get("detail"), str):
        field = payload.get("field")
        return error(status, payload["error"], payload["detail"], field if isinstance(field, str) else None)
    detail = payload.get("detail") if isinstance(payload, dict) else None
    return error(status, "predictor_error",
                 detail if isinstance(detail, str) else f"the predictor answered {status}")


class Predictor:
    """Thin async client of the predictor's HTTP API: JSON in, (status, JSON) out."""

    def __init__(self, base_url: str, timeout_s: float) -> None:
        self.base_url = base_url.rstrip("/")
        self.client = httpx.AsyncClient(base_url=self.base_url, timeout=timeout_s)

    async def call(
        self, method: str, path: str, params: dict[str, Any] | None = None,
        body: Any = None, timeout: float | None = None,
    ) -> JSONResponse:
        params = {k: v for k, v in (params or {}).items() if v is not None}
        extra: dict[str, Any] = {} if timeout is None else {"timeout": timeout}
        try:
            resp = await self.client.request(method, path, params=params, json=body, **extra)
        except httpx.TimeoutException:
            log.warning("predictor timed out on %s %s", method, path)
            return error(503, "predictor_unavailable",
                         f"the predictor at {self.base_url} did not answer in time")
        except httpx.TransportError as exc:
            log.warning("predictor unreachable on %s %s: %r", method, path, exc)
            return error(503, "predictor_unavailable",
                         f"the predictor at {self.base_url} is not reachable")
        try:
            payload = resp.json()
        except ValueError:
            return error(502, "bad_gateway",
                         f"the predictor answered {resp.status_code} without JSON")
        if resp.status_code >= 500 and resp.status_code != 503:
            log.warning("predictor answered %s on %s %s", resp.status_code, method, path)
            return error(502, "bad_gateway", f"the predictor failed ({resp.status_code})")
        if resp.status_code >= 400:
            return _as_error_body(resp.status_code, payload)
        return JSONResponse(payload, status_code=resp.status_code)

    async def close(self) -> None:
        await self.client.aclose()


class State:
    def __init__(self, settings: FrontendSettings) -> None:
        self.settings = settings
        self.predictor = Predictor(settings.predictor_url, settings.predictor_timeout_s)
        self.writer = RatingWriter(
            settings.bootstrap_servers, settings.ratings_topic, settings.produce_timeout_s
        )
        self.genres: list[str] = []
        self.genres_at = 0.0
        self.genres_lock = asyncio.Lock()


def get_state(request: Request) -> State:
    return request.app.state.frontend


StateDep = Annotated[State, Depends(get_state)]


def visitor_of(request: Request) -> str | None:
    value = request.cookies.get(VISITOR_COOKIE)
    return value if value and _VISITOR_RE.match(value) else None


def with_visitor(request: Request, response: Response) -> str:
    """The visitor's id from the cookie; a new one (and its cookie) for a first visit."""
    visitor = visitor_of(request)
    if visitor is None:
        visitor = str(uuid.uuid4())
        response.set_cookie(
            VISITOR_COOKIE, visitor, max_age=_COOKIE_MAX_AGE, httponly=True, samesite="lax"
        )
    return visitor


def _check_token(request: Request, token: str | None) -> JSONResponse | None:
    if not token:
        return None
    given = request.headers.get("x-write-token")
    auth = request.headers.get("authorization", "")
    if given is None and auth.lower().startswith("bearer "):
        given = auth[7:].strip()
    if not given:
        return error(401, "write_token_required",
                     "this server requires a write token (Authorization: Bearer <token>)")
    if not hmac.compare_digest(given.encode(), token.encode()):
        return error(403, "write_token_invalid", "the write token is not valid")
    return None


def validate_ratings(
    body: Any, visitor: str | None, settings: FrontendSettings
) -> list[Rating] | JSONResponse:
    """Every rating of the request, validated, or a 422 naming the first bad field."""
    single = isinstance(body, dict)
    items = [body] if single else body
    if not isinstance(items, list):
        return error(422, "invalid_rating",
                     "body: must be a rating object or a list of rating objects", field="body")
    if not items:
        return error(422, "invalid_rating", "body: the list is empty", field="body")
    if len(items) > settings.max_batch:
        return error(422, "invalid_rating",
                     f"body: at most {settings.max_batch} ratings per request", field="body")
    ratings = []
    for i, raw in enumerate(items):
        where = "" if single else f"[{i}]"
        if not isinstance(raw, dict):
            return error(422, "invalid_rating", f"{where or 'body'}: must be an object",
                         field=where or "body")
        if raw.get("user") in (None, "") and visitor is not None:
            # The page posts {"item", "rating"}: the rating belongs to the cookie's visitor.
            raw = {**raw, "user": visitor}
        try:
            ratings.append(parse_rating(raw, settings.scale))
        except InvalidRating as exc:
            field = exc.reason.split(":", 1)[0]
            return error(422, "invalid_rating", f"{where}{'.' if where else ''}{exc.reason}",
                         field=f"{where}.{field}" if where else field)
    users = {r.user for r in ratings}
    if len(users) > 1:
        # One user -> one partition -> one record batch: that is what makes a request
        # all-or-nothing on the broker (see frontend.kafka_writer).
        return error(422, "invalid_rating",
                     "user: all ratings of one request must be for the same user", field="user")
    return ratings


def create_app(settings: FrontendSettings | None = None) -> FastAPI:
    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        # Fields come from the environment, which mypy cannot see without the pydantic plugin.
        state = State(settings or FrontendSettings())
        app.state.frontend = state
        log.info("frontend up: predictor %s, broker %s, topic %s",
                 state.settings.predictor_url, state.settings.kafka_bootstrap_servers,
                 state.settings.ratings_topic)
        try:
            yield
        finally:
            await state.predictor.close()
            await run_in_threadpool(state.writer.close)

    app = FastAPI(title="streamrec frontend", lifespan=lifespan, docs_url="/api/docs",
                  openapi_url="/api/openapi.json")
    app.mount("/static", StaticFiles(directory=STATIC_DIR), name="static")

    # -- errors: the same body as the predictor's /v1 API, never FastAPI's default shape

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
        problems = []
        for err in exc.errors():
            loc = [str(p) for p in err.get("loc", ())]
            problems.append((".".join(loc[1:] or loc) or "body", str(err.get("msg", "invalid"))))
        problems = problems or [("body", "invalid request")]
        return error(422, "invalid_request", "; ".join(f"{f}: {m}" for f, m in problems), problems[0][0])

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        if exc.status_code == 404:
            return error(404, "not_found", f"no route {request.method} {request.url.path}")
        if exc.status_code == 405:
            return error(405, "method_not_allowed", f"no route {request.method} {request.url.path}")
        return error(exc.status_code, "http_error", str(exc.detail))

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception) -> JSONResponse:
        log.exception("unhandled error on %s %s", request.method, request.url.path)
        return error(500, "internal_error", f"the frontend failed ({type(exc).__name__}); this is logged")

    @app.get("/", include_in_schema=False)
    async def index(request: Request) -> Response:
        """The page."""
        response = FileResponse(STATIC_DIR / "index.html", media_type="text/html")
        with_visitor(request, response)
        response.headers["Cache-Control"] = "no-cache"
        return response

    @app.get("/healthz")
    async def healthz() -> dict[str, str]:
        """Liveness: the process serves HTTP."""
        return {"status": "ok"}

    @app.get("/readyz")
    async def readyz(state: StateDep) -> dict[str, Any]:
        """Readiness, with the reachability of the predictor and the broker as detail."""

        # Bounded well inside a probe's timeout (k8s: 3 s): a dependency that hangs is
        # reported as unreachable rather than making the probe itself time out.
        async def predictor() -> str:
            resp = await state.predictor.call("GET", "/v1/popular", {"n": 1},
                                              timeout=_READY_CHECK_S)
            return "ok" if resp.status_code < 500 else "unreachable"

        async def broker() -> str:
            try:
                ok = await asyncio.wait_for(run_in_threadpool(state.writer.ping), _READY_CHECK_S)
            except TimeoutError:
                ok = False
            return "ok" if ok else "unreachable"

        p, b = await asyncio.gather(predictor(), broker())
        return {"status": "ready", "predictor": p, "broker": b}

    @app.get("/api/config")
    async def config(request: Request, response: Response, state: StateDep) -> dict[str, Any]:
        """What the page needs to start: the visitor id, the rating scale, token policy."""
        visitor = with_visitor(request, response)
        s = state.settings
        return {"visitor": visitor, "rating_min": s.rating_min, "rating_max": s.rating_max,
                "write_token_required": bool(s.write_token), "max_batch": s.max_batch}

    @app.post("/api/ratings", status_code=202)
    async def post_ratings(request: Request, state: StateDep) -> Response:
        """Validate one rating or a list and produce them to Kafka; 202 once acknowledged."""
        denied = _check_token(request, state.settings.write_token)
        if denied is not None:
            return denied
        try:
            body = json.loads(await request.body())
        except ValueError:
            return error(422, "invalid_rating", "body: not valid JSON", field="body")
        ratings = validate_ratings(body, visitor_of(request), state.settings)
        if isinstance(ratings, JSONResponse):
            return ratings
        try:
            receipt = await run_in_threadpool(state.writer.write, ratings)
        except BrokerUnavailable:
            return error(503, "broker_unavailable",
                         "the ratings could not be stored right now; none of them were "
                         "accepted, please retry")
        return JSONResponse(
            {"accepted": receipt.count, "user": ratings[0].user, "topic": receipt.topic,
             "partition": receipt.partition, "offset": receipt.offset,
             "ratings": [r.model_dump() for r in ratings]},
            status_code=202,
        )

    # ---- reads, forwarded to the predictor -------------------------------------------------

    @app.get("/api/items")
    async def items(
        state: StateDep, q: str | None = None, genre: str | None = None,
        limit: Annotated[int, Query(ge=1, le=200)] = 20,
        offset: Annotated[int, Query(ge=0)] = 0,
    ) -> Response:
        """Search the catalogue by title and genre."""
        return await state.predictor.call(
            "GET", "/v1/items", {"q": q or None, "genre": genre or None, "limit": limit,
                                 "offset": offset})

    @app.get("/api/items/{item}")
    async def item(item: str, state: StateDep) -> Response:
        """One catalogue entry."""
        return await state.predictor.call("GET", f"/v1/items/{_segment(item)}")

    @app.get("/api/genres")
    async def genres(state: StateDep) -> Response:
        """Every genre of the loaded catalogue, by name (the predictor's ``/v1/genres``,
        cached; placeholders such as "(no genres listed)" left out)."""
        async with state.genres_lock:
            if state.genres and time.monotonic() - state.genres_at < _GENRES_TTL_S:
                return JSONResponse({"genres": state.genres})
            resp = await state.predictor.call("GET", "/v1/genres")
            if resp.status_code != 200:
                return resp
            listed = json.loads(bytes(resp.body)).get("genres") or []
            names = {str(g.get("genre", "")) for g in listed if isinstance(g, dict)}
            state.genres = sorted(g for g in names if g and not g.startswith("("))
            state.genres_at = time.monotonic()
            return JSONResponse({"genres": state.genres})

    @app.get("/api/popular")
    async def popular(state: StateDep, n: Annotated[int, Query(ge=1, le=100)] = 10) -> Response:
        """The most rated items: what a newcomer sees first."""
        return await state.predictor.call("GET", "/v1/popular", {"n": n})

    @app.get("/api/model")
    async def model(state: StateDep) -> Response:
        """The streaming model's version, size and training history."""
        return await state.predictor.call("GET", "/v1/model", {"history": 200})

    @app.get("/api/recommendations")
    async def my_recommendations(
        request: Request, state: StateDep, n: Annotated[int, Query(ge=1, le=100)] = 10,
    ) -> Response:
        """The visitor's recommendations (model once learned, else whatever the predictor has)."""
        visitor = visitor_of(request)
        if visitor is None:
            return error(422, "no_visitor", "visitor_id: no visitor cookie; load the page first",
                         field="visitor_id")
        return await state.predictor.call(
            "GET", f"/v1/users/{_segment(visitor)}/recommendations",
            {"n": n, "include_rated": "false"})

    @app.get("/api/users/{user}/recommendations")
    async def user_recommendations(
        user: str, state: StateDep, n: Annotated[int, Query(ge=1, le=100)] = 10,
    ) -> Response:
        """Recommendations of any user id (e.g. an existing MovieLens user)."""
        return await state.predictor.call(
            "GET", f"/v1/users/{_segment(user)}/recommendations",
            {"n": n, "include_rated": "false"})

    @app.get("/api/users/{user}/ratings")
    async def user_ratings(
        user: str, state: StateDep, limit: Annotated[int, Query(ge=1, le=500)] = 50,
    ) -> Response:
        """What a user has rated, as the model has seen it."""
        return await state.predictor.call(
            "GET", f"/v1/users/{_segment(user)}/ratings", {"limit": limit})

    @app.post("/api/fold-in")
    async def fold_in(request: Request, state: StateDep) -> Response:
        """Instant recommendations for a list of ratings (the predictor's fold-in)."""
        try:
            body = json.loads(await request.body())
        except ValueError:
            return error(422, "invalid_request", "body: not valid JSON", field="body")
        if not isinstance(body, dict) or not isinstance(body.get("ratings"), list):
            return error(422, "invalid_request", "ratings: must be a list of {item, rating}",
                         field="ratings")
        return await state.predictor.call("POST", "/v1/fold-in", body=body)

    return app


def _segment(value: str) -> str:
    """A path segment safe to put in the predictor's URL (ids may be any string)."""
    return quote(value, safe="")
