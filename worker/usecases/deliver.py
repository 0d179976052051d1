"""Delivering an attempt (DESIGN §5.2): claim it, call kod.mobi, record the answer.

The happy path is two statements: one UPDATE … RETURNING claims the attempt, one records
kod.mobi's answer. A failed call goes through the policy its error class declares
(worker.kodmobi.errors): retry later, fall back now, or fail the message."""

from __future__ import annotations

from datetime import datetime, timedelta
from typing import Any

from ulid import ULID

from worker import rules
from worker.call_slots import SlotsBusy
from worker.db import retry_on_disconnect
from worker.kodmobi.errors import Action, KodMobiError
from worker.kodmobi.models import ManualSendResponse
from worker.logging import get_logger
from worker.usecases import outbox
from worker.usecases.context import Context, bind, utcnow
from worker.usecases.store import Changes, in_list, lock_pair
from worker.usecases.transitions import expire, fallback, finish_attempt, finish_message

log = get_logger("worker.deliver")

#: When every kod.mobi call slot is taken, try the attempt again this much later.
SLOT_RETRY_S = 1.0
#: An attempt due this soon is sent now rather than left for the clock.
DUE_SLACK = timedelta(milliseconds=50)

# The claim: only a queued, due attempt of an open, unexpired message is sent. The
# attempt's row lock and its `status = 'queued'` guard (re-checked by Postgres after any
# wait) make two claims of one attempt impossible. Every path that ends a message also
# closes its open attempts, so the guard covers a message ended meanwhile too.
_CLAIM = f"""
WITH claimed AS (
  UPDATE attempts a
     SET status = '{rules.SENDING}', tries = a.tries + 1, sent_at = %(now)s,
         updated_at = %(now)s, deadline = %(deadline)s
    FROM messages m
   WHERE a.id = %(attempt_id)s AND m.id = a.message_id
     AND a.status = '{rules.QUEUED}' AND a.next_try_at <= %(due)s
     AND m.status IN {in_list(rules.MESSAGE_OPEN)} AND m.expires_at > %(now)s
  RETURNING a.message_id, a.seq, a.channel, a.provider_id, a.tries,
            m.recipient, m.code_ciphertext, a.id, {outbox.attempt_view("a")} AS v
), moved AS (
  UPDATE messages SET status = '{rules.SENDING}', updated_at = %(now)s
   WHERE id = (SELECT message_id FROM claimed)
     AND status IN {in_list(rules.message_moves_to(rules.SENDING))}
  {outbox.MESSAGE_RETURNING}
), event AS (
  {outbox.insert_one(
      id_param="%(event_id)s", type_sql=f"'message.{rules.SENDING}'", at_param="%(now)s",
      source="moved", attempts="claimed")}
)
SELECT message_id, seq, channel, provider_id, tries, recipient, code_ciphertext FROM claimed
"""

_TO_ACCEPTED = in_list(rules.attempt_moves_to(rules.ACCEPTED))
# kod.mobi's answer: recorded on the attempt always; `accepted` (with its callback
# deadline) only if no callback or sweep moved it on first; the message becomes `sent`.
_RECORD_ACCEPTED = f"""
WITH a AS (
  UPDATE attempts
     SET kodmobi_message_id = %(kodmobi_message_id)s, kodmobi_code = %(kodmobi_code)s,
         http_status = 200, updated_at = %(now)s,
         accepted_at = CASE WHEN status IN {_TO_ACCEPTED} THEN %(now)s ELSE accepted_at END,
         deadline = CASE WHEN status IN {_TO_ACCEPTED} THEN %(deadline)s ELSE deadline END,
         status = CASE WHEN status IN {_TO_ACCEPTED} THEN '{rules.ACCEPTED}' ELSE status END
   WHERE id = %(attempt_id)s
  {outbox.ATTEMPT_RETURNING}
), moved AS (
  UPDATE messages SET status = '{rules.SENT}', updated_at = %(now)s
   WHERE id = (SELECT message_id FROM a)
     AND status IN {in_list(rules.message_moves_to(rules.SENT))}
  {outbox.MESSAGE_RETURNING}
)
{outbox.insert_one(
    id_param="%(event_id)s", type_sql=f"'message.{rules.SENT}'", at_param="%(now)s",
    source="moved", attempts="a")}
"""


