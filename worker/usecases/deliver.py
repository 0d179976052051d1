"""Delivering an attempt (DESIGN §5.2): claim it, call kod.mobi, record the answer.

A failed call goes through the policy its error class declares (worker.kodmobi.errors):
retry later, fall back now, or fail the message."""

from __future__ import annotations

from datetime import timedelta

from sqlalchemy import update

from worker import rules
from worker.call_slots import SlotsBusy
from worker.db import retry_on_disconnect
from worker.kodmobi.errors import Action, KodMobiError
from worker.kodmobi.models import ManualSendResponse
from worker.logging import get_logger
from worker.models import Attempt
from worker.usecases.context import Context, bind, utcnow
from worker.usecases.transitions import (
    close_open_attempts,
    expire,
    fallback,
    finish_attempt,
    finish_message,
    lock_attempt,
    mark_accepted,
)

log = get_logger("worker.deliver")

#: When every kod.mobi call slot is taken, try the attempt again this much later.
SLOT_RETRY_S = 1.0


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
    with ctx.tx() as s:
        s.execute(
            update(Attempt)
            .where(Attempt.id == attempt_id, Attempt.status == rules.QUEUED)
            .values(next_try_at=utcnow() + timedelta(seconds=delay_s), dispatched_at=None)
        )


def _deliver_one(ctx: Context, attempt_id: str) -> str | None:
    """Send one attempt while holding a kod.mobi call slot; return the next to send."""
    settings = ctx.settings
    now = utcnow()
    with ctx.tx() as s:
        row = lock_attempt(s, attempt_id)
        if row is None:
            log.warning("attempt.unknown", attempt_id=attempt_id)
            return None
        message, attempt = row
        if message.status in rules.MESSAGE_FINAL:
            close_open_attempts(s, message, now)
            return None
        if now >= message.expires_at:
            expire(s, message, now)
            return None
        if attempt.status != rules.QUEUED:
            bind(message, attempt).debug("attempt.skipped", status=attempt.status)
            return None
        if attempt.next_try_at > now + timedelta(milliseconds=50):
            return None  # early: the clock dispatches it when it is due
        attempt.status = rules.SENDING
        attempt.tries += 1
        attempt.sent_at = now
        attempt.updated_at = now
        # Covers a crash mid-call: past this the sweeper times the attempt out (§5.5).
        attempt.deadline = now + timedelta(
            seconds=settings.kodmobi_read_timeout_s + settings.delivery_timeout_s
        )
        if rules.message_can_move(message.status, rules.SENDING):
            message.status = rules.SENDING
        assert message.code_ciphertext is not None
        code = ctx.codebox.open(message.code_ciphertext, message.id)
        to, channel, provider_id = message.recipient, attempt.channel, attempt.provider_id
        deadline = attempt.deadline
        bound = bind(message, attempt)
    bound.info("attempt.sending", tries=attempt.tries)
    try:
        answer = ctx.kodmobi.manual_send(
            to, channel, code=code, provider_id=provider_id,
            callback_url=ctx.callback_url(attempt_id, deadline),
        )
    except KodMobiError as exc:
        failure = exc
        return retry_on_disconnect(lambda: _record_failure(ctx, attempt_id, failure))
    retry_on_disconnect(lambda: _record_accepted(ctx, attempt_id, answer))
    return None


def _record_accepted(ctx: Context, attempt_id: str, answer: ManualSendResponse) -> None:
    now = utcnow()
    with ctx.tx() as s:
        row = lock_attempt(s, attempt_id)
        if row is None:
            return
        message, attempt = row
        attempt.kodmobi_message_id = answer.message_id
        attempt.kodmobi_code = answer.code
        attempt.http_status = 200
        attempt.updated_at = now
        mark_accepted(message, attempt, now, ctx.settings.delivery_timeout_s)
        bound = bind(message, attempt)
    bound.info("attempt.accepted", kodmobi_message_id=answer.message_id)


def _record_failure(ctx: Context, attempt_id: str, exc: KodMobiError) -> str | None:
    """Apply the failed call's declared policy (DESIGN §7); return an attempt to deliver now."""
    now = utcnow()
    with ctx.tx() as s:
        row = lock_attempt(s, attempt_id)
        if row is None:
            return None
        message, attempt = row
        bound = bind(message, attempt)
        if attempt.status != rules.SENDING:
            return None  # a callback or the sweeper got here first
        attempt.error_code = exc.sys_message
        attempt.http_status = exc.status_code
        attempt.updated_at = now
        if exc.action is Action.FALLBACK:
            return fallback(s, message, attempt, rules.ERROR, f"refused: {exc.reason}", now)
        if exc.action is Action.FAIL:
            finish_attempt(attempt, rules.ERROR, f"refused: {exc.reason}", now)
            finish_message(
                s, message, rules.FAILED, f"recipient blocked: {exc.reason}", now,
                others_open=False,
            )
            return None
        plan = rules.plan_retry(
            now=now,
            tries=attempt.tries,
            expires_at=message.expires_at,
            retry_after_s=exc.retry_after,
            max_backoff_s=ctx.settings.retry_max_backoff_s,
            limited_tries=exc.limited_tries,
        )
        if plan.at is None and exc.limited_tries:
            return fallback(
                s, message, attempt, rules.ERROR, f"retries exhausted: {exc.reason}", now
            )
        if plan.at is None:
            # Throttled or an account problem: another channel would not help
            # (DESIGN §7). Nothing fits before the code expires, so nothing more is
            # sent; the attempt waits, and the sweeper expires the message at its TTL.
            attempt.status = rules.QUEUED
            attempt.next_try_at = message.expires_at
            attempt.dispatched_at = now
            attempt.reason = f"{exc.reason}: no retry fits before the code expires"
            bound.warning("attempt.parked_until_expiry", error=exc.reason, alert=exc.alert)
            return None
        # Not a delayed Dramatiq message: those live in worker memory, can be
        # enqueued twice (dramatiq#431) and are dropped when Redis reconnects
        # (dramatiq#527). The clock dispatches it once `next_try_at` is due.
        attempt.status = rules.QUEUED
        attempt.next_try_at = plan.at
        attempt.dispatched_at = None
        attempt.reason = f"retrying after {exc.reason}"
    delay = max(0.0, (plan.at - now).total_seconds())
    (bound.error if exc.alert else bound.warning)(
        "attempt.retry_scheduled",
        error=exc.reason,
        http_status=exc.status_code,
        delay_s=round(delay, 3),
        alert=exc.alert,
    )
    return None
