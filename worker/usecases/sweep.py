"""The clock's chores (DESIGN §5.4): expire old messages, time out silent attempts,
dispatch due retries and re-dispatch attempts the broker lost. Safe in several
processes at once: rows are claimed with SKIP LOCKED."""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime, timedelta

from worker import rules
from worker.logging import get_logger
from worker.usecases.context import Context, utcnow
from worker.usecases.receive import drain_spool
from worker.usecases.store import MESSAGE_COLUMNS, Changes, MessageRow, in_list, pair, select_pairs
from worker.usecases.transitions import expire, fallback

log = get_logger("worker.sweep")

#: An attempt left `queued` this long after its dispatch is re-dispatched by the sweeper.
REDISPATCH_AFTER_S = 20.0

_EXPIRED = (
    f"SELECT {MESSAGE_COLUMNS} FROM messages "
    f"WHERE status IN {in_list(rules.MESSAGE_OPEN)} AND expires_at <= %(now)s "
    "LIMIT %(batch)s FOR UPDATE SKIP LOCKED"
)
_SILENT = (
    f"a.status IN {in_list((rules.SENDING, rules.ACCEPTED))} AND a.deadline <= %(now)s "
    f"AND m.status IN {in_list(rules.MESSAGE_OPEN)}"
)
# Due attempts never handed over (retries, whose time has come) and attempts handed
# over long ago that are still queued (the broker lost them).
_TO_DISPATCH = f"""
WITH due AS (
  SELECT id FROM attempts
   WHERE status = '{rules.QUEUED}' AND next_try_at <= %(now)s
     AND (dispatched_at IS NULL OR dispatched_at <= %(stale)s)
   LIMIT %(batch)s FOR UPDATE SKIP LOCKED
)
UPDATE attempts SET dispatched_at = %(now)s FROM due WHERE attempts.id = due.id
RETURNING attempts.id
"""


@dataclass
class SweepReport:
    expired: int = 0
    timed_out: int = 0
    redispatched: int = 0
    #: Callbacks were held back by our own outage: nothing was timed out or expired.
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
    stale = now - timedelta(seconds=REDISPATCH_AFTER_S)
    with ctx.conn() as conn:
        due = conn.exec_driver_sql(
            _TO_DISPATCH, {"now": now, "stale": stale, "batch": batch}
        ).scalars().all()
    report.redispatched = len(due)
    report.dispatch.extend(due)
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
    with ctx.conn() as conn:
        changes = Changes()
        for row in conn.exec_driver_sql(_EXPIRED, {"now": now, "batch": batch}).all():
            expire(changes, MessageRow(*row), now)
            report.expired += 1
        changes.write(conn)


def _time_out(ctx: Context, report: SweepReport, now: datetime, batch: int) -> None:
    with ctx.conn() as conn:
        changes = Changes()
        silent_rows = conn.exec_driver_sql(
            select_pairs(_SILENT, limit=batch, skip_locked=True), {"now": now}
        ).all()
        for row in silent_rows:
            message, attempt = pair(row)
            sending = attempt.status == rules.SENDING
            silent = "no answer from kod.mobi" if sending else "no final callback"
            reason = f"{silent} within {ctx.settings.delivery_timeout_s:g}s"
            follow_up = fallback(changes, message, attempt, rules.TIMED_OUT, reason, now)
            report.timed_out += 1
            if follow_up:
                report.dispatch.append(follow_up)
        changes.write(conn)
