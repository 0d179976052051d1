"""Retention (issue 11, DESIGN §12): no personal data longer than RETENTION_DAYS, no code
longer than its check window.

- Messages created before the cutoff go, with their attempts and callback events (the
  foreign keys cascade), in batches of `BATCH` messages, each its own short transaction
  (`FOR UPDATE SKIP LOCKED`: a row someone holds is left for the next round).
- A code's ciphertext is erased once its message is final and it can no longer be
  checked (its TTL has passed, or it was verified, or its checks are used up).

Metrics counters are process memory, not rows: deleting rows never lowers them."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import text

from worker import metrics, rules
from worker.logging import get_logger
from worker.usecases.context import Context, utcnow
from worker.usecases.reads import MAX_CHECKS

log = get_logger("worker.retention")

#: Messages deleted per transaction: each batch's locks are held for milliseconds.
BATCH = 500
#: The clock purges this often (erasing codes runs on every sweep).
PURGE_INTERVAL_S = 60.0

_FINAL = tuple(sorted(rules.MESSAGE_FINAL))

QUERIES = {
    "count_old": text(
        """
        SELECT (SELECT count(*) FROM messages WHERE created_at < :cutoff) AS messages,
               (SELECT count(*) FROM attempts a JOIN messages m ON m.id = a.message_id
                WHERE m.created_at < :cutoff) AS attempts,
               (SELECT count(*) FROM callback_events c
                JOIN attempts a ON a.id = c.attempt_id
                JOIN messages m ON m.id = a.message_id
                WHERE m.created_at < :cutoff) AS callback_events
        """
    ),
    "lock_old": text(
        """
        SELECT id FROM messages WHERE created_at < :cutoff
        ORDER BY created_at LIMIT :batch FOR UPDATE SKIP LOCKED
        """
    ),
    "delete_events": text(
        """
        DELETE FROM callback_events c USING attempts a
        WHERE c.attempt_id = a.id AND a.message_id = ANY(:ids)
        """
    ),
    "delete_attempts": text("DELETE FROM attempts WHERE message_id = ANY(:ids)"),
    "delete_messages": text("DELETE FROM messages WHERE id = ANY(:ids)"),
    "count_codes": text(
        """
        SELECT count(*) FROM messages
        WHERE code_ciphertext IS NOT NULL AND status = ANY(:final)
          AND (expires_at <= :now OR verified_at IS NOT NULL OR check_count >= :max_checks)
        """
    ),
    "erase_codes": text(
        """
        WITH done AS (
            SELECT id FROM messages
            WHERE code_ciphertext IS NOT NULL AND status = ANY(:final)
              AND (expires_at <= :now OR verified_at IS NOT NULL OR check_count >= :max_checks)
            LIMIT :batch FOR UPDATE SKIP LOCKED
        )
        UPDATE messages m SET code_ciphertext = NULL FROM done WHERE m.id = done.id
        RETURNING 1
        """
    ),
}


@dataclass
class PurgeReport:
    cutoff: datetime
    messages: int = 0
    attempts: int = 0
    callback_events: int = 0
    codes: int = 0
    dry_run: bool = False

    def describe(self) -> str:
        verb = "would delete" if self.dry_run else "deleted"
        erase = "would erase" if self.dry_run else "erased"
        return (
            f"{verb} {self.messages} messages, {self.attempts} attempts and "
            f"{self.callback_events} callback events created before "
            f"{self.cutoff.isoformat(timespec='seconds')}; "
            f"{erase} {self.codes} codes of final messages past their check window"
        )


def _deleted(result: Any) -> int:
    return int(result.rowcount or 0)


def cutoff(ctx: Context, now: datetime | None = None) -> datetime:
    return (now or utcnow()) - timedelta(days=ctx.settings.retention_days)


def erase_codes(ctx: Context, *, batch: int = BATCH, now: datetime | None = None) -> int:
    """Erase the ciphertext of codes nobody can check any more; returns how many."""
    params = {"final": list(_FINAL), "now": now or utcnow(), "max_checks": MAX_CHECKS}
    total = 0
    while True:
        with ctx.tx() as s:
            erased = len(s.execute(QUERIES["erase_codes"], {**params, "batch": batch}).all())
        total += erased
        metrics.codes_erased(erased)
        if erased < batch:
            return total


def purge(
    ctx: Context, *, dry_run: bool = False, batch: int = BATCH, now: datetime | None = None
) -> PurgeReport:
    """Delete what is older than RETENTION_DAYS and erase finished codes, in small
    batches; with `dry_run`, only count what would go."""
    now = now or utcnow()
    report = PurgeReport(cutoff=cutoff(ctx, now), dry_run=dry_run)
    if dry_run:
        with ctx.tx() as s:
            row = s.execute(QUERIES["count_old"], {"cutoff": report.cutoff}).one()
            report.messages, report.attempts, report.callback_events = (
                int(row.messages), int(row.attempts), int(row.callback_events),
            )
            report.codes = int(
                s.execute(
                    QUERIES["count_codes"],
                    {"final": list(_FINAL), "now": now, "max_checks": MAX_CHECKS},
                ).scalar_one()
            )
        return report
    report.codes = erase_codes(ctx, batch=batch, now=now)
    while True:
        # One short transaction per batch: children first, so the cascade has nothing
        # left to find and each count is exact.
        with ctx.tx() as s:
            ids = list(
                s.scalars(QUERIES["lock_old"], {"cutoff": report.cutoff, "batch": batch})
            )
            if not ids:
                break
            events = _deleted(s.execute(QUERIES["delete_events"], {"ids": ids}))
            attempts = _deleted(s.execute(QUERIES["delete_attempts"], {"ids": ids}))
            messages = _deleted(s.execute(QUERIES["delete_messages"], {"ids": ids}))
        report.messages += messages
        report.attempts += attempts
        report.callback_events += events
        metrics.retention_deleted("messages", messages)
        metrics.retention_deleted("attempts", attempts)
        metrics.retention_deleted("callback_events", events)
        if len(ids) < batch:
            break
    if report.messages or report.codes:
        log.info(
            "retention.purged",
            messages=report.messages,
            attempts=report.attempts,
            callback_events=report.callback_events,
            codes=report.codes,
        )
    return report
