"""The operations side of the web process (issue 11): `GET /metrics` and the console at
`/ops` (DESIGN §12). `install(app)` adds both to the app create_app builds."""

from __future__ import annotations

from pathlib import Path

from fastapi import FastAPI
from fastapi.staticfiles import StaticFiles

from worker.web.ops import pages, scrape

STATIC = Path(__file__).parent / "static"


def install(app: FastAPI) -> None:
    app.include_router(scrape.router)
    app.include_router(pages.router)
    app.mount("/ops/static", StaticFiles(directory=STATIC), name="ops-static")
