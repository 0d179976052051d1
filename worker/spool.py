"""Callbacks kept in Redis while Postgres is away (issue 12): a spool, and a record of
callbacks a receiver is still holding while it waits Postgres out.

Keys live in the broker's namespace (`{namespace}:callbacks:*`), in the Redis that already
carries our work and is saved to its append-only file. The spool is a list drained from
its head, in the order callbacks were received; `worker.usecases.receive` fills and
drains it. Redis errors are the caller's to handle: each method either does its one
thing or raises `redis.exceptions.RedisError`.
"""

from __future__ import annotations

import contextlib
import json
import threading
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any

from redis.exceptions import RedisError

#: A drainer that died keeps the others out at most this long.
DRAIN_LOCK_MS = 30_000
#: A receiver's mark that it is holding a callback back lapses this long after the time it
#: said it would be done (its process may have died holding it).
HOLD_MARGIN_S = 5.0


@dataclass(frozen=True)
class SpooledCallback:
    """One callback as received, to be applied later: what `apply_callback` takes."""

    attempt_id: str
    received_at: float
    fields: dict[str, Any]

    def encode(self) -> str:
        return json.dumps(
            {"attempt_id": self.attempt_id, "received_at": self.received_at, "data": self.fields},
            separators=(",", ":"),
        )

    @classmethod
    def decode(cls, raw: bytes | str) -> SpooledCallback:
        value = json.loads(raw)
        return cls(str(value["attempt_id"]), float(value["received_at"]), dict(value["data"]))


class CallbackSpool:
    """The spool of one deployment (one broker namespace) on `client`."""

    def __init__(self, client: Any, namespace: str) -> None:
        self.client = client
        self.key = f"{namespace}:callbacks:spool"
        self.held_key = f"{namespace}:callbacks:held"
        self.dead_key = f"{namespace}:callbacks:dead"
        self.lock_key = f"{namespace}:callbacks:drain-lock"
        # This process's drain-lock token: a lock it could not give back (Redis went away
        # as it let go, and the lock's expiry survives a restart in the AOF) is still its
        # own, and must not keep it from draining for DRAIN_LOCK_MS after Redis is back.
        self._token = uuid.uuid4().hex
        self._draining_here = threading.Lock()

    # -- receiving ------------------------------------------------------------------------

    def push(self, entry: SpooledCallback) -> None:
        """Append a callback; once this returns it is in Redis (and its AOF)."""
        self.client.rpush(self.key, entry.encode())

    def pending(self) -> int:
        return int(self.client.llen(self.key))

    @contextmanager
    def holding(self, for_s: float) -> Iterator[None]:
        """Say, for the clock's sake, that a callback is being held back for up to `for_s`;
        best effort: without Redis the clock cannot read the spool either, and waits."""
        member = uuid.uuid4().hex
        marked = False
        with contextlib.suppress(RedisError):
            self.client.zadd(self.held_key, {member: time.time() + for_s + HOLD_MARGIN_S})
            marked = True
        try:
            yield
        finally:
            if marked:
                with contextlib.suppress(RedisError):  # else it lapses by itself
                    self.client.zrem(self.held_key, member)

    # -- draining -------------------------------------------------------------------------

    def quiet(self) -> bool:
        """Nothing spooled and no receiver holding a callback back (raises without Redis)."""
        pipe = self.client.pipeline(transaction=False)
        pipe.llen(self.key)
        pipe.zremrangebyscore(self.held_key, "-inf", time.time())
        pipe.zcard(self.held_key)
        spooled, _, held = pipe.execute()
        return int(spooled) == 0 and int(held) == 0

    @contextmanager
    def draining(self) -> Iterator[bool]:
        """Yields True for the one drainer at a time, False for the others."""
        if not self._draining_here.acquire(blocking=False):
            yield False
            return
        try:
            token = self._token
            mine = bool(self.client.set(self.lock_key, token, nx=True, px=DRAIN_LOCK_MS))
            if not mine and self.client.get(self.lock_key) == token.encode():
                mine = bool(self.client.set(self.lock_key, token, xx=True, px=DRAIN_LOCK_MS))
            try:
                yield mine
            finally:
                if mine:
                    with contextlib.suppress(RedisError):  # else it lapses by itself
                        if self.client.get(self.lock_key) == token.encode():
                            self.client.delete(self.lock_key)
        finally:
            self._draining_here.release()

    def head(self) -> bytes | None:
        value: bytes | None = self.client.lindex(self.key, 0)
        return value

    def done(self, raw: bytes) -> None:
        """Take the head off once applied (only the lock holder calls this)."""
        self.client.lpop(self.key)

    def bury(self, raw: bytes) -> None:
        """Move a head that cannot be applied aside, kept for a person to look at."""
        pipe = self.client.pipeline(transaction=True)
        pipe.rpush(self.dead_key, raw)
        pipe.lpop(self.key)
        pipe.execute()
