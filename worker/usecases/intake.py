"""Taking a producer's message in (DESIGN §5.1): validate, record, or reject with a reason."""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

from psycopg.types.json import Jsonb
from pydantic import ValidationError
from sqlalchemy import Connection
from ulid import ULID

from worker import metrics, rules
from worker.logging import get_logger
from worker.schemas import (
    AcceptedView,
    SendRequest,
    canonical_recipient,
    db_text,
    describe_errors,
    valid_key,
)
from worker.security import draw_code
from worker.settings import DEFAULT_PRODUCER, PRODUCER_PATTERN
from worker.usecases import outbox
from worker.usecases.context import Context, bind, utcnow
from worker.usecases.limits import RateLimited, check_recipient_limits

log = get_logger("worker.intake")

DRAWN_CODE_LENGTH = 6
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
    accepted: AcceptedView
    created: bool
    #: An attempt still waiting to be sent (the first one, for a new message).
    attempt_id: str | None


#: Idempotency keys are unique per producer (issue 13): two producers may use the same.
_FIND = (
    "SELECT id, status, channels, expires_at, fingerprint FROM messages "
    "WHERE producer = %(producer)s AND idempotency_key = %(idempotency_key)s"
)
_QUEUED_ATTEMPT = (
    f"SELECT id FROM attempts WHERE message_id = %(message_id)s AND status = '{rules.QUEUED}' "
    "ORDER BY seq LIMIT 1"
)
_MESSAGE_COLUMNS = (
    "id, producer, idempotency_key, fingerprint, source, recipient, recipient_key, "
    "recipient_kind, channels, provider_id, code_ciphertext, status, failure_reason, "
    "metadata, created_at, updated_at, expires_at, notify"
)
_MESSAGE_VALUES = ", ".join(f"%({c.strip()})s" for c in _MESSAGE_COLUMNS.split(","))
_ON_KEY = "ON CONFLICT (producer, idempotency_key) DO NOTHING"
# The message and its first attempt in one statement; a concurrent intake with the same
# key makes it insert neither and return nothing.
_INSERT = f"""
WITH m AS (
  INSERT INTO messages ({_MESSAGE_COLUMNS}) VALUES ({_MESSAGE_VALUES})
  {_ON_KEY}
  RETURNING id, status, channels, expires_at
), a AS (
  INSERT INTO attempts (id, message_id, seq, channel, provider_id, status, tries,
                        next_try_at, dispatched_at, created_at, updated_at)
  SELECT %(attempt_id)s, m.id, 1, %(channel)s, %(provider_id)s, '{rules.QUEUED}', 0,
         %(created_at)s, %(created_at)s, %(created_at)s, %(created_at)s
    FROM m
)
SELECT id, status, channels, expires_at FROM m
"""
# The rejected message and its `message.rejected` event (issue 10) in one statement.
_INSERT_REJECTED = f"""
WITH m AS (
  INSERT INTO messages ({_MESSAGE_COLUMNS}) VALUES ({_MESSAGE_VALUES}) {_ON_KEY}
  {outbox.MESSAGE_RETURNING}
)
{outbox.insert_one(
    id_param="%(event_id)s", type_sql=f"'message.{rules.REJECTED}'", at_param="%(created_at)s",
    source="m", attempts=None)}
"""


def _fingerprints(ctx: Context, request: SendRequest) -> list[str]:
    canonical = json.dumps(
        request.model_dump(mode="json", exclude_none=True), sort_keys=True, default=str
    ).encode()
    return ctx.codebox.fingerprints(canonical)


def _accepted(row: Any) -> AcceptedView:
    return AcceptedView(id=row[0], status=row[1], channels=list(row[2]), expires_at=row[3])


