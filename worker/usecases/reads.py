"""Reading messages for producers and checking a code (DESIGN §3)."""

from __future__ import annotations

from typing import Any

from cryptography.exceptions import InvalidTag
from sqlalchemy import select
from sqlalchemy.orm import selectinload

from worker import rules
from worker.logging import get_logger
from worker.models import Message
from worker.schemas import AttemptView, CheckResult, MessageView
from worker.security import codes_equal
from worker.usecases.context import Context, utcnow

log = get_logger("worker.reads")

MAX_CHECKS = 5


def get(ctx: Context, message_id: str, producer: str) -> MessageView | None:
    """`producer`'s message; another producer's is None, as if absent (issue 13)."""
    return _view_where(ctx, Message.id == message_id, Message.producer == producer)


def find(ctx: Context, idempotency_key: str, producer: str) -> MessageView | None:
    return _view_where(
        ctx, Message.idempotency_key == idempotency_key, Message.producer == producer
    )


def _view_where(ctx: Context, *conditions: Any) -> MessageView | None:
    with ctx.tx() as s:
        message = s.scalars(
            select(Message).where(*conditions).options(selectinload(Message.attempts))
        ).one_or_none()
        return None if message is None else view(message)


def check_code(ctx: Context, message_id: str, code: str, producer: str) -> CheckResult | None:
    """Constant-time compare; at most MAX_CHECKS per message; never valid once expired.
    None for an unknown message or another producer's."""
    now = utcnow()
    with ctx.tx() as s:
        message = s.scalars(
            select(Message)
            .where(Message.id == message_id, Message.producer == producer)
            .with_for_update()
        ).one_or_none()
        if message is None:
            return None
        if message.status == rules.REJECTED or message.code_ciphertext is None:
            return CheckResult(valid=False, reason="rejected")
        if message.check_count >= MAX_CHECKS:
            return CheckResult(valid=False, reason="too_many_checks")
        message.check_count += 1
        if message.status == rules.EXPIRED or now >= message.expires_at:
            return CheckResult(valid=False, reason="expired")
        if message.verified_at is not None:
            return CheckResult(valid=False, reason="already_used")
        try:
            expected = ctx.codebox.open(message.code_ciphertext, message.id)
        except InvalidTag:
            # Sealed under a key no longer in CODE_KEY: an operator error, not a 500.
            log.error("message.code_undecryptable", message_id=message.id)
            return CheckResult(valid=False, reason="undecryptable")
        if not codes_equal(expected, code):
            return CheckResult(valid=False, reason="mismatch")
        message.verified_at = now
        return CheckResult(valid=True)


def view(message: Message) -> MessageView:
    return MessageView(
        id=message.id,
        idempotency_key=message.idempotency_key,
        status=message.status,
        to=message.recipient,
        channels=list(message.channels),
        failure_reason=message.failure_reason,
        expires_at=message.expires_at,
        created_at=message.created_at,
        updated_at=message.updated_at,
        delivered_at=message.delivered_at,
        metadata=message.meta or {},
        attempts=[
            AttemptView(
                id=a.id,
                seq=a.seq,
                channel=a.channel,
                status=a.status,
                reason=a.reason,
                error_code=a.error_code,
                http_status=a.http_status,
                kodmobi_message_id=a.kodmobi_message_id,
                tries=a.tries,
                created_at=a.created_at,
                sent_at=a.sent_at,
                accepted_at=a.accepted_at,
                finished_at=a.finished_at,
                deadline=a.deadline,
            )
            for a in message.attempts
        ],
    )

