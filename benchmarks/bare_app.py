"""A bare endpoint on the web process's server stack (uvicorn + FastAPI) for `make bench`.

Served like the real web process:
    python -m uvicorn --factory bare_app:create_app --app-dir benchmarks --no-access-log
Its one route has the shape of the callback receiver's and answers 200 at once, so the
callback figure can be read as a share of what the stack itself can answer.
"""

from __future__ import annotations

from fastapi import FastAPI
from fastapi.responses import JSONResponse


def create_app() -> FastAPI:
    app = FastAPI(title="bare endpoint")

    @app.post("/callbacks/kodmobi/{attempt_id}/{token}")
    async def bare(attempt_id: str, token: str) -> JSONResponse:
        return JSONResponse({"ok": True})

    @app.get("/healthz")
    async def healthz() -> dict[str, str]:
        return {"status": "ok"}

    return app
