"""The producers' ears (issue 10): a webhook receiver on loopback that verifies every try
with `standardwebhooks`, answers some 500 and some too slowly, and goes away for a while;
and a real Dramatiq worker consuming the reply queue."""

from __future__ import annotations

import asyncio
import base64
import json
import random
import secrets
import threading
import time
from dataclasses import dataclass
from typing import Any

import dramatiq
from standardwebhooks import Webhook
from standardwebhooks.exceptions import WebhookVerificationError
from starlette.applications import Starlette
from starlette.requests import Request
from starlette.responses import Response
from starlette.routing import Route

from tests.support.chaos.model import ChaosParams
from tests.support.servers import ThreadedServer
from worker.embedded import free_port

#: The reply queue and actor the Dramatiq subscribers name.
REPLY_QUEUE = "chaos-replies"
REPLY_ACTOR = "on_code_event"


@dataclass
class Receipt:
    """One try as the receiver saw it."""

    seq: int
    at: float  # monotonic
    webhook_id: str
    verified: bool
    #: what it answered: "200", "500", "401" (unverified) or "slow" (200, past the client's
    #: timeout: the client has given up, so the try counts as failed)
    answer: str
    event: dict[str, Any] | None

    @property
    def taken(self) -> bool:
        return self.answer == "200"


def new_secret() -> str:
    return "whsec_" + base64.b64encode(secrets.token_bytes(32)).decode()


class HookReceiver:
    """A producer's webhook endpoint on 127.0.0.1: `POST /hook/<anything>`."""

    def __init__(self, params: ChaosParams, secret: str) -> None:
        self.params = params
        self.secret = secret
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.receipts: list[Receipt] = []
        self.lock = threading.Lock()
        self._rng = random.Random(params.seed + 10)
        self._verifier = Webhook(secret)
        self._server: ThreadedServer | None = None
        self._thread: threading.Thread | None = None
        self.app = Starlette(routes=[Route("/hook/{rest:path}", self._hook, methods=["POST"])])

    async def _hook(self, request: Request) -> Response:
        raw = await request.body()
        try:
            self._verifier.verify(raw, dict(request.headers))
            verified = True
        except WebhookVerificationError:
            verified = False
        with self.lock:
            draw = self._rng.random()
        p = self.params
        if not verified:
            answer = "401"
        elif draw < p.receiver_500_rate:
            answer = "500"
        elif draw < p.receiver_500_rate + p.receiver_slow_rate:
            answer = "slow"
        else:
            answer = "200"
        try:
            event = json.loads(raw)
        except ValueError:
            event = None
        with self.lock:
            self.receipts.append(
                Receipt(
                    len(self.receipts),
                    time.monotonic(),
                    request.headers.get("webhook-id", ""),
                    verified,
                    answer,
                    event,
                )
            )
        if answer == "slow":
            await asyncio.sleep(p.receiver_slow_ms / 1000)
            return Response(status_code=200)
        return Response(status_code=int(answer))

    def start(self) -> None:
        config = self._config()
        self._server = ThreadedServer(config)
        self._thread = threading.Thread(target=self._server.run, name="hooks", daemon=True)
        self._thread.start()
        deadline = time.monotonic() + 20
        while not self._server.started:
            if time.monotonic() > deadline or not self._thread.is_alive():
                raise RuntimeError("the chaos webhook receiver did not start")
            time.sleep(0.01)

    def _config(self) -> Any:
        import uvicorn

        return uvicorn.Config(
            self.app,
            host="127.0.0.1",
            port=self.port,
            log_level="warning",
            lifespan="off",
            timeout_graceful_shutdown=5,
        )

    def stop(self) -> None:
        if self._server is not None:
            self._server.should_exit = True
        if self._thread is not None:
            self._thread.join(timeout=15)
        self._server = self._thread = None

    def take_down(self, downtime_s: float) -> str:
        """Away (connections refused) for `downtime_s`, then back on the same port."""
        self.stop()
        time.sleep(downtime_s)
        self.start()
        return "webhook receiver"


class ReplyConsumer:
    """The Dramatiq producer's actor, `on_code_event(event)`, run by a real Dramatiq worker
    on the cluster's Redis: it outlives a Redis restart the way any consumer does."""

    def __init__(self, redis_url: str, namespace: str) -> None:
        from worker.broker import build_broker

        self.events: list[tuple[float, dict[str, Any]]] = []
        self.lock = threading.Lock()
        self.broker = build_broker(redis_url, namespace)

        def on_code_event(event: dict[str, Any]) -> None:
            with self.lock:
                self.events.append((time.monotonic(), event))

        dramatiq.actor(
            on_code_event, queue_name=REPLY_QUEUE, actor_name=REPLY_ACTOR, broker=self.broker
        )
        # One thread: the queue's order is what the dispatcher enqueued.
        self.worker = dramatiq.Worker(self.broker, worker_threads=1, worker_timeout=100)

    def start(self) -> None:
        self.worker.start()

    def stop(self) -> None:
        self.worker.stop()
        self.broker.close()
