"""A producer's webhook receiver for the tests: verifies every request with the
`standardwebhooks` library, records it, and answers as its path's mode says."""

from __future__ import annotations

import base64
import json
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Any

from standardwebhooks import Webhook
from standardwebhooks.exceptions import WebhookVerificationError
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from tests.support.servers import serve

#: The secret the tests' systems sign with.
WEBHOOK_SECRET = "whsec_" + base64.b64encode(b"test-webhook-secret-0123456789ab").decode()


@dataclass
class Receipt:
    path: str
    webhook_id: str
    verified: bool
    status: int
    event: dict[str, Any] | None


@dataclass
class Receiver:
    url: str
    receipts: list[Receipt] = field(default_factory=list)
    #: Per path: "ok", "down" (500 always) or "flaky" (500 on each webhook-id's first try).
    modes: dict[str, str] = field(default_factory=dict)
    lock: threading.Lock = field(default_factory=threading.Lock)

    def of(self, message_id: str) -> list[Receipt]:
        with self.lock:
            return [r for r in self.receipts if r.event and r.event["data"]["id"] == message_id]

    def delivered(self, message_id: str) -> list[dict[str, Any]]:
        """Events of a message answered 2xx, in arrival order."""
        return [r.event for r in self.of(message_id) if r.status == 200 and r.event]


@contextmanager
def webhook_receiver(secret: str = WEBHOOK_SECRET) -> Iterator[Receiver]:
    verifier = Webhook(secret)
    seen: set[str] = set()
    state: dict[str, Receiver] = {}

    async def hook(request: Request) -> Response:
        receiver = state["r"]
        raw = await request.body()
        path = request.url.path
        try:
            verifier.verify(raw, dict(request.headers))
            verified = True
        except WebhookVerificationError:
            verified = False
        webhook_id = request.headers.get("webhook-id", "")
        mode = receiver.modes.get(path, "ok")
        status = 200
        if not verified or mode == "down" or (mode == "flaky" and webhook_id not in seen):
            status = 500 if verified else 401
        seen.add(webhook_id)
        with receiver.lock:
            receiver.receipts.append(
                Receipt(path, webhook_id, verified, status, json.loads(raw) if raw else None)
            )
        return Response(status_code=status)

    app = Starlette(routes=[Route("/{path:path}", hook, methods=["POST"])])
    with serve(app) as url:
        state["r"] = Receiver(url)
        yield state["r"]
