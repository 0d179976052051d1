"""A cap on concurrent calls to kod.mobi shared by every worker process, kept in Redis."""

from __future__ import annotations

import contextlib
import random
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from redis.exceptions import RedisError

#: A slot held longer than this (its process killed mid-call) is taken back.
SLOT_TTL_MS = 60_000

# One round trip to take a slot: drop slots older than the TTL, then take one if fewer
# than the limit are held. Redis's own clock, so hosts with skewed clocks agree.
_ACQUIRE = """
local now = redis.call('TIME')
local now_ms = tonumber(now[1]) * 1000 + math.floor(tonumber(now[2]) / 1000)
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now_ms - tonumber(ARGV[3]))
if redis.call('ZCARD', KEYS[1]) < tonumber(ARGV[2]) then
    redis.call('ZADD', KEYS[1], now_ms, ARGV[1])
    redis.call('PEXPIRE', KEYS[1], ARGV[3])
    return 1
end
return 0
"""


class SlotsBusy(Exception):
    """No slot freed up in time: the call is retried later like any transient error."""


class KodMobiSlots:
    """At most `limit` calls to kod.mobi in flight across all processes and hosts.

    A sorted set in Redis holds one member per call in flight, scored by when it
    started; a member older than SLOT_TTL_MS (a process killed mid-call) no longer
    counts. Taking a slot is one script call, giving it back one ZREM. A caller that
    finds every slot taken polls briefly with jitter, then gives up with SlotsBusy."""

    def __init__(
        self, redis_client: Any, limit: int, *, namespace: str = "kodmobi", wait_s: float = 10.0
    ) -> None:
        self._redis = redis_client
        self._key = f"{namespace}:kodmobi-call-slots"
        self._limit = limit
        self._acquire = redis_client.register_script(_ACQUIRE)
        self.wait_s = wait_s

    @contextmanager
    def __call__(self) -> Iterator[None]:
        token = uuid.uuid4().hex
        deadline = time.monotonic() + self.wait_s
        pause = 0.002
        while not self._take(token):
            if time.monotonic() >= deadline:
                raise SlotsBusy(f"no kod.mobi call slot free within {self.wait_s:g}s")
            time.sleep(random.uniform(pause / 2, pause))  # noqa: S311 - jitter, not crypto
            pause = min(pause * 2, 0.05)
        try:
            yield
        finally:
            # If Redis is away the slot simply ages out after SLOT_TTL_MS.
            with contextlib.suppress(RedisError):
                self._redis.zrem(self._key, token)

    def _take(self, token: str) -> bool:
        try:
            return bool(self._acquire(keys=[self._key], args=[token, self._limit, SLOT_TTL_MS]))
        except RedisError as exc:
            raise SlotsBusy(f"cannot reach Redis for a call slot: {type(exc).__name__}") from None
