"""The producers: planned sends, over HTTP and as raw Dramatiq messages, at a steady rate."""

from __future__ import annotations

import contextlib
import random
import threading
import time
from collections import Counter
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any, get_args

import dramatiq
import httpx

from tests.support.chaos.cluster import Cluster
from tests.support.chaos.model import PHONE_CHANNELS, ChaosParams
from worker.schemas import EventType


@dataclass
class PlannedSend:
    index: int
    via: str  # http | dramatiq
    body: dict[str, Any]
    #: malformed on purpose: must end `rejected`
    invalid: bool = False


#: How people write a Russian number (`digits`: 11 of them, from the 7), all of which
#: our intake takes: they reach the logs as written whenever a message's arguments are
#: printed, so the log scan must catch each spelling.
SPELLINGS: tuple[Callable[[str], str], ...] = (
    lambda d: f"8 ({d[1:4]}) {d[4:7]}-{d[7:9]}-{d[9:]}",
    lambda d: f"+7 {d[1:4]} {d[4:7]} {d[7:9]} {d[9:]}",
    lambda d: d,
)


def recipients(sends: list[PlannedSend]) -> list[str]:
    """Every producer's recipient as written (malformed ones included)."""
    return [str(s.body["to"]) for s in sends]


#: Every event type, for the subscribers that want them all.
ALL_EVENTS = list(get_args(EventType))


def notify_for(rng: random.Random, index: int, hook_url: str) -> dict[str, Any]:
    """One subscriber's `notify`: a webhook (every event, or the defaults: the final
    ones), a Dramatiq reply (every event), or both (every event)."""
    from tests.support.chaos.hooks import REPLY_ACTOR, REPLY_QUEUE

    url = f"{hook_url}/hook/{index}"
    reply = {"queue_name": REPLY_QUEUE, "actor_name": REPLY_ACTOR}
    kind = rng.choice(("hook-all", "hook-final", "reply", "both"))
    if kind == "hook-all":
        return {"url": url, "events": list(ALL_EVENTS)}
    if kind == "hook-final":
        return {"url": url}
    if kind == "reply":
        return {**reply, "events": list(ALL_EVENTS)}
    return {"url": url, **reply, "events": list(ALL_EVENTS)}


def plan_sends(params: ChaosParams, hook_url: str | None = None) -> list[PlannedSend]:
    """Unique recipients (never the sandbox's magic +79990… numbers), chains of 2–3
    channels for phones, `email` for emails; a few malformed Dramatiq messages; with
    `hook_url`, `notify` on a share of them (and on every malformed one: `rejected` is
    an event too)."""
    rng = random.Random(params.seed)
    n = params.messages
    http_count = round(n * params.http_share)
    vias = ["http"] * http_count + ["dramatiq"] * (n - http_count)
    rng.shuffle(vias)
    dramatiq_indexes = [i for i, via in enumerate(vias) if via == "dramatiq"]
    invalid = set(rng.sample(dramatiq_indexes, min(params.invalid_messages, len(dramatiq_indexes))))
    notify_rng = random.Random(params.seed + 1)
    sends = []
    for i, via in enumerate(vias):
        if i in invalid:
            body: dict[str, Any] = {"to": f"not-a-number-{i}", "channels": ["sms"]}
        elif rng.random() < params.email_share:
            body = {"to": f"chaos.{i}@example.com", "channels": ["email"]}
        else:
            chain = rng.sample(PHONE_CHANNELS, rng.choice((2, 3)))
            to = f"+79991{i:06d}"
            if rng.random() < params.respelled_share:
                to = rng.choice(SPELLINGS)(to[1:])
            body = {"to": to, "channels": chain}
        body["metadata"] = {"chaos": i}
        if hook_url is not None and params.notify_share > 0:
            # Drawn from a generator of its own, so the plan above stays the same.
            if i in invalid:
                body["notify"] = {"url": f"{hook_url}/hook/{i}"}
            elif notify_rng.random() < params.notify_share:
                body["notify"] = notify_for(notify_rng, i, hook_url)
        sends.append(PlannedSend(i, via, body, invalid=i in invalid))
    return sends