def deliver(ctx: Context, attempt_id: str) -> None:
    """Deliver an attempt, and the next ones inline while channels are refused."""
    next_id: str | None = attempt_id
    while next_id is not None:
        current = next_id
        try:
            with ctx.call_slot():
                next_id = _deliver_one(ctx, current)
        except SlotsBusy as exc:
            # Taken before the attempt is marked `sending`: nothing left, nothing to undo.
            log.warning("attempt.no_call_slot", attempt_id=current, error=str(exc))
            _retry_later(ctx, current, SLOT_RETRY_S)
            return


def _retry_later(ctx: Context, attempt_id: str, delay_s: float) -> None:
    """Leave a queued attempt for the clock to dispatch after `delay_s`."""
    with ctx.conn() as conn:
        conn.exec_driver_sql(
            "UPDATE attempts SET next_try_at = %(at)s, dispatched_at = NULL "
            f"WHERE id = %(attempt_id)s AND status = '{rules.QUEUED}'",
            {"attempt_id": attempt_id, "at": utcnow() + timedelta(seconds=delay_s)},
        )


class _Claimed:
    __slots__ = ("id", "message_id", "recipient", "channel", "seq", "tries", "provider_id", "code")

    def __init__(self, attempt_id: str, row: Any, code: str) -> None:
        self.id = attempt_id
        self.message_id, self.seq, self.channel, self.provider_id, self.tries = row[:5]
        self.recipient = row[5]
        self.code = code


def _deliver_one(ctx: Context, attempt_id: str) -> str | None:
    """Send one attempt while holding a kod.mobi call slot; return the next to send."""
    settings = ctx.settings
    now = utcnow()
    # Covers a crash mid-call: past this the sweeper times the attempt out (§5.5).
    silence_s = settings.kodmobi_read_timeout_s + settings.delivery_timeout_s
    deadline = now + timedelta(seconds=silence_s)
    with ctx.conn() as conn:
        row = conn.exec_driver_sql(
            _CLAIM,
            {
                "attempt_id": attempt_id,
                "now": now,
                "due": now + DUE_SLACK,
                "deadline": deadline,
                "event_id": str(ULID()),
            },
        ).first()
    if row is None:
        _not_claimed(ctx, attempt_id, now)
        return None
    message_id = row[0]
    claimed = _Claimed(attempt_id, row, ctx.codebox.open(row[6], message_id))
    bound = bind(_Message(message_id, claimed.recipient), claimed)
    bound.info("attempt.sending", tries=claimed.tries)
    try:
        answer = ctx.kodmobi.manual_send(
            claimed.recipient,
            claimed.channel,
            code=claimed.code,
            provider_id=claimed.provider_id,
            callback_url=ctx.callback_url(attempt_id, deadline),
        )
    except KodMobiError as exc:
        failure = exc
        return retry_on_disconnect(lambda: _record_failure(ctx, attempt_id, failure))
    retry_on_disconnect(lambda: _record_accepted(ctx, attempt_id, answer))
    bound.info("attempt.accepted", kodmobi_message_id=answer.message_id)
    return None


class _Message:
    __slots__ = ("id", "recipient")

    def __init__(self, message_id: str, recipient: str) -> None:
        self.id, self.recipient = message_id, recipient


def _not_claimed(ctx: Context, attempt_id: str, now: datetime) -> None:
    """Why the claim found nothing to send, and what follows from it: an unknown attempt,
    one already sent or not yet due (nothing), or a message that is over (close it)."""
    with ctx.conn() as conn:
        locked = lock_pair(conn, attempt_id)
        if locked is None:
            log.warning("attempt.unknown", attempt_id=attempt_id)
            return
        message, attempt = locked
        changes = Changes()
        if message.status in rules.MESSAGE_FINAL:
            changes.close_open_attempts(message.id, f"closed: message {message.status}", now)
        elif now >= message.expires_at:
            expire(changes, message, now)
        else:
            bind(message, attempt).debug("attempt.skipped", status=attempt.status)
        changes.write(conn)


