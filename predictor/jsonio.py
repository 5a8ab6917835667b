"""orjson responses: the hot routes build plain dicts and answer these bytes directly."""

from __future__ import annotations

from typing import Any

import orjson
from fastapi.responses import Response


def dumps(data: Any) -> bytes:
    return orjson.dumps(data, option=orjson.OPT_SERIALIZE_NUMPY)


def js(data: Any, status: int = 200, headers: dict[str, str] | None = None) -> Response:
    return Response(dumps(data), status_code=status, media_type="application/json", headers=headers)
