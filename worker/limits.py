"""A cap on concurrent calls to kod.mobi shared by every worker process, kept in Redis."""

from __future__ import annotations

import random
import time
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from dramatiq.rate_limits import ConcurrentRateLimiter
from dramatiq.rate_limits.backends import RedisBackend

#: A slot held longer than this (a process killed mid-call) is freed by Redis itself.
SLOT_TTL_MS = 60_000


class SlotsBusy(Exception):
    """No slot freed up in time: the call is retried later like any transient error."""


class KodMobiSlots:
    """At most `limit` calls to kod.mobi in flight across all processes and hosts.

    Built on Dramatiq's ConcurrentRateLimiter (a counter in Redis with a TTL); a
    caller that finds every slot taken polls briefly with jitter, then gives up."""

    def __init__(
        self, redis_client: Any, limit: int, *, namespace: str = "kodmobi", wait_s: float = 10.0
    ) -> None:
        self._limiter = ConcurrentRateLimiter(
            RedisBackend(client=redis_client),
            f"{namespace}:kodmobi-calls",
            limit=limit,
            ttl=SLOT_TTL_MS,
        )
        self.wait_s = wait_s

    @contextmanager
    def __call__(self) -> Iterator[None]:
        deadline = time.monotonic() + self.wait_s
        pause = 0.002
        while True:
            with self._limiter.acquire(raise_on_failure=False) as acquired:
                if acquired:
                    yield
                    return
            if time.monotonic() >= deadline:
                raise SlotsBusy(f"no kod.mobi call slot free within {self.wait_s:g}s")
            time.sleep(random.uniform(pause / 2, pause))  # noqa: S311 - jitter, not crypto
            pause = min(pause * 2, 0.05)
