"""Applying kod.mobi's delivery callbacks (DESIGN §6): store every one, apply what moves
an attempt forward, fall back on a failure."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime

from sqlalchemy.dialects.postgresql import insert
from sqlalchemy.orm import Session

from worker import metrics, rules
from worker.models import Attempt, CallbackEvent, Message
from worker.rules import CallbackOutcome, CallbackStatus
from worker.usecases.context import Context, bind, utcnow
from worker.usecases.transitions import (
    fallback,
    finish_attempt,
    finish_message,
    lock_attempt,
    mark_accepted,
)


@dataclass
class CallbackData:
    method: str
    content_type: str | None
    raw_body: str
    headers: dict[str, str]
    status_word: str
    kodmobi_message_id: int | None


def apply_callback(ctx: Context, attempt_id: str, data: CallbackData) -> CallbackOutcome | None:
    """Store the event and apply it if it moves things forward. Returns the outcome,
    or None when the attempt does not exist."""
    now = utcnow()
    parsed = (
        rules.parse_callback_status(data.status_word)
        if data.status_word
        else CallbackStatus.UNKNOWN
    )
    with ctx.tx() as s:
        row = lock_attempt(s, attempt_id)
        if row is None:
            return None
        message, attempt = row
        bound = bind(message, attempt)
        # Decide first, then store the event with its outcome in one statement. A
        # repeat changes nothing: statuses only move forward, so applying the same
        # status twice is a no-op; the unique key just keeps one row and counts.
        outcome, applied, follow_up = _apply(ctx, s, message, attempt, parsed, data, now)
        stored = s.execute(
            insert(CallbackEvent)
            .values(
                attempt_id=attempt_id,
                received_at=now,
                method=data.method,
                content_type=data.content_type,
                raw_body=data.raw_body,
                headers=data.headers,
                status_word=data.status_word[:64],
                parsed_status=parsed,
                kodmobi_message_id=data.kodmobi_message_id,
                applied=applied,
                outcome=outcome,
            )
            .on_conflict_do_update(
                constraint="uq_callback_events_attempt_status",
                set_={"duplicates": CallbackEvent.duplicates + 1},
            )
            .returning(CallbackEvent.duplicates)
        ).scalar_one()
        if stored > 0:
            outcome, applied = CallbackOutcome.DUPLICATE, False
    event = "callback.applied" if applied else "callback.ignored"
    bound.info(event, status=data.status_word[:64], parsed=parsed, outcome=outcome)
    if follow_up is not None:
        ctx.hand_off(follow_up)
    return outcome


def _apply(
    ctx: Context,
    s: Session,
    message: Message,
    attempt: Attempt,
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
        attempt.kodmobi_message_id = data.kodmobi_message_id
    if parsed is CallbackStatus.PROGRESS:
        # The token proves kod.mobi holds one of our sends of this attempt, even one
        # whose answer we never saw: a queued retry is then not needed.
        if mark_accepted(message, attempt, now, ctx.settings.delivery_timeout_s):
            return CallbackOutcome.PROGRESS, True, None
        return CallbackOutcome.PROGRESS_NOTED, False, None
    if parsed is CallbackStatus.DELIVERED:
        if rules.attempt_can_move(attempt.status, rules.DELIVERED):
            finish_attempt(attempt, rules.DELIVERED, "delivery callback", now)
            finish_message(s, message, rules.DELIVERED, None, now, others_open=False)
            metrics.delivered(attempt.channel, (now - message.created_at).total_seconds())
            return CallbackOutcome.DELIVERED, True, None
        if (
            attempt.status in (rules.TIMED_OUT, rules.ERROR)
            and message.status not in rules.MESSAGE_FINAL
        ):
            # The code reached the user after we gave up on this channel: say so.
            finish_message(s, message, rules.DELIVERED, None, now)
            metrics.delivered(attempt.channel, (now - message.created_at).total_seconds())
            return CallbackOutcome.LATE_DELIVERY, True, None
        return CallbackOutcome.STALE, False, None
    # a failure word
    if not rules.attempt_can_move(attempt.status, rules.FAILED):
        return CallbackOutcome.STALE, False, None
    reason = f"failure callback: {data.status_word[:64]}"
    if message.status in rules.MESSAGE_FINAL:
        finish_attempt(attempt, rules.FAILED, reason, now)
        return CallbackOutcome.FAILED, True, None
    follow_up = fallback(s, message, attempt, rules.FAILED, reason, now)
    return CallbackOutcome.FAILED, True, follow_up
