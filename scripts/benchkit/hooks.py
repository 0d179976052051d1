"""A fast local webhook receiver for the `e2e-notify` figure: answers 204 at once and
counts what it got (its CPU is the bench's, not ours)."""

from __future__ import annotations

import base64
import secrets
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager

import uvicorn
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from worker.embedded import free_port


class _Server(uvicorn.Server):
    def install_signal_handlers(self) -> None:  # the main thread is the bench's
        pass


class Hooks:
    def __init__(self, url: str) -> None:
        self.url = url
        self.received = 0
        #: a secret for WEBHOOK_SECRET, in the `whsec_` form
        self.secret = "whsec_" + base64.b64encode(secrets.token_bytes(32)).decode()


@contextmanager
def fast_receiver() -> Iterator[Hooks]:
    port = free_port()
    hooks = Hooks(f"http://127.0.0.1:{port}")

    async def hook(request: Request) -> Response:
        await request.body()
        hooks.received += 1
        return Response(status_code=204)

    app = Starlette(routes=[Route("/{path:path}", hook, methods=["POST"])])
    config = uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning")
    server = _Server(config)
    thread = threading.Thread(target=server.run, name="bench-hooks", daemon=True)
    thread.start()
    deadline = time.monotonic() + 20
    while not server.started:
        if time.monotonic() > deadline or not thread.is_alive():
            raise RuntimeError("the bench webhook receiver did not start")
        time.sleep(0.01)
    try:
        yield hooks
    finally:
        server.should_exit = True
        thread.join(timeout=10)
