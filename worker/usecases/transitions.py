"""Every state change of a message or an attempt, each written once.

Each takes rows its caller holds under lock (worker.usecases.store) and records what
changes in a `Changes`, which the caller writes in one statement; the pure rules
(which moves are allowed) live in worker.rules."""

from __future__ import annotations

from datetime import datetime, timedelta
from typing import Any

from ulid import ULID

from worker import metrics, rules
from worker.usecases.context import bind
from worker.usecases.store import AttemptRow, Changes, MessageRow


def new_attempt(
    message_id: str, seq: int, channel: str, provider_id: int | None, now: datetime
) -> dict[str, Any]:
    """A queued attempt's columns: due now and counted as handed to the broker now."""
    return {
        "id": str(ULID()),
        "message_id": message_id,
        "seq": seq,
        "channel": channel,
        "provider_id": provider_id,
        "status": rules.QUEUED,
        "tries": 0,
        "next_try_at": now,
        "dispatched_at": now,
        "created_at": now,
        "updated_at": now,
    }


def mark_accepted(
    changes: Changes,
    message: MessageRow,
    attempt: AttemptRow,
    now: datetime,
    delivery_timeout_s: float,
) -> bool:
    """kod.mobi holds the send: the attempt waits for its callback until the deadline.
    False when the attempt is already past `accepted` (nothing moves)."""
    if not rules.attempt_can_move(attempt.status, rules.ACCEPTED):
        return False
    changes.attempt(
        attempt,
        status=rules.ACCEPTED,
        accepted_at=now,
        updated_at=now,
        deadline=now + timedelta(seconds=delivery_timeout_s),
    )
    if rules.message_can_move(message.status, rules.SENT):
        changes.message(message, status=rules.SENT, updated_at=now)
        changes.event(message.id, f"message.{rules.SENT}", now)
    return True


def finish_attempt(
    changes: Changes, attempt: AttemptRow, status: str, reason: str, now: datetime
) -> None:
    changes.attempt(attempt, status=status, reason=reason, finished_at=now, updated_at=now)
    metrics.attempt_final(attempt.channel, status)


def finish_message(
    changes: Changes,
    message: MessageRow,
    status: str,
    reason: str | None,
    now: datetime,
    *,
    others_open: bool = True,
) -> None:
    """Move the message to a final status. `others_open=False` when the caller has just
    finished the message's only open attempt (there is one at a time), which saves
    closing the rest."""
    if not rules.message_can_move(message.status, status):
        return
    if status == rules.DELIVERED:
        changes.message(message, status=status, updated_at=now, delivered_at=now)
    else:
        changes.message(message, status=status, updated_at=now, failure_reason=reason)
    changes.event(message.id, f"message.{status}", now)
    if others_open:
        changes.close_open_attempts(message.id, f"closed: message {status}", now)
    metrics.message_final(message.source, status)
    bind(message).log(20 if status == rules.DELIVERED else 30, f"message.{status}", reason=reason)


def expire(
    changes: Changes, message: MessageRow, now: datetime, *, others_open: bool = True
) -> None:
    finish_message(changes, message, rules.EXPIRED, "code TTL passed", now, others_open=others_open)


def fallback(
    changes: Changes,
    message: MessageRow,
    attempt: AttemptRow,
    status: str,
    reason: str,
    now: datetime,
) -> str | None:
    """End `attempt` with `status` and queue the next channel; the message fails when none
    is left, and expires when its TTL has passed. The one way to a next attempt: returns
    its id, for the caller to dispatch after commit."""
    finish_attempt(changes, attempt, status, reason, now)
    if now >= message.expires_at:
        expire(changes, message, now, others_open=False)
        return None
    channel = rules.next_channel(message.channels, attempt.seq)
    metrics.fallback(attempt.channel, channel, metrics.fallback_reason(status, reason))
    if channel is None:
        finish_message(
            changes,
            message,
            rules.FAILED,
            f"all channels failed; last: {reason}",
            now,
            others_open=False,
        )
        return None
    nxt = new_attempt(message.id, attempt.seq + 1, channel, None, now)
    changes.insert_attempt(**nxt)
    detail = {"from_channel": attempt.channel, "to_channel": channel, "reason": reason}
    changes.event(message.id, "message.fallback", now, detail)
    bind(message, attempt).info(
        "fallback.triggered", from_channel=attempt.channel, to_channel=channel, reason=reason
    )
    return str(nxt["id"])
