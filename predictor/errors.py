"""Error bodies and handlers: one shape for ``/v1`` and ops, jiminy's on the jiminy routes.

``/v1`` (and the frontend's ``/api``): ``{"error": <code>, "detail": <text>, "field"?: <name>}``
with a stable code (below). jiminy routes (``/`` and ``/predictions/...``):
``{"errors": [{"status": <int>, "title": <text>, "details": <text>}]}``, jiminy's own shape.
Never a traceback: an unexpected exception is logged and answered 500 ``internal_error``.
"""

from __future__ import annotations

import logging
import re
from http import HTTPStatus
from typing import TYPE_CHECKING, Any

import orjson
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import Response
from starlette.exceptions import HTTPException as StarletteHTTPException

from common.errors import StreamrecError
from predictor.store import REDIS_ERRORS

if TYPE_CHECKING:
    from predictor.deps import Service

log = logging.getLogger(__name__)

# Error codes of the /v1 API (documented in the README).
INVALID_REQUEST = "invalid_request"  # 422: a parameter or body field is wrong (``field`` names it)
NOT_FOUND = "not_found"  # 404: no such route
METHOD_NOT_ALLOWED = "method_not_allowed"  # 405
UNKNOWN_ITEM = "unknown_item"  # 404: the served model does not know the item
PREDICTION_NOT_FOUND = "prediction_not_found"  # 404: jiminy prediction id unknown or expired
NO_RATING_MODEL = "no_rating_model"  # 409: the version has no explicit model (implicit-only)
NO_MODEL = "no_model"  # 503: the modeler has not published a version yet
MODEL_CHANGING = "model_changing"  # 503: the version was replaced while reading; retry
REDIS_UNAVAILABLE = "redis_unavailable"  # 503
NOT_READY = "not_ready"  # 503 (readiness probe)
INTERNAL_ERROR = "internal_error"  # 500: a bug, logged

JIMINY_PREFIXES = ("/predictions",)
_UNION_TAG = re.compile(r"^(constrained|function|lax|strict|json-or-python|tagged-union|int|str)(-|$)")


class ApiError(StreamrecError):
    """An answer other than 200: status, code, human text and the field at fault."""

    def __init__(self, status: int, code: str, detail: str, field: str | None = None) -> None:
        super().__init__(f"{code}: {detail}")
        self.status = status
        self.code = code
        self.detail = detail
        self.field = field


def v1_body(code: str, detail: str, field: str | None = None) -> bytes:
    body: dict[str, Any] = {"error": code, "detail": detail}
    if field is not None:
        body["field"] = field
    return orjson.dumps(body)


def jiminy_body(status: int, detail: str) -> bytes:
    title = HTTPStatus(status).phrase if status in HTTPStatus._value2member_map_ else "Error"
    return orjson.dumps({"errors": [{"status": status, "title": title, "details": detail}]})


def is_jiminy(path: str) -> bool:
    return path == "/" or path.startswith(JIMINY_PREFIXES)


def error_response(path: str, status: int, code: str, detail: str, field: str | None = None) -> Response:
    if is_jiminy(path):
        text = f"{field}: {detail}" if field and not detail.startswith(field) else detail
        body = jiminy_body(status, text)
    else:
        body = v1_body(code, detail, field)
    return Response(body, status_code=status, media_type="application/json")


def redis_down(svc: Service | None, path: str, exc: BaseException) -> ApiError:
    """The 503 of a Redis outage; wakes the watcher so it reconnects now."""
    if svc is not None:
        svc.watcher.poke()
    log.warning("redis error on %s: %s", path, exc)
    return ApiError(503, REDIS_UNAVAILABLE, f"redis is unreachable ({exc}); retry shortly")


def unexpected(method: str, path: str, exc: BaseException) -> ApiError:
    # A bug, not the client's fault: log it (call from an except block), answer JSON
    # without a traceback.
    log.exception("unhandled error on %s %s", method, path)
    return ApiError(500, INTERNAL_ERROR, f"the predictor failed ({type(exc).__name__}); this is logged")


def validation_error(exc: RequestValidationError) -> ApiError:
    """422 naming the first bad field; the detail lists every problem."""
    fields: list[tuple[str, str]] = []
    for err in exc.errors():
        if err.get("type") == "json_invalid":  # loc is (body, <character position>)
            fields.append(("body", f"not valid JSON ({err.get('msg', 'decode error')})"))
            continue
        # pydantic names the branches of a union in the location ("user.constrained-int"):
        # the client only knows the field.
        loc = [str(p) for p in err.get("loc", ()) if not _UNION_TAG.match(str(p))]
        if loc and loc[0] in ("body", "query", "path"):
            loc = loc[1:] if loc[0] == "body" and len(loc) > 1 else loc[1:] or loc
        fields.append((".".join(loc) or "body", str(err.get("msg", "invalid"))))
    if not fields:
        fields = [("body", "invalid request")]
    detail = "; ".join(f"{name}: {msg}" for name, msg in fields)
    return ApiError(422, INVALID_REQUEST, detail, fields[0][0])


def install(app: FastAPI) -> None:
    """Register the handlers: every error answers in the shape of its route's API."""

    def answer(request: Request, err: ApiError) -> Response:
        return error_response(request.url.path, err.status, err.code, err.detail, err.field)

    @app.exception_handler(ApiError)
    async def _api_error(request: Request, exc: ApiError) -> Response:
        return answer(request, exc)

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, exc: RequestValidationError) -> Response:
        return answer(request, validation_error(exc))

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException) -> Response:
        if exc.status_code in (404, 405):
            code = NOT_FOUND if exc.status_code == 404 else METHOD_NOT_ALLOWED
            return answer(request, ApiError(exc.status_code, code, f"no route {request.method} {request.url.path}"))
        if exc.status_code == 400:
            # Starlette's "error parsing the body" (not JSON, not UTF-8): a bad body like any
            # other, answered as the documented 422 naming it.
            return answer(request, ApiError(422, INVALID_REQUEST, f"body: {exc.detail}", "body"))
        return answer(request, ApiError(exc.status_code, INVALID_REQUEST, str(exc.detail)))

    async def _redis_down(request: Request, exc: Exception) -> Response:
        svc = getattr(request.app.state, "svc", None)
        return answer(request, redis_down(svc, request.url.path, exc))

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception) -> Response:
        return answer(request, unexpected(request.method, request.url.path, exc))

    for exc_type in REDIS_ERRORS:
        app.add_exception_handler(exc_type, _redis_down)  # type: ignore[arg-type]
