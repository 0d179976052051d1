"""Applying kod.mobi's delivery callbacks (DESIGN §6): store every one, apply what moves
an attempt forward, fall back on a failure."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from typing import Any

from psycopg.types.json import Jsonb
from sqlalchemy import Connection

from worker import rules
from worker.rules import CallbackOutcome, CallbackStatus
from worker.usecases.context import Context, bind, utcnow
from worker.usecases.store import AttemptRow, Changes, MessageRow, lock_pairs
from worker.usecases.transitions import fallback, finish_attempt, finish_message, mark_accepted

#: Stored events per attempt: kod.mobi sends a handful; past this, events are applied
#: but not stored, so a leaked URL cannot fill the table (issue 13).
MAX_EVENTS_PER_ATTEMPT = 32
#: Raw body kept of a callback whose status word we do not know: enough to learn the
#: word, not 64 KiB a time (issue 13).
UNKNOWN_BODY_CHARS = 1024



@dataclass
class CallbackData:
    method: str
    content_type: str | None
    raw_body: str
    headers: dict[str, str]
    status_word: str
    kodmobi_message_id: int | None


# The event, unless the attempt has MAX_EVENTS_PER_ATTEMPT already (then no row comes
# back: the callback is still applied, just not stored); a repeat counts on its row.
_STORE_EVENT = f"""
INSERT INTO callback_events (attempt_id, received_at, method, content_type, raw_body,
    headers, status_word, parsed_status, kodmobi_message_id, applied, outcome, duplicates)
SELECT %(ev_attempt_id)s, %(ev_received_at)s, %(ev_method)s, %(ev_content_type)s,
    %(ev_raw_body)s, %(ev_headers)s, %(ev_status_word)s, %(ev_parsed_status)s,
    %(ev_kodmobi_message_id)s, %(ev_applied)s, %(ev_outcome)s, 0
WHERE (SELECT count(*) FROM callback_events WHERE attempt_id = %(ev_attempt_id)s::varchar)
      < {MAX_EVENTS_PER_ATTEMPT}
