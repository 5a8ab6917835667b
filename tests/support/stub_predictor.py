"""A small stand-in predictor (three films, fixed answers) for the frontend's tests: it records
every request it is sent, so a test can check what the frontend forwarded."""

from __future__ import annotations

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse


def stub_predictor() -> tuple[FastAPI, list[tuple[str, str, dict]]]:
    """The app and the list of ``(method, path, query)`` it has been asked, in order."""
    seen: list[tuple[str, str, dict]] = []
    app = FastAPI()
    catalog = [
        {"item": "1", "title": "Toy Story (1995)", "genres": ["Adventure", "Animation"]},
        {"item": "2", "title": "Jumanji (1995)", "genres": ["Adventure", "Fantasy"]},
        {"item": "3", "title": "Heat (1995)", "genres": ["Action", "Crime"]},
    ]

    @app.middleware("http")
    async def record(request: Request, call_next):  # type: ignore[no-untyped-def]
        seen.append((request.method, request.url.path, dict(request.query_params)))
        return await call_next(request)

    @app.get("/v1/items")
    async def items(q: str = "", genre: str | None = None, limit: int = 20, offset: int = 0):
        hits = [m for m in catalog if q.lower() in m["title"].lower()
                and (genre is None or genre in m["genres"])]
        return {"items": hits[offset:offset + limit], "total": len(hits)}

    @app.get("/v1/items/{item}")
    async def item(item: str):
        for m in catalog:
            if m["item"] == item:
                return m
        return JSONResponse({"error": "unknown_item", "detail": f"no item {item}", "field": "item"}, 404)

    @app.get("/v1/genres")
    async def genres():
        counts: dict[str, int] = {}
        for m in catalog:
            for g in m["genres"]:
                counts[g] = counts.get(g, 0) + 1
        counts["(no genres listed)"] = 1
        return {"genres": [{"genre": g, "items": c} for g, c in sorted(counts.items())]}

    @app.get("/v1/users/{user}/recommendations")
    async def recs(user: str, n: int = 10):
        return {"user": user, "strategy": "model", "version": 7,
                "items": [{**catalog[2], "score": 4.4}][:n]}

    @app.get("/v1/model")
    async def model():
        return JSONResponse({"error": "no_model", "detail": "no model yet"}, 503)

    @app.get("/v1/odd-error")
    async def odd():
        return JSONResponse({"detail": [{"msg": "FastAPI's default shape"}]}, 404)

    @app.post("/v1/fold-in")
    async def fold_in(request: Request):
        body = await request.json()
        return {"strategy": "fold_in", "version": 7, "items": [], "echo": body}

    @app.get("/v1/popular")
    async def popular(n: int = 10):
        return {"strategy": "popular", "version": None, "items": catalog[:n]}

    return app, seen
