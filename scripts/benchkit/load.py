"""Producing load: a staged backlog of Dramatiq messages, and a keep-alive HTTP load generator."""

from __future__ import annotations

import asyncio
import time
import uuid
from collections import Counter
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any
from urllib.parse import urlsplit

import dramatiq

from scripts.benchkit.system import System
from worker.broker import QUEUE


def send_code_message(to: str, notify: dict[str, Any] | None = None) -> dramatiq.Message[Any]:
    kwargs: dict[str, Any] = {"to": to, "channels": ["sms"]}
    if notify is not None:
        kwargs["notify"] = notify
    return dramatiq.Message(
        queue_name=QUEUE, actor_name="send_code", args=(), kwargs=kwargs, options={}
    )


def stage_messages(sys_: System, messages: list[dramatiq.Message[Any]]) -> str:
    """Write the messages as Dramatiq's enqueue does (HSET the body, RPUSH the id), but
    onto a staging list that `release()` renames into place: workers then find the whole
    backlog at once, after their start-up. Pipelined, so the producer is not what we time."""
    queue_key = f"{sys_.namespace}:{QUEUE}"
    staging = f"{sys_.namespace}:bench-staging"
    pipe = sys_.redis.pipeline(transaction=False)
    for i, message in enumerate(messages, 1):
        redis_id = str(uuid.uuid4())
        data = message.copy(options={"redis_message_id": redis_id}).encode()
        pipe.hset(f"{queue_key}.msgs", redis_id, data)
        pipe.rpush(staging, redis_id)
        if i % 1000 == 0:
            pipe.execute()
    pipe.execute()
    return staging


def release(sys_: System, staging: str) -> float:
    """Make the staged backlog visible to the workers; the figure's clock starts here."""
    t0 = time.monotonic()
    sys_.redis.rename(staging, f"{sys_.namespace}:{QUEUE}")
    return t0


@dataclass
class LoadResult:
    requests: int
    elapsed_s: float
    statuses: dict[int, int]
    per_s: float


@dataclass
class _Load:
    items: Iterator[tuple[bytes, bytes]]
    statuses: Counter[int] = field(default_factory=Counter)


#: A request not answered within this long counts as failed (status 0), as a caller
#: such as kod.mobi would give up on it (its timeout is not published; 5 s is typical).
REQUEST_TIMEOUT_S = 5.0


async def _connection(host: str, port: int, load: _Load) -> None:
    reader, writer = await asyncio.open_connection(host, port)
    try:
        for path, body in load.items:
            writer.write(
                b"POST " + path + b" HTTP/1.1\r\nHost: " + host.encode() + b"\r\n"
                b"Content-Type: application/json\r\nUser-Agent: kodmobi-bench\r\n"
                b"Content-Length: " + str(len(body)).encode() + b"\r\n\r\n" + body
            )
            try:
                head = await asyncio.wait_for(
                    reader.readuntil(b"\r\n\r\n"), timeout=REQUEST_TIMEOUT_S
                )
            except TimeoutError:
                load.statuses[0] += 1
                writer.close()
                reader, writer = await asyncio.open_connection(host, port)
                continue
            status = int(head[9:12])
            length = 0
            close = False
            for line in head.split(b"\r\n")[1:]:
                name, _, value = line.partition(b":")
                name = name.strip().lower()
                if name == b"content-length":
                    length = int(value)
                elif name == b"connection" and value.strip().lower() == b"close":
                    close = True
            if length:
                await reader.readexactly(length)
            load.statuses[status] += 1
            if close:
                writer.close()
                reader, writer = await asyncio.open_connection(host, port)
    finally:
        writer.close()


def fire(url: str, requests: list[tuple[bytes, bytes]], concurrency: int) -> LoadResult:
    """A small keep-alive HTTP/1.1 load generator: `concurrency` connections, each sending
    the next request once its previous answer is read (uvloop when available)."""
    parts = urlsplit(url)
    host, port = parts.hostname or "127.0.0.1", parts.port or 80
    load = _Load(iter(requests))

    async def main() -> float:
        t0 = time.monotonic()
        await asyncio.gather(*(_connection(host, port, load) for _ in range(concurrency)))
        return time.monotonic() - t0

    try:
        import uvloop

        elapsed = uvloop.run(main())
    except ImportError:
        elapsed = asyncio.run(main())
    done = sum(load.statuses.values())
    return LoadResult(done, elapsed, dict(load.statuses), done / elapsed)