ON CONFLICT ON CONSTRAINT uq_callback_events_attempt_status
DO UPDATE SET duplicates = callback_events.duplicates + 1
RETURNING duplicates
"""


def apply_callback(ctx: Context, attempt_id: str, data: CallbackData) -> CallbackOutcome | None:
    """Store the event and apply it if it moves things forward, in a transaction of its
    own. Returns the outcome, or None when the attempt does not exist."""
    (result,) = apply_batch(ctx, [(attempt_id, data)])
    return result


Applied = CallbackOutcome | None


def apply_batch(ctx: Context, batch: list[tuple[str, CallbackData]]) -> list[Applied]:
    """Apply callbacks in one transaction (a group commit), in order; each one's outcome,
    None for an unknown attempt. The rows of every attempt named are locked in one
    statement, in id order (so two batches never wait on each other in a cycle); then
    each callback is one statement storing its event with every change it causes.

    The same callback twice in a batch, or a stale one after a final one, is decided
    against the rows as the ones before it left them: a duplicate, or stale."""
    results: list[Applied] = []
    follow_ups: list[str] = []
    logged: list[tuple[Any, CallbackData, CallbackStatus, CallbackOutcome, bool]] = []
    with ctx.conn() as conn:
        pairs = lock_pairs(conn, sorted({attempt_id for attempt_id, _ in batch}))
        for attempt_id, data in batch:
            locked = pairs.get(attempt_id)
            if locked is None:
                results.append(None)
                continue
            message, attempt = locked
            parsed, outcome, applied, follow_up = _store(ctx, conn, message, attempt, data)
            results.append(outcome)
            logged.append((bind(message, attempt), data, parsed, outcome, applied))
            if follow_up is not None:
                follow_ups.append(follow_up)
    for bound, data, parsed, outcome, applied in logged:
        event = "callback.applied" if applied else "callback.ignored"
        bound.info(event, status=data.status_word[:64], parsed=parsed.value, outcome=outcome.value)
    for attempt_id in follow_ups:
        ctx.hand_off(attempt_id)
    return results


def _store(
    ctx: Context, conn: Connection, message: MessageRow, attempt: AttemptRow, data: CallbackData
) -> tuple[CallbackStatus, CallbackOutcome, bool, str | None]:
    """Decide one callback on locked rows, then store its event and changes together."""
    now = utcnow()
    parsed = (
        rules.parse_callback_status(data.status_word)
        if data.status_word
        else CallbackStatus.UNKNOWN
    )
    # Decide first, then store the event with its outcome and every change in one
    # statement. A repeat changes nothing: statuses only move forward, so applying the
    # same status twice is a no-op; the unique key just keeps one row and counts.
    changes = Changes()
    outcome, applied, follow_up = _apply(ctx, changes, message, attempt, parsed, data, now)
    sql, params = changes.statement(_STORE_EVENT)
    params.update(
        ev_attempt_id=attempt.id,
        ev_received_at=now,
        ev_method=data.method,
        ev_content_type=data.content_type,
        ev_raw_body=(
            data.raw_body[:UNKNOWN_BODY_CHARS]
            if parsed is CallbackStatus.UNKNOWN
            else data.raw_body
        ),
        ev_headers=Jsonb(data.headers),
        ev_status_word=data.status_word[:64],
        ev_parsed_status=parsed.value,
        ev_kodmobi_message_id=data.kodmobi_message_id,
        ev_applied=applied,
        ev_outcome=outcome.value,
    )
    repeats = conn.exec_driver_sql(sql, params).scalar()
    if repeats is None:
        bind(message, attempt).warning(
            "callback.not_stored", reason="event cap", outcome=outcome.value
        )
    elif repeats > 0:
        return parsed, CallbackOutcome.DUPLICATE, False, follow_up
    return parsed, outcome, applied, follow_up


def _apply(
    ctx: Context,
    changes: Changes,
    message: MessageRow,
    attempt: AttemptRow,
    parsed: CallbackStatus,
    data: CallbackData,
    now: datetime,
) -> tuple[CallbackOutcome, bool, str | None]:
    """`(outcome, applied, next attempt to dispatch)` for one callback, rows locked."""
    if parsed is CallbackStatus.UNKNOWN:
        return CallbackOutcome.UNKNOWN_STATUS, False, None
    if (
        data.kodmobi_message_id is not None
        and attempt.kodmobi_message_id is not None
        and data.kodmobi_message_id != attempt.kodmobi_message_id
    ):
        return CallbackOutcome.MESSAGE_ID_MISMATCH, False, None
    if data.kodmobi_message_id is not None and attempt.kodmobi_message_id is None:
        changes.attempt(attempt, kodmobi_message_id=data.kodmobi_message_id)
    if parsed is CallbackStatus.PROGRESS:
        # The token proves kod.mobi holds one of our sends of this attempt, even one
        # whose answer we never saw: a queued retry is then not needed.
        if mark_accepted(changes, message, attempt, now, ctx.settings.delivery_timeout_s):
            return CallbackOutcome.PROGRESS, True, None
        return CallbackOutcome.PROGRESS_NOTED, False, None
    if parsed is CallbackStatus.DELIVERED:
        if rules.attempt_can_move(attempt.status, rules.DELIVERED):
            finish_attempt(changes, attempt, rules.DELIVERED, "delivery callback", now)
            finish_message(changes, message, rules.DELIVERED, None, now, others_open=False)
            return CallbackOutcome.DELIVERED, True, None
        if (
            attempt.status in (rules.TIMED_OUT, rules.ERROR)
            and message.status not in rules.MESSAGE_FINAL
        ):
            # The code reached the user after we gave up on this channel: say so.
            finish_message(changes, message, rules.DELIVERED, None, now)
            return CallbackOutcome.LATE_DELIVERY, True, None
        return CallbackOutcome.STALE, False, None
    # a failure word
    if not rules.attempt_can_move(attempt.status, rules.FAILED):
        return CallbackOutcome.STALE, False, None
    reason = f"failure callback: {data.status_word[:64]}"
    if message.status in rules.MESSAGE_FINAL:
        finish_attempt(changes, attempt, rules.FAILED, reason, now)
        return CallbackOutcome.FAILED, True, None
    follow_up = fallback(changes, message, attempt, rules.FAILED, reason, now)
    return CallbackOutcome.FAILED, True, follow_up
