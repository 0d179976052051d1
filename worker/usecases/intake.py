"""Taking a producer's message in (DESIGN §5.1): validate, record, or reject with a reason."""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

from pydantic import ValidationError
from sqlalchemy import bindparam, select
from sqlalchemy.dialects.postgresql import insert
from sqlalchemy.orm import Session
from ulid import ULID

from worker import rules
from worker.logging import get_logger
from worker.models import Attempt, Message
from worker.schemas import (
    SendRequest,
    canonical_recipient,
    db_text,
    describe_errors,
    valid_key,
)
from worker.security import draw_code
from worker.settings import DEFAULT_PRODUCER, PRODUCER_PATTERN
from worker.usecases.context import Context, bind, utcnow
from worker.usecases.limits import RateLimited, check_recipient_limits
from worker.usecases.transitions import new_attempt

log = get_logger("worker.intake")

DRAWN_CODE_LENGTH = 6

#: Idempotency keys are unique per producer (issue 13): two producers may use the same.
_BY_KEY = select(Message).where(
    Message.producer == bindparam("producer"), Message.idempotency_key == bindparam("key")
)
_KEY_INDEX = ["producer", "idempotency_key"]
#: Dramatiq producers may name their producer with a `producer` keyword (README).
DRAMATIQ_PRODUCER_KWARG = "producer"


class IdempotencyConflict(Exception):
    """The idempotency key was used before with a different request. The text names no
    message: the caller learns nothing it did not send (issue 13)."""

    def __init__(self, message_id: str) -> None:
        super().__init__("idempotency key already used with another body")
        self.message_id = message_id


@dataclass
class IntakeResult:
    message: Message
    created: bool
    #: An attempt still waiting to be sent (the first one, for a new message).
    attempt_id: str | None


def _fingerprints(ctx: Context, request: SendRequest) -> list[str]:
    canonical = json.dumps(
        request.model_dump(mode="json", exclude_none=True), sort_keys=True, default=str
    ).encode()
    return ctx.codebox.fingerprints(canonical)