class _Row:
    __slots__ = ("id", "recipient")

    def __init__(self, message_id: str, recipient: str) -> None:
        self.id, self.recipient = message_id, recipient


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
    attempt_id = str(ULID())
    key = idempotency_key or message_id
    fingerprints = _fingerprints(ctx, request)
    chain = request.chain(ctx.settings.default_channels)
    ttl = request.ttl_s or ctx.settings.code_ttl_s
    code = request.code or draw_code(DRAWN_CODE_LENGTH)
    notify = outbox.subscription(ctx.settings, request.notify)
    with ctx.conn() as conn:
        existing = _existing(conn, producer, key, fingerprints)
        if existing is not None:
            return existing
        recipient_key = canonical_recipient(request.to)
        check_recipient_limits(conn, ctx.settings, recipient_key, chain[0], now)
        row = conn.exec_driver_sql(
            _INSERT,
            {
                "id": message_id,
                "producer": producer,
                "idempotency_key": key,
                "fingerprint": fingerprints[0],
                "source": source,
                "recipient": request.to,
                "recipient_key": recipient_key,
                "recipient_kind": request.recipient_kind(),
                "channels": chain,
                # provider_id names a provider of one channel: it goes with the first only.
                "provider_id": request.provider_id,
                "code_ciphertext": ctx.codebox.seal(code, message_id),
                "status": rules.QUEUED.value,
                "failure_reason": None,
                "metadata": Jsonb(request.metadata or {}),
                "created_at": now,
                "updated_at": now,
                "expires_at": now + timedelta(seconds=ttl),
                "notify": _jsonb(notify),
                "attempt_id": attempt_id,
                "channel": chain[0],
            },
        ).first()
        if row is None:  # a concurrent intake with the same key won the race
            existing = _existing(conn, producer, key, fingerprints)
            assert existing is not None
            return existing
    bind(_Row(message_id, request.to)).info("message.accepted", source=source, channels=chain)
    return IntakeResult(_accepted(row), created=True, attempt_id=attempt_id)


def _existing(
    conn: Connection, producer: str, key: str, fingerprints: list[str]
) -> IntakeResult | None:
    """The message `producer` recorded under `key` before, and a first attempt its crash
    left queued (a redelivered producer message resumes it); IdempotencyConflict for
    another body (a fingerprint under any of the code keys matches)."""
    row = conn.exec_driver_sql(_FIND, {"producer": producer, "idempotency_key": key}).first()
    if row is None:
        return None
    if row[4] not in fingerprints:
        raise IdempotencyConflict(row[0])
    queued = conn.exec_driver_sql(_QUEUED_ATTEMPT, {"message_id": row[0]}).scalar()
    return IntakeResult(_accepted(row), created=False, attempt_id=queued)


def reject(
    ctx: Context,
    *,
    idempotency_key: str,
    source: str,
    reason: str,
    raw_to: Any = None,
    producer: str = DEFAULT_PRODUCER,
    raw_notify: Any = None,
) -> str:
    """Record input we will never send, with the reason, so the producer can see why.
    Returns the id of the message recorded under the key."""
    now = utcnow()
    recipient = db_text(raw_to[:320]) if isinstance(raw_to, str) else ""
    reason = db_text(reason[:2000])
    with ctx.conn() as conn:
        conn.exec_driver_sql(
            _INSERT_REJECTED,
            {
                "id": str(ULID()),
                "producer": producer,
                "idempotency_key": idempotency_key,
                "fingerprint": "",
                "source": source,
                "recipient": recipient,
                "recipient_key": recipient.lower(),
                "recipient_kind": "unknown",
                "channels": [],
                "provider_id": None,
                "code_ciphertext": None,
                "status": rules.REJECTED.value,
                "failure_reason": reason,
                "metadata": Jsonb({}),
                "created_at": now,
                "updated_at": now,
                "expires_at": now,
                "notify": _jsonb(outbox.subscription_of_raw(ctx.settings, raw_notify)),
                "event_id": str(ULID()),
            },
        )
        found = conn.exec_driver_sql(
            _FIND, {"producer": producer, "idempotency_key": idempotency_key}
        ).one()
    message_id: str = found[0]
    metrics.message_final(source, rules.REJECTED)
    bind(_Row(message_id, recipient)).warning("message.rejected", source=source, reason=reason)
    return message_id


def _jsonb(value: dict[str, Any] | None) -> Jsonb | None:
    return None if value is None else Jsonb(value)


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
    raw_notify = kwargs.get("notify")

    def refuse(reason: str, owner: str = DEFAULT_PRODUCER, under: str = fallback_key) -> None:
        reject(ctx, idempotency_key=under, source="dramatiq", reason=reason, raw_to=raw_to,
               producer=owner, raw_notify=raw_notify)

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
               raw_to=request.to, producer=producer, raw_notify=raw_notify)
        return None
    except outbox.NotifyRefused as exc:
        refuse(str(exc), producer, key)
        return None
    return result.attempt_id
