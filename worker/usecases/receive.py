"""Receiving a callback through a Postgres outage (issue 12): wait it out briefly, else
spool the callback in Redis and answer; the clock drains the spool once Postgres is back.

kod.mobi's pages say nothing about retrying a callback, so one we answer non-2xx must be
taken as lost: a `delivered` lost that way let the attempt time out and the user get the
same code again on the next channel. Paths, around `apply_callback` (which stays the one
place a callback is applied, so the spool and the normal path share its dedup key, the
unique (attempt, status word, kod.mobi message id) of `callback_events`):

    Postgres up, spool empty          -> apply now                        -> 200
    spool not empty                   -> append (keeps the order)          -> 202
    Postgres away                     -> retry for CALLBACK_WAIT_S, apply  -> 200
                                         ... still away: append            -> 202
    Postgres away and Redis away      -> UNAVAILABLE                       -> 503

The web process receives callbacks in group commits (`receive_batch`): a batch is applied,
waited out or spooled as a whole, in the order it arrived.
"""

from __future__ import annotations

import time
from dataclasses import asdict
from datetime import UTC, datetime
from typing import Literal

from redis.exceptions import RedisError
from sqlalchemy.exc import DBAPIError

from worker.db import is_disconnect, retry_on_disconnect
from worker.logging import get_logger
from worker.rules import CallbackOutcome
from worker.spool import CallbackSpool, SpooledCallback
from worker.usecases.callbacks import CallbackData, apply_batch, apply_callback
from worker.usecases.context import Context

log = get_logger("worker.receive")

#: How long a receiver waits out Postgres before spooling: well under any sensible
#: client timeout of kod.mobi's (theirs is not published), and long enough for a
#: restart or a failover's blink.
CALLBACK_WAIT_S = 3.0
#: A process that found the spool empty trusts that for this long (a Redis round trip
#: per callback otherwise). Only order can suffer, and statuses never move backwards.
EMPTY_SPOOL_TRUST_S = 0.2
#: The most spooled callbacks applied per drain (one clock tick).
DRAIN_BATCH = 2_000
#: Header recorded with a spooled callback's event: when it really arrived.
SPOOLED_AT_HEADER = "x-kodmobi-spooled-at"

#: Kept in the spool, to be applied once Postgres is back (answered 202).
SPOOLED: Literal["spooled"] = "spooled"
#: Neither Postgres nor Redis could take it: kod.mobi must send it again (503).
UNAVAILABLE: Literal["unavailable"] = "unavailable"
Received = CallbackOutcome | Literal["spooled", "unavailable"] | None
Batch = list[tuple[str, CallbackData]]

_spool_seen_empty_at = 0.0
#: When this process last waited Postgres out in vain (monotonic). Batches are received one
#: after the other: were each to wait its own CALLBACK_WAIT_S while Postgres and Redis are
#: both away, a callback queued behind one would wait twice that, past kod.mobi's timeout.
_waited_in_vain_at = float("-inf")


def receive_batch(ctx: Context, batch: Batch) -> list[Received]:
    """Apply callbacks in one transaction, or keep them for later; never lose one to a
    Postgres outage. Each gets its outcome (None for an unknown attempt), `SPOOLED`, or
    `UNAVAILABLE` when it could be neither applied nor spooled."""
    spool = ctx.spool
    if spool is None:  # no Redis in this context (tests of one use case)
        return list(apply_batch(ctx, batch))
    if _spool_not_empty(spool):
        return _push_all(spool, batch, reason="spool not empty")
    global _waited_in_vain_at
    try:
        return list(apply_batch(ctx, batch))
    except DBAPIError as exc:
        if not is_disconnect(exc):
            raise
        if time.monotonic() - _waited_in_vain_at < CALLBACK_WAIT_S:
            return _push_all(spool, batch, reason=f"postgres away: {type(exc).__name__}")
    with spool.holding(CALLBACK_WAIT_S):
        try:
            return list(
                retry_on_disconnect(lambda: apply_batch(ctx, batch), budget_s=CALLBACK_WAIT_S)
            )
        except DBAPIError as exc:
            if not is_disconnect(exc):
                raise
            _waited_in_vain_at = time.monotonic()
            return _push_all(spool, batch, reason=f"postgres away: {type(exc).__name__}")


def _push_all(spool: CallbackSpool, batch: Batch, reason: str) -> list[Received]:
    received: list[Received] = []
    for attempt_id, data in batch:
        try:
            received.append(_push(spool, attempt_id, data, reason=reason))
        except RedisError:
            received.append(UNAVAILABLE)
    return received


def _spool_not_empty(spool: CallbackSpool) -> bool:
    global _spool_seen_empty_at
    now = time.monotonic()
    if now - _spool_seen_empty_at < EMPTY_SPOOL_TRUST_S:
        return False
    try:
        waiting = spool.pending()
    except RedisError:
        return False  # Redis away: Postgres decides alone
    if waiting == 0:
        _spool_seen_empty_at = now
    return waiting > 0


def _push(spool: CallbackSpool, attempt_id: str, data: CallbackData, reason: str) -> Received:
    global _spool_seen_empty_at
    received_at = time.time()
    fields = asdict(data)
    fields["headers"] = {
        **data.headers,
        SPOOLED_AT_HEADER: datetime.fromtimestamp(received_at, UTC).isoformat(),
    }
    try:
        spool.push(SpooledCallback(attempt_id, received_at, fields))
    except RedisError as exc:
        log.warning(
            "callback.unavailable", attempt_id=attempt_id, reason=reason,
            error=type(exc).__name__,
        )
        raise
    _spool_seen_empty_at = 0.0  # later callbacks queue behind this one
    log.warning("callback.spooled", attempt_id=attempt_id, status=data.status_word, reason=reason)
    return SPOOLED


def drain_spool(ctx: Context) -> bool:
    """Apply spooled callbacks in the order received; True when nothing is held back any
    more (spool empty, no receiver waiting), so silent attempts may be timed out.

    Run by the clock before it times anything out. One drainer at a time; a drainer that
    dies after applying but before popping makes the next apply a counted duplicate."""
    spool = ctx.spool
    if spool is None:
        return True
    applied = 0
    try:
        with spool.draining() as mine:
            while mine and applied < DRAIN_BATCH:
                raw = spool.head()
                if raw is None:
                    break
                if not _apply_spooled(ctx, spool, raw):
                    return False  # Postgres still away
                applied += 1
        if applied:
            log.info("callback.spool_drained", applied=applied)
        return spool.quiet()
    except RedisError as exc:
        # Without Redis nobody can tell what the spool holds: hold the timeouts.
        log.warning("callback.spool_unreachable", error=type(exc).__name__)
        return False


def _apply_spooled(ctx: Context, spool: CallbackSpool, raw: bytes) -> bool:
    try:
        entry = SpooledCallback.decode(raw)
        data = CallbackData(**entry.fields)
    except (ValueError, TypeError, KeyError) as exc:
        log.error("callback.spool_unreadable", error=str(exc)[:200])
        spool.bury(raw)
        return True
    try:
        outcome = apply_callback(ctx, entry.attempt_id, data)
    except DBAPIError as exc:
        if is_disconnect(exc):
            return False
        log.error(
            "callback.spool_failed", attempt_id=entry.attempt_id, error=type(exc).__name__,
            detail=str(exc)[:300],
        )
        spool.bury(raw)
        return True
    spool.done(raw)
    log.info(
        "callback.unspooled",
        attempt_id=entry.attempt_id,
        outcome=outcome or "unknown attempt",
        held_s=round(max(0.0, time.time() - entry.received_at), 3),
    )
    return True