def _record_accepted(ctx: Context, attempt_id: str, answer: ManualSendResponse) -> None:
    now = utcnow()
    with ctx.conn() as conn:
        conn.exec_driver_sql(
            _RECORD_ACCEPTED,
            {
                "attempt_id": attempt_id,
                "kodmobi_message_id": answer.message_id,
                "kodmobi_code": answer.code,
                "now": now,
                "deadline": now + timedelta(seconds=ctx.settings.delivery_timeout_s),
                "event_id": str(ULID()),
            },
        )


def _record_failure(ctx: Context, attempt_id: str, exc: KodMobiError) -> str | None:
    """Apply the failed call's declared policy (DESIGN §7); return an attempt to deliver now."""
    now = utcnow()
    changes = Changes()
    with ctx.conn() as conn:
        locked = lock_pair(conn, attempt_id)
        if locked is None:
            return None
        message, attempt = locked
        if attempt.status != rules.SENDING:
            return None  # a callback or the sweeper got here first
        bound = bind(message, attempt)
        changes.attempt(
            attempt, error_code=exc.sys_message, http_status=exc.status_code, updated_at=now
        )
        follow_up, retry_at = _decide_failure(ctx, changes, message, attempt, exc, now)
        changes.write(conn)
    if retry_at is not None:
        delay = max(0.0, (retry_at - now).total_seconds())
        (bound.error if exc.alert else bound.warning)(
            "attempt.retry_scheduled",
            error=exc.reason,
            http_status=exc.status_code,
            delay_s=round(delay, 3),
            alert=exc.alert,
        )
    return follow_up


def _decide_failure(
    ctx: Context, changes: Changes, message: Any, attempt: Any, exc: KodMobiError, now: datetime
) -> tuple[str | None, datetime | None]:
    """`(attempt to deliver now, when this one is retried)` after a failed call."""
    if exc.action is Action.FALLBACK:
        return fallback(changes, message, attempt, rules.ERROR, f"refused: {exc.reason}", now), None
    if exc.action is Action.FAIL:
        finish_attempt(changes, attempt, rules.ERROR, f"refused: {exc.reason}", now)
        finish_message(
            changes, message, rules.FAILED, f"recipient blocked: {exc.reason}", now,
            others_open=False,
        )
        return None, None
    plan = rules.plan_retry(
        now=now,
        tries=attempt.tries,
        expires_at=message.expires_at,
        retry_after_s=exc.retry_after,
        max_backoff_s=ctx.settings.retry_max_backoff_s,
        limited_tries=exc.limited_tries,
    )
    if plan.at is None and exc.limited_tries:
        reason = f"retries exhausted: {exc.reason}"
        return fallback(changes, message, attempt, rules.ERROR, reason, now), None
    if plan.at is None:
        # Throttled or an account problem: another channel would not help (DESIGN §7).
        # Nothing fits before the code expires, so nothing more is sent; the attempt
        # waits, and the sweeper expires the message at its TTL.
        changes.attempt(
            attempt,
            status=rules.QUEUED,
            next_try_at=message.expires_at,
            dispatched_at=now,
            reason=f"{exc.reason}: no retry fits before the code expires",
        )
        bind(message, attempt).warning(
            "attempt.parked_until_expiry", error=exc.reason, alert=exc.alert
        )
        return None, None
    # Not a delayed Dramatiq message: those live in worker memory, can be enqueued twice
    # (dramatiq#431) and are dropped when Redis reconnects (dramatiq#527). The clock
    # dispatches it once `next_try_at` is due.
    changes.attempt(
        attempt,
        status=rules.QUEUED,
        next_try_at=plan.at,
        dispatched_at=None,
        reason=f"retrying after {exc.reason}",
    )
    return None, plan.at
