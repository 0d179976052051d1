"""Per-recipient abuse limits: N codes per window, one code per channel per cooldown."""

from __future__ import annotations

from datetime import datetime, timedelta

from sqlalchemy import Connection

from worker import rules
from worker.settings import Settings


class RateLimited(Exception):
    """A per-recipient limit refuses this send for now."""

    def __init__(self, reason: str, retry_after_s: float) -> None:
        super().__init__(reason)
        self.reason = reason
        self.retry_after_s = retry_after_s


_LOCK_RECIPIENT = "SELECT pg_advisory_xact_lock(hashtext(%(recipient)s))"
_RECENT = (
    "SELECT created_at FROM messages WHERE recipient_key = %(recipient)s "
    f"AND created_at >= %(since)s AND status <> '{rules.REJECTED}' "
    "ORDER BY created_at DESC LIMIT %(limit)s"
)
_LAST_ON_CHANNEL = (
    "SELECT max(a.created_at) FROM attempts a JOIN messages m ON m.id = a.message_id "
    "WHERE m.recipient_key = %(recipient)s AND a.channel = %(channel)s "
    "AND a.created_at >= %(since)s"
)


def check_recipient_limits(
    conn: Connection, settings: Settings, recipient_key: str, first_channel: str, now: datetime
) -> None:
    """Raise RateLimited when `recipient_key` (the canonical recipient:
    worker.schemas.canonical_recipient) has had too many codes lately, or one on
    `first_channel` within the cooldown. Takes a per-recipient advisory lock for the rest
    of the transaction, so two intakes at once cannot both slip under a limit."""
    limit, window = settings.recipient_limit, settings.recipient_window_s
    cooldown = settings.channel_cooldown_s
    if limit == 0 and cooldown == 0:
        return
    conn.exec_driver_sql(_LOCK_RECIPIENT, {"recipient": recipient_key})
    if limit:
        since = now - timedelta(seconds=window)
        recent = (
            conn.exec_driver_sql(
                _RECENT, {"recipient": recipient_key, "since": since, "limit": limit}
            )
            .scalars()
            .all()
        )
        if len(recent) >= limit:
            wait = (recent[-1] + timedelta(seconds=window) - now).total_seconds()
            raise RateLimited(
                f"recipient limit: at most {limit} codes per {window:g}s", max(1.0, wait)
            )
    if cooldown:
        # kod.mobi blocks a channel for a recipient for 60 s after each send.
        since = now - timedelta(seconds=cooldown)
        last_sent = conn.exec_driver_sql(
            _LAST_ON_CHANNEL, {"recipient": recipient_key, "channel": first_channel, "since": since}
        ).scalar()
        if last_sent is not None:
            wait = (last_sent + timedelta(seconds=cooldown) - now).total_seconds()
            raise RateLimited(
                f"channel cooldown: one {first_channel} code per {cooldown:g}s", max(1.0, wait)
            )