def accept(
    ctx: Context,
    request: SendRequest,
    *,
    idempotency_key: str | None,
    source: str,
    producer: str = DEFAULT_PRODUCER,
) -> IntakeResult:
    """Record the message and its first attempt in one transaction (DESIGN §5.1).

    The same key from the same producer with the same request returns the message
    recorded before; with another request it raises IdempotencyConflict. Nothing is
    sent here."""
    now = utcnow()
    message_id = str(ULID())
    key = idempotency_key or message_id
    fingerprints = _fingerprints(ctx, request)
    fingerprint = fingerprints[0]
    chain = request.chain(ctx.settings.default_channels)
    ttl = request.ttl_s or ctx.settings.code_ttl_s
    code = request.code or draw_code(DRAWN_CODE_LENGTH)
    with ctx.tx() as s:
        existing = _existing(s, producer, key, fingerprints)
        if existing is not None:
            return IntakeResult(existing, False, _queued_attempt(s, existing.id))
        recipient_key = canonical_recipient(request.to)
        check_recipient_limits(s, ctx.settings, recipient_key, chain[0], now)
        message = s.scalars(
            insert(Message)
            .values(
                id=message_id,
                producer=producer,
                idempotency_key=key,
                fingerprint=fingerprint,
                source=source,
                recipient=request.to,
                recipient_key=recipient_key,
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
            .on_conflict_do_nothing(index_elements=_KEY_INDEX)
            .returning(Message)
        ).one_or_none()
        if message is None:  # a concurrent intake with the same key won the race
            existing = _existing(s, producer, key, fingerprints)
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


def _existing(s: Session, producer: str, key: str, fingerprints: list[str]) -> Message | None:
    message = s.scalars(_BY_KEY, {"producer": producer, "key": key}).one_or_none()
    if message is not None and message.fingerprint not in fingerprints:
        raise IdempotencyConflict(message.id)
    return message


def reject(
    ctx: Context,
    *,
    idempotency_key: str,
    source: str,
    reason: str,
    raw_to: Any = None,
    producer: str = DEFAULT_PRODUCER,
) -> Message:
    """Record input we will never send, with the reason, so the producer can see why."""
    now = utcnow()
    message_id = str(ULID())
    recipient = db_text(raw_to[:320]) if isinstance(raw_to, str) else ""
    reason = db_text(reason[:2000])
    with ctx.tx() as s:
        s.execute(
            insert(Message)
            .values(
                id=message_id,
                producer=producer,
                idempotency_key=idempotency_key,
                fingerprint="",
                source=source,
                recipient=recipient,
                recipient_key=recipient.lower(),
                recipient_kind="unknown",
                channels=[],
                status=rules.REJECTED,
                failure_reason=reason,
                meta={},
                created_at=now,
                updated_at=now,
                expires_at=now,
            )
            .on_conflict_do_nothing(index_elements=_KEY_INDEX)
        )
        message = s.scalars(_BY_KEY, {"producer": producer, "key": idempotency_key}).one()
    bind(message).warning("message.rejected", source=source, reason=reason)
    return message


def derived_key(message_id: str | None) -> str:
    """An idempotency key for a Dramatiq message whose own id cannot be one (too long,
    a NUL, not text): derived from it, so a redelivery still finds the same row."""
    if message_id is None:
        return str(ULID())
    digest = hashlib.sha256(str(message_id).encode("utf-8", "replace")).hexdigest()
    return f"dramatiq-id-sha256:{digest}"


def accept_dramatiq(
    ctx: Context, args: tuple[Any, ...], kwargs: dict[str, Any], message_id: str | None
) -> str | None:
    """A Dramatiq producer's `send_code` message, taken as it comes (DESIGN §3): recorded,
    or recorded as `rejected` with the reason; never raised back into a retry loop for
    bad input. Returns the attempt to deliver now, if any.

    The message belongs to the producer its `producer` keyword names, else to
    `default`: whoever can write to our Redis is trusted as the worker is (README)."""
    kwargs = dict(kwargs)
    fallback_key: str = (
        message_id if message_id is not None and valid_key(message_id) else derived_key(message_id)
    )
    key: Any = kwargs.pop("idempotency_key", None)
    if key is None:
        key = fallback_key
    producer: Any = kwargs.pop(DRAMATIQ_PRODUCER_KWARG, DEFAULT_PRODUCER)
    raw_to = kwargs.get("to")

    def refuse(reason: str, owner: str = DEFAULT_PRODUCER, under: str = fallback_key) -> None:
        reject(ctx, idempotency_key=under, source="dramatiq", reason=reason, raw_to=raw_to,
               producer=owner)

    if not isinstance(producer, str) or not PRODUCER_PATTERN.fullmatch(producer):
        refuse("producer: must be 1 to 64 letters, digits, '.', '_' or '-'")
        return None
    if not valid_key(key):
        refuse("idempotency_key: must be text of 1 to 255 characters without NUL", producer)
        return None
    if args:
        refuse("positional arguments are not accepted: pass keyword arguments", producer, key)
        return None
    try:
        request = SendRequest.model_validate(kwargs)
    except ValidationError as exc:
        refuse(describe_errors(exc), producer, key)
        return None
    except (ValueError, TypeError, RecursionError) as exc:
        # Input pydantic could not even describe: still bad input, never a retry loop.
        refuse(f"unreadable request: {type(exc).__name__}", producer, key)
        return None
    try:
        result = accept(ctx, request, idempotency_key=key, source="dramatiq", producer=producer)
    except IdempotencyConflict as exc:
        log.warning("message.idempotency_conflict", message_id=exc.message_id)
        return None
    except RateLimited as exc:
        reject(ctx, idempotency_key=key, source="dramatiq", reason=exc.reason,
               raw_to=request.to, producer=producer)
        return None
    return result.attempt_id
