"""Every state change of a message or an attempt, each written once.

Callers hold the rows' lock (`lock_attempt`, `SELECT … FOR UPDATE`) in their transaction;
the pure rules (which moves are allowed) live in worker.rules."""

from __future__ import annotations

from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import bindparam, func, select, update
from sqlalchemy.orm import Session
from ulid import ULID

from worker import metrics, rules
from worker.models import Attempt, Message
from worker.usecases.context import bind

# Built once: constructing and cache-keying a statement on every call cost more CPU
# than running it.
_LOCK_ATTEMPT = (
    select(Message, Attempt)
    .join(Attempt, Attempt.message_id == Message.id)
    .where(Attempt.id == bindparam("attempt_id"))
    .with_for_update()
)


def lock_attempt(s: Session, attempt_id: str) -> Any:
    """`(message, attempt)` locked for this transaction, or None for an unknown attempt."""
    return s.execute(_LOCK_ATTEMPT, {"attempt_id": attempt_id}).one_or_none()


def new_attempt(
    message_id: str, seq: int, channel: str, provider_id: int | None, now: datetime
) -> Attempt:
    """A queued attempt, due now and counted as handed to the broker now."""
    return Attempt(
        id=str(ULID()),
        message_id=message_id,
        seq=seq,
        channel=channel,
        provider_id=provider_id,
        status=rules.QUEUED,
        next_try_at=now,
        dispatched_at=now,
        created_at=now,
        updated_at=now,
    )


def mark_accepted(
    message: Message, attempt: Attempt, now: datetime, delivery_timeout_s: float
) -> bool:
    """kod.mobi holds the send: the attempt waits for its callback until the deadline.
    False when the attempt is already past `accepted` (nothing moves)."""
    if not rules.attempt_can_move(attempt.status, rules.ACCEPTED):
        return False
    attempt.status = rules.ACCEPTED
    attempt.accepted_at = now
    attempt.updated_at = now
    attempt.deadline = now + timedelta(seconds=delivery_timeout_s)
    if rules.message_can_move(message.status, rules.SENT):
        message.status = rules.SENT
        message.updated_at = now
    return True


def finish_attempt(attempt: Attempt, status: str, reason: str, now: datetime) -> None:
    attempt.status = status
    attempt.reason = reason
    attempt.finished_at = now
    attempt.updated_at = now
    metrics.attempt_final(attempt.channel, status)


def finish_message(
    s: Session,
    message: Message,
    status: str,
    reason: str | None,
    now: datetime,
    *,
    others_open: bool = True,
) -> None:
    """Move the message to a final status. `others_open=False` when the caller has just
    finished the message's only open attempt (there is one at a time), which saves
    the statement that closes the rest."""
    if not rules.message_can_move(message.status, status):
        return
    message.status = status
    message.updated_at = now
    if status == rules.DELIVERED:
        message.delivered_at = now
    else:
        message.failure_reason = reason
    if others_open:
        close_open_attempts(s, message, now)
    metrics.message_final(message.source, status)
    bind(message).log(20 if status == rules.DELIVERED else 30, f"message.{status}", reason=reason)


def close_open_attempts(s: Session, message: Message, now: datetime) -> None:
    """A final message has no open attempts: whatever is still open is closed."""
    closed = s.execute(
        update(Attempt)
        .where(Attempt.message_id == message.id, Attempt.status.in_(rules.ATTEMPT_OPEN))
        .values(
            status=rules.ERROR,
            reason=func.concat_ws("; ", Attempt.reason, f"closed: message {message.status}"),
            finished_at=now,
            updated_at=now,
        )
        .returning(Attempt.channel)
    ).scalars()
    for channel in closed:
        metrics.attempt_final(channel, rules.ERROR)


def expire(s: Session, message: Message, now: datetime, *, others_open: bool = True) -> None:
    finish_message(s, message, rules.EXPIRED, "code TTL passed", now, others_open=others_open)


def fallback(
    s: Session, message: Message, attempt: Attempt, status: str, reason: str, now: datetime
) -> str | None:
    """End `attempt` with `status` and queue the next channel; the message fails when none
    is left, and expires when its TTL has passed. The one way to the next attempt:
    returns its id, for the caller to dispatch after commit."""
    finish_attempt(attempt, status, reason, now)
    if now >= message.expires_at:
        expire(s, message, now, others_open=False)
        return None
    channel = rules.next_channel(message.channels, attempt.seq)
    metrics.fallback(attempt.channel, channel, metrics.fallback_reason(status, reason))
    if channel is None:
        finish_message(
            s, message, rules.FAILED, f"all channels failed; last: {reason}", now, others_open=False
        )
        return None
    nxt = new_attempt(message.id, attempt.seq + 1, channel, None, now)
    s.add(nxt)
    bind(message, attempt).info(
        "fallback.triggered", from_channel=attempt.channel, to_channel=channel, reason=reason
    )
    return nxt.id
