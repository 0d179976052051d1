"""Per-recipient abuse limits: N codes per window, one code per channel per cooldown."""

from __future__ import annotations

from datetime import datetime, timedelta

from sqlalchemy import func, select
from sqlalchemy.orm import Session

from worker import rules
from worker.models import Attempt, Message
from worker.settings import Settings


class RateLimited(Exception):
    """A per-recipient limit refuses this send for now."""

    def __init__(self, reason: str, retry_after_s: float) -> None:
        super().__init__(reason)
        self.reason = reason
        self.retry_after_s = retry_after_s


def check_recipient_limits(
    s: Session, settings: Settings, recipient_key: str, first_channel: str, now: datetime
) -> None:
    """Raise RateLimited when `recipient_key` (the canonical recipient:
    worker.schemas.canonical_recipient) has had too many codes lately, or one on
    `first_channel` within the cooldown. Takes a per-recipient advisory lock for the rest
    of the transaction, so two intakes at once cannot both slip under a limit."""
    limit, window = settings.recipient_limit, settings.recipient_window_s
    cooldown = settings.channel_cooldown_s
    if limit == 0 and cooldown == 0:
        return
    s.execute(select(func.pg_advisory_xact_lock(func.hashtext(recipient_key))))
    if limit:
        recent = s.scalars(
            select(Message.created_at)
            .where(
                Message.recipient_key == recipient_key,
                Message.created_at >= now - timedelta(seconds=window),
                Message.status != rules.REJECTED,
            )
            .order_by(Message.created_at.desc())
            .limit(limit)
        ).all()
        if len(recent) >= limit:
            wait = (recent[-1] + timedelta(seconds=window) - now).total_seconds()
            raise RateLimited(
                f"recipient limit: at most {limit} codes per {window:g}s", max(1.0, wait)
            )
    if cooldown:
        # kod.mobi blocks a channel for a recipient for 60 s after each send.
        last_sent = s.scalar(
            select(func.max(Attempt.created_at))
            .join(Message, Message.id == Attempt.message_id)
            .where(
                Message.recipient_key == recipient_key,
                Attempt.channel == first_channel,
                Attempt.created_at >= now - timedelta(seconds=cooldown),
            )
        )
        if last_sent is not None:
            wait = (last_sent + timedelta(seconds=cooldown) - now).total_seconds()
            raise RateLimited(
                f"channel cooldown: one {first_channel} code per {cooldown:g}s", max(1.0, wait)
            )
