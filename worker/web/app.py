"""The `web` process: `uvicorn --factory worker.web.app:create_app`."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import FastAPI, Request, Response
from fastapi.exception_handlers import http_exception_handler
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from worker import wiring
from worker.usecases.callbacks import CallbackData
from worker.usecases.group_commit import GroupCommit
from worker.usecases.receive import Received, receive_batch
from worker.web import api, callbacks, ops, outages
from worker.web import events as event_feed
from worker.web.limits import BodyLimit


def create_app(root: wiring.Root | None = None) -> FastAPI:
    """Build the app over `root`; without one, this process's root is built from the
    environment (and the process stops here, with one line, if a setting is missing)."""
    if root is None:
        root = wiring.start("web")

    ctx = root.ctx
    # kod.mobi's callbacks are written in group commits (worker.usecases.group_commit),
    # through Postgres outages by way of the spool (worker.usecases.receive).
    callback_writer: GroupCommit[tuple[str, CallbackData], Received] = GroupCommit(
        lambda batch: receive_batch(ctx, batch), name="callbacks"
    )

    @asynccontextmanager
    async def lifespan(_app: FastAPI) -> AsyncIterator[None]:
        yield
        callback_writer.close()

    docs = root.settings.api_docs
    app = FastAPI(
        title="kodmobi-worker",
        version="0.1.0",
        description="Send one-time codes through kod.mobi, with channel fallback.",
        lifespan=lifespan,
        # Off unless API_DOCS=true: no map of the API for whoever can reach the port.
        docs_url="/docs" if docs else None,
        redoc_url="/redoc" if docs else None,
        openapi_url="/openapi.json" if docs else None,
    )
    app.state.root = root
    app.state.callbacks = callback_writer
    app.state.api_tokens = [
        (t.token.get_secret_value().encode(), t.producer) for t in root.settings.api_tokens
    ]

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
        # FastAPI's default echoes the input back; it may hold a code. Name fields only.
        errors = [
            {"loc": list(e.get("loc", ())), "msg": e.get("msg", ""), "type": e.get("type", "")}
            for e in exc.errors()
        ]
        return JSONResponse({"detail": errors}, status_code=422)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, exc: StarletteHTTPException) -> Response:
        # FastAPI answers 400 for a body it cannot even decode (not UTF-8); to a
        # producer that is bad input like any other: 422 naming the body.
        if exc.status_code == 400 and exc.detail == "There was an error parsing the body":
            return JSONResponse(
                {
                    "detail": [
                        {"loc": ["body"], "msg": "body is not UTF-8 JSON", "type": "json_invalid"}
                    ]
                },
                status_code=422,
            )
        return await http_exception_handler(request, exc)

    outages.install(app)
    app.include_router(api.router)
    app.include_router(event_feed.router)
    app.include_router(api.health)
    app.include_router(callbacks.router)
    ops.install(app)  # GET /metrics and the console at /ops (issue 11)
    app.add_middleware(callbacks.CallbackShortcut)
    # Outermost: bodies are bounded before authentication and parsing (issue 13).
    app.add_middleware(BodyLimit)
    return app