class Producers:
    """Sends at a steady rate, as real producers would: HTTP with an Idempotency-Key and
    raw Dramatiq messages; each retries through a fault with the same key or message."""

    def __init__(self, cluster: Cluster, params: ChaosParams, run_id: str) -> None:
        self.cluster = cluster
        self.params = params
        self.run_id = run_id
        self.lock = threading.Lock()
        #: idempotency key -> (via, message id from the HTTP answer or None)
        self.accepted: dict[str, tuple[str, str | None]] = {}
        self.expected_rejected: set[str] = set()
        #: idempotency key -> the `notify` it was sent with (the messages that subscribed)
        self.notify_of: dict[str, dict[str, Any]] = {}
        self.not_accepted: list[str] = []
        #: retries by route (http, dramatiq)
        self.retries: Counter[str] = Counter()
        #: every `POST /v1/messages` try: (wall clock when it began, its HTTP status or error)
        self.intake_log: list[tuple[float, str]] = []
        #: tries answered 503 without a Retry-After header
        self.unavailable_without_retry_after = 0
        self._in_flight = 0
        #: what `run` was given to send
        self.sends: list[PlannedSend] = []
        self.http = httpx.Client(
            base_url=cluster.web_url,
            headers={"Authorization": f"Bearer {cluster.api_token}"},
            timeout=10,
            limits=httpx.Limits(max_connections=params.producer_threads),
            trust_env=False,  # loopback only: never through a proxy from the environment
        )
        from worker.broker import build_broker

        self.broker = build_broker(cluster.redis_url, cluster.namespace)

    def close(self) -> None:
        self.http.close()
        with contextlib.suppress(Exception):
            self.broker.close()

    def run(self, sends: list[PlannedSend], t0: float) -> None:
        self.sends = sends
        with ThreadPoolExecutor(self.params.producer_threads, "producer") as pool:
            for n, send in enumerate(sends):
                pause = t0 + n / self.params.send_rate - time.monotonic()
                if pause > 0:
                    time.sleep(pause)
                pool.submit(self._send, send)

    def _send(self, send: PlannedSend) -> None:
        try:
            if send.via == "http":
                self._post(send)
            else:
                self._enqueue(send)
        except Exception as exc:  # a producer bug must show in the report, not vanish
            with self.lock:
                self.not_accepted.append(f"#{send.index}: producer crashed: {exc!r}")

    def intake_busy(self) -> bool:
        """A `POST /v1/messages` is in flight right now."""
        return self._in_flight > 0

    @property
    def http_retries(self) -> int:
        return self.retries["http"]

    @property
    def enqueue_retries(self) -> int:
        return self.retries["dramatiq"]

    def _post(self, send: PlannedSend) -> None:
        key = f"chaos-{self.run_id}-{send.index}"

        def attempt() -> tuple[str, float] | str | None:
            began = time.time()
            with self.lock:
                self._in_flight += 1
            try:
                response = self.http.post(
                    "/v1/messages", json=send.body, headers={"Idempotency-Key": key}
                )
            except httpx.TransportError as exc:
                with self.lock:
                    self.intake_log.append((began, type(exc).__name__))
                return type(exc).__name__
            finally:
                with self.lock:
                    self._in_flight -= 1
            with self.lock:
                self.intake_log.append((began, str(response.status_code)))
            if response.status_code == 503:
                # As a real producer would: wait as told, then the same Idempotency-Key again.
                retry_after = response.headers.get("retry-after", "")
                if not retry_after.isdigit():
                    with self.lock:
                        self.unavailable_without_retry_after += 1
                    return "HTTP 503"
                return "HTTP 503", float(retry_after)
            if response.status_code in (200, 202):
                with self.lock:
                    self.accepted[key] = ("http", response.json()["id"])
                    if "notify" in send.body:
                        self.notify_of[key] = send.body["notify"]
                return None
            if response.status_code != 429 and response.status_code < 500:
                with self.lock:
                    self.not_accepted.append(
                        f"#{send.index}: HTTP {response.status_code} {response.text[:200]}"
                    )
                return None
            return f"HTTP {response.status_code}"

        self._retry(send, attempt, "gave up after ")

    def _enqueue(self, send: PlannedSend) -> None:
        message = dramatiq.Message(
            queue_name="kodmobi", actor_name="send_code", args=(), kwargs=send.body, options={}
        )

        def attempt() -> str | None:
            try:
                self.broker.enqueue(message)
            except Exception as exc:  # Redis away: the same message again, same message_id
                return type(exc).__name__
            with self.lock:
                self.accepted[message.message_id] = ("dramatiq", None)
                if "notify" in send.body:
                    self.notify_of[message.message_id] = send.body["notify"]
                if send.invalid:
                    self.expected_rejected.add(message.message_id)
            return None

        self._retry(send, attempt, "gave up enqueueing: ")

    def _retry(
        self,
        send: PlannedSend,
        attempt: Callable[[], tuple[str, float] | str | None],
        gave_up: str,
    ) -> None:
        """Call `attempt` until it is done (it returns None: accepted, or refused for good) or
        the producer's patience runs out; it returns the problem it would retry after, with
        the server's Retry-After when there was one. The pause between tries doubles, from
        0.1 s up to 2 s; a Retry-After is honoured as it is."""
        give_up = time.monotonic() + self.params.producer_give_up_s
        pause = 0.1
        while (result := attempt()) is not None:
            problem, wait = result if isinstance(result, tuple) else (result, pause)
            if time.monotonic() > give_up:
                with self.lock:
                    self.not_accepted.append(f"#{send.index}: {gave_up}{problem}")
                return
            with self.lock:
                self.retries[send.via] += 1
            time.sleep(wait)
            pause = min(pause * 2, 2.0)
