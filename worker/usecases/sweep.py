"""The clock's chores (DESIGN §5.4): expire old messages, time out silent attempts,
dispatch due retries and re-dispatch attempts the broker lost. Safe in several
processes at once: rows are claimed with SKIP LOCKED."""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime, timedelta

from sqlalchemy import or_, select

from worker import rules
from worker.logging import get_logger
from worker.models import Attempt, Message
from worker.usecases.context import Context, utcnow
from worker.usecases.receive import drain_spool
from worker.usecases.transitions import expire, fallback

log = get_logger("worker.sweep")

#: An attempt left `queued` this long after its dispatch is re-dispatched by the sweeper.
REDISPATCH_AFTER_S = 20.0


@dataclass
class SweepReport:
    expired: int = 0
    timed_out: int = 0
    redispatched: int = 0
    #: Callbacks were still held back (spooled, or a receiver waiting out Postgres):
    #: no attempt was timed out this time.
    timeouts_held: bool = False
    dispatch: list[str] = field(default_factory=list)


def sweep(ctx: Context, *, batch: int = 500) -> SweepReport:
    report = SweepReport()
    # A deadline (or a TTL) that passed while callbacks were held back by our own outage
    # proves nothing about kod.mobi: apply what was held first, and only once it is all in
    # time out or expire anything (issue 12).
    report.timeouts_held = not drain_spool(ctx)
    now = utcnow()
    if not report.timeouts_held:
        _expire(ctx, report, now, batch)
        _time_out(ctx, report, now, batch)
    # Due attempts never handed over (retries, whose time has come) and attempts
    # handed over long ago that are still queued (the broker lost them).
    stale = now - timedelta(seconds=REDISPATCH_AFTER_S)
    with ctx.tx() as s:
        attempts = s.scalars(
            select(Attempt)
            .where(
                Attempt.status == rules.QUEUED,
                Attempt.next_try_at <= now,
                or_(Attempt.dispatched_at.is_(None), Attempt.dispatched_at <= stale),
            )
            .limit(batch)
            .with_for_update(skip_locked=True)
        ).all()
        for attempt in attempts:
            attempt.dispatched_at = now
            report.dispatch.append(attempt.id)
            report.redispatched += 1
    for attempt_id in report.dispatch:
        ctx.hand_off(attempt_id)
    if report.expired or report.timed_out or report.redispatched or report.timeouts_held:
        log.info(
            "sweep.done",
            expired=report.expired,
            timed_out=report.timed_out,
            redispatched=report.redispatched,
            timeouts_held=report.timeouts_held,
        )
    return report


def _expire(ctx: Context, report: SweepReport, now: datetime, batch: int) -> None:
    with ctx.tx() as s:
        for message in s.scalars(
            select(Message)
            .where(Message.status.in_(rules.MESSAGE_OPEN), Message.expires_at <= now)
            .limit(batch)
            .with_for_update(skip_locked=True)
        ):
            expire(s, message, now)
            report.expired += 1


def _time_out(ctx: Context, report: SweepReport, now: datetime, batch: int) -> None:
    with ctx.tx() as s:
        rows = s.execute(
            select(Message, Attempt)
            .join(Attempt, Attempt.message_id == Message.id)
            .where(
                Attempt.status.in_((rules.SENDING, rules.ACCEPTED)),
                Attempt.deadline <= now,
            )
            .limit(batch)
            .with_for_update(skip_locked=True)
        ).all()
        for message, attempt in rows:
            if message.status in rules.MESSAGE_FINAL:
                continue
            sending = attempt.status == rules.SENDING
            silent = "no answer from kod.mobi" if sending else "no final callback"
            reason = f"{silent} within {ctx.settings.delivery_timeout_s:g}s"
            follow_up = fallback(s, message, attempt, rules.TIMED_OUT, reason, now)
            report.timed_out += 1
            if follow_up:
                report.dispatch.append(follow_up)
