"""Delivery callbacks: POST (or GET) each planned status to `callback_url` in the background."""

from __future__ import annotations

import asyncio
import json
import logging
from typing import TYPE_CHECKING, Any
from urllib.parse import urlencode, urlsplit

import httpx

from worker.sandbox.plainhttp import CallbackHttpError, PlainHttpClient
from worker.sandbox.rules import iso_now

if TYPE_CHECKING:
    from worker.sandbox.state import SandboxState

log = logging.getLogger("worker.sandbox.callbacks")

#: pause between tries of one callback ("1 s apart")
RETRY_PAUSE_S = 1.0
#: callbacks waiting or in flight beyond this are dropped (and counted), so that a dead or
#: hanging receiver under a benchmark's load cannot grow memory without bound
MAX_PENDING = 50_000
CALLBACK_TIMEOUT = httpx.Timeout(5.0, connect=2.0, pool=10.0)
CALLBACK_LIMITS = httpx.Limits(max_connections=1000, max_keepalive_connections=200)


class CallbackDispatcher:
    """Owns the HTTP clients and the background tasks that send callbacks.

    http:// callbacks go through a lean keep-alive client (plainhttp.py: httpx's async
    pool would cap us near 500 callbacks/s); https:// ones through one shared httpx client.
    """

    def __init__(self, state: SandboxState) -> None:
        self._state = state
        self._client: httpx.AsyncClient | None = None
        self._plain = PlainHttpClient()
        # Strong references: the event loop keeps only weak ones to running tasks.
        self._tasks: set[asyncio.Task[None]] = set()

    @property
    def pending(self) -> int:
        return len(self._tasks)

    def _http(self) -> httpx.AsyncClient:
        # Built in the app's lifespan; built here too for a host that skips the lifespan.
        if self._client is None:
            self._client = httpx.AsyncClient(
                timeout=CALLBACK_TIMEOUT,
                limits=CALLBACK_LIMITS,
                # Callback URLs point at our own services: never through an env proxy.
                trust_env=False,
                headers={"user-agent": "kodmobi-sandbox"},
            )
        return self._client

    async def start(self) -> None:
        self._http()

    async def stop(self) -> None:
        tasks = list(self._tasks)
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        if self._client is not None:
            await self._client.aclose()
            self._client = None
        await self._plain.aclose()

    def schedule(self, record: dict[str, Any], statuses: tuple[str, ...], delay_s: float) -> None:
        """Send `statuses` in order to the record's callback_url, starting after `delay_s`."""
        stats = self._state.stats
        if len(self._tasks) >= MAX_PENDING:
            for status in statuses:
                dropped = {"status": status, "sent_at": None, "result": "dropped", "tries": 0}
                record["callbacks"].append({**dropped, "answers": []})
            stats.callbacks_dropped += len(statuses)
            return
        task = asyncio.get_running_loop().create_task(self._run(record, statuses, delay_s))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _run(self, record: dict[str, Any], statuses: tuple[str, ...], delay_s: float) -> None:
        try:
            if delay_s > 0:
                await asyncio.sleep(delay_s)
            for status in statuses:
                await self._send_one(record, status)
        except asyncio.CancelledError:
            raise
        except Exception:  # a callback must never take the server down
            self._state.stats.callbacks_failed += 1
            log.exception("sandbox callback crashed for message %s", record.get("message_id"))

    async def _send_one(self, record: dict[str, Any], status: str) -> None:
        state = self._state
        config = state.config
        url: str = record["callback_url"]
        body = {
            "message_id": record["message_id"],
            "status": status,
            "channel": record["channel"],
            "to": record["to"],
            # A "sent" is about the moment of acceptance: stale when it arrives late.
            "timestamp": record["received_at"] if status == "sent" else iso_now(),
        }
        entry: dict[str, Any] = {
            "status": status,
            "sent_at": iso_now(),
            "result": None,
            "tries": 0,
            # Each try's answer, kept: a receiver's 5xx must show even when a retry got through.
            "answers": [],
        }
        record["callbacks"].append(entry)
        ok = False
        for attempt in range(config.callback_retries + 1):
            if attempt:
                state.stats.callbacks_retried += 1
                await asyncio.sleep(RETRY_PAUSE_S)
            entry["tries"] = attempt + 1
            tried_at = iso_now()
            try:
                status_code = await self._deliver(url, body, state.config.callback_style)
            except (CallbackHttpError, httpx.HTTPError) as exc:
                entry["result"] = (
                    str(exc) if isinstance(exc, CallbackHttpError) else (type(exc).__name__)
                )
                self._answered(entry, tried_at)
                continue
            entry["result"] = str(status_code)
            self._answered(entry, tried_at)
            if status_code < 500:
                # A 4xx is the receiver's verdict on this callback: asking again won't change it.
                ok = status_code < 400
                break
        if ok:
            state.stats.callbacks_sent += 1
        else:
            state.stats.callbacks_failed += 1

    def _answered(self, entry: dict[str, Any], tried_at: str) -> None:
        """Record one try's answer (`entry["result"]`) in the send's record and the stats."""
        result = str(entry["result"])
        entry["answers"].append({"at": tried_at, "result": result})
        answers = self._state.stats.callback_answers
        answers[result] = answers.get(result, 0) + 1

    async def _deliver(self, url: str, body: dict[str, Any], style: str) -> int:
        """One try: the receiver's HTTP status, or CallbackHttpError / httpx.HTTPError."""
        parts = urlsplit(url)
        if parts.scheme == "http":
            if style == "get":
                # Merged, not replaced: the callback URL may carry a query of its own.
                query = "&".join(q for q in (parts.query, urlencode(body)) if q)
                return await self._plain.request("GET", parts._replace(query=query))
            if style == "form":
                payload, content_type = (
                    urlencode(body).encode(),
                    "application/x-www-form-urlencoded",
                )
            else:
                payload, content_type = json.dumps(body).encode(), "application/json"
            return await self._plain.request("POST", parts, payload, content_type)
        client = self._http()
        if style == "form":
            response = await client.post(url, data=body)
        elif style == "get":
            response = await client.get(httpx.URL(url).copy_merge_params(body))
        else:
            response = await client.post(url, json=body)
        return response.status_code
