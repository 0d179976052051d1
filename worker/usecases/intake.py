"""Taking a producer's message in (DESIGN §5.1): validate, record, or reject with a reason."""

from __future__ import annotations

import json
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

from pydantic import ValidationError
from sqlalchemy import bindparam, select
from sqlalchemy.dialects.postgresql import insert
from sqlalchemy.orm import Session
from ulid import ULID

from worker import metrics, rules
from worker.logging import get_logger
from worker.models import Attempt, Message
from worker.schemas import SendRequest, db_text, describe_errors, valid_key
from worker.security import draw_code
from worker.usecases.context import Context, bind, utcnow
from worker.usecases.limits import RateLimited, check_recipient_limits
from worker.usecases.transitions import new_attempt

log = get_logger("worker.intake")

DRAWN_CODE_LENGTH = 6

_BY_KEY = select(Message).where(Message.idempotency_key == bindparam("key"))


class IdempotencyConflict(Exception):
    """The idempotency key was used before with a different request."""

    def __init__(self, message_id: str) -> None:
        super().__init__(f"idempotency key already used for message {message_id} with another body")
        self.message_id = message_id


@dataclass
class IntakeResult:
    message: Message
    created: bool
    #: An attempt still waiting to be sent (the first one, for a new message).
    attempt_id: str | None


def _fingerprint(ctx: Context, request: SendRequest) -> str:
    canonical = json.dumps(
        request.model_dump(mode="json", exclude_none=True), sort_keys=True, default=str
    ).encode()
    return ctx.codebox.fingerprint(canonical)


def accept(
    ctx: Context, request: SendRequest, *, idempotency_key: str | None, source: str
) -> IntakeResult:
    """Record the message and its first attempt in one transaction (DESIGN §5.1).

    The same key with the same request returns the message recorded before; with
    another request it raises IdempotencyConflict. Nothing is sent here."""
    now = utcnow()
    message_id = str(ULID())
    key = idempotency_key or message_id
    fingerprint = _fingerprint(ctx, request)
    chain = request.chain(ctx.settings.default_channels)
    ttl = request.ttl_s or ctx.settings.code_ttl_s
    code = request.code or draw_code(DRAWN_CODE_LENGTH)
    with ctx.tx() as s:
        existing = _existing(s, key, fingerprint)
        if existing is not None:
            return IntakeResult(existing, False, _queued_attempt(s, existing.id))
        check_recipient_limits(s, ctx.settings, request.to, chain[0], now)
        message = s.scalars(
            insert(Message)
            .values(
                id=message_id,
                idempotency_key=key,
                fingerprint=fingerprint,
                source=source,
                recipient=request.to,
                recipient_kind=request.recipient_kind(),
                channels=chain,
                provider_id=request.provider_id,
                code_ciphertext=ctx.codebox.seal(code, message_id),
                status=rules.QUEUED,
                meta=request.metadata or {},
                created_at=now,
                updated_at=now,
                expires_at=now + timedelta(seconds=ttl),
            )
            .on_conflict_do_nothing(index_elements=["idempotency_key"])
            .returning(Message)
        ).one_or_none()
        if message is None:  # a concurrent intake with the same key won the race
            existing = _existing(s, key, fingerprint)
            assert existing is not None
            return IntakeResult(existing, False, _queued_attempt(s, existing.id))
        # provider_id names a provider of one channel: it goes with the first only.
        attempt = new_attempt(message_id, 1, chain[0], request.provider_id, now)
        s.add(attempt)
    bind(message).info("message.accepted", source=source, channels=chain)
    return IntakeResult(message, created=True, attempt_id=attempt.id)


def _queued_attempt(s: Session, message_id: str) -> str | None:
    """A redelivered producer message resumes a first attempt its crash left queued."""
    return s.scalars(
        select(Attempt.id).where(Attempt.message_id == message_id, Attempt.status == rules.QUEUED)
    ).first()


def _existing(s: Session, key: str, fingerprint: str) -> Message | None:
    message = s.scalars(_BY_KEY, {"key": key}).one_or_none()
    if message is not None and message.fingerprint != fingerprint:
        raise IdempotencyConflict(message.id)
    return message


def reject(
    ctx: Context, *, idempotency_key: str, source: str, reason: str, raw_to: Any = None
) -> Message:
    """Record input we will never send, with the reason, so the producer can see why."""
    now = utcnow()
    message_id = str(ULID())
    recipient = db_text(raw_to) if isinstance(raw_to, str) else ""
    reason = db_text(reason)
    with ctx.tx() as s:
        inserted: Any = s.execute(
            insert(Message)
            .values(
                id=message_id,
                idempotency_key=idempotency_key,
                fingerprint="",
                source=source,
                recipient=recipient[:320],
                recipient_kind="unknown",
                channels=[],
                status=rules.REJECTED,
                failure_reason=reason[:2000],
                meta={},
                created_at=now,
                updated_at=now,
                expires_at=now,
            )
            .on_conflict_do_nothing(index_elements=["idempotency_key"])
        )
        message = s.scalars(_BY_KEY, {"key": idempotency_key}).one()
    if inserted.rowcount:
        metrics.message_final(source, rules.REJECTED)
    bind(message).warning("message.rejected", source=source, reason=reason)
    return message


def accept_dramatiq(
    ctx: Context, args: tuple[Any, ...], kwargs: dict[str, Any], message_id: str | None
) -> str | None:
    """A Dramatiq producer's `send_code` message, taken as it comes (DESIGN §3): recorded,
    or recorded as `rejected` with the reason; never raised back into a retry loop for
    bad input. Returns the attempt to deliver now, if any."""
    kwargs = dict(kwargs)
    key: Any = kwargs.pop("idempotency_key", None)
    if key is None:
        key = message_id
    raw_to = kwargs.get("to")
    if not valid_key(key):
        reason = "idempotency_key: must be text of 1 to 255 characters without NUL"
        reject(ctx, idempotency_key=message_id or "unknown", source="dramatiq", reason=reason,
               raw_to=raw_to)
        return None
    if args:
        reason = "positional arguments are not accepted: pass keyword arguments"
        reject(ctx, idempotency_key=key, source="dramatiq", reason=reason, raw_to=raw_to)
        return None
    try:
        request = SendRequest.model_validate(kwargs)
    except ValidationError as exc:
        reject(ctx, idempotency_key=key, source="dramatiq", reason=describe_errors(exc),
               raw_to=raw_to)
        return None
    try:
        result = accept(ctx, request, idempotency_key=key, source="dramatiq")
    except IdempotencyConflict as exc:
        log.warning("message.idempotency_conflict", message_id=exc.message_id)
        return None
    except RateLimited as exc:
        reject(ctx, idempotency_key=key, source="dramatiq", reason=exc.reason, raw_to=request.to)
        return None
    return result.attempt_id
