"""kodmobi-worker's producer API for Python services sharing this code base.

    from worker import send_code, check_code
    accepted = send_code("+79522966236", channels=["telegram", "sms"])
    check_code(accepted.id, "123456").valid

Both read the environment (DESIGN §2) on first use; importing this package does not,
and neither changes the host's logging configuration or its global Dramatiq broker.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from worker.schemas import AcceptedView, CheckResult

__all__ = ["IdempotencyConflict", "InvalidRequest", "RateLimited", "check_code", "send_code"]


class InvalidRequest(ValueError):
    """The request breaks DESIGN §3's input rules; the message names each bad field."""


def send_code(
    to: str,
    *,
    channels: list[str] | None = None,
    code: str | None = None,
    provider_id: int | None = None,
    ttl_s: int | None = None,
    metadata: dict[str, Any] | None = None,
    idempotency_key: str | None = None,
    producer: str = "default",
    notify: dict[str, Any] | None = None,
) -> AcceptedView:
    """Record a code to send and hand it to a worker; returns at once. The message
    belongs to `producer` (an API_TOKENS name; a bare token's is `default`).

    `notify` = {"url", "queue_name", "actor_name", "events"}: who hears of its outcome.
    Raises InvalidRequest, IdempotencyConflict (same key, other request) or RateLimited."""
    from pydantic import ValidationError

    from worker import wiring
    from worker.schemas import SendRequest, describe_errors, valid_key
    from worker.settings import PRODUCER_PATTERN
    from worker.usecases import intake
    from worker.usecases.outbox import NotifyRefused

    if idempotency_key is not None and not valid_key(idempotency_key):
        raise InvalidRequest("idempotency_key: must be text of 1 to 255 characters without NUL")
    if not isinstance(producer, str) or not PRODUCER_PATTERN.fullmatch(producer):
        raise InvalidRequest("producer: must be 1 to 64 letters, digits, '.', '_' or '-'")

    fields = {
        "to": to,
        "channels": channels,
        "code": code,
        "provider_id": provider_id,
        "ttl_s": ttl_s,
        "metadata": metadata,
        "notify": notify,
    }
    try:
        request = SendRequest.model_validate({k: v for k, v in fields.items() if v is not None})
    except ValidationError as exc:
        raise InvalidRequest(describe_errors(exc)) from None
    except (ValueError, TypeError, RecursionError) as exc:
        raise InvalidRequest(f"unreadable request: {type(exc).__name__}") from None
    ctx = wiring.get().ctx
    try:
        result = intake.accept(
            ctx, request, idempotency_key=idempotency_key, source="python", producer=producer
        )
    except NotifyRefused as exc:
        raise InvalidRequest(str(exc)) from None
    if result.created and result.attempt_id is not None:
        ctx.hand_off(result.attempt_id)
    return result.accepted


def check_code(message_id: str, code: str, *, producer: str = "default") -> CheckResult:
    """Is `code` the one sent for `message_id` (a message of `producer`)? Constant-time;
    at most 5 checks."""
    from worker import wiring
    from worker.schemas import CheckResult, is_ulid
    from worker.usecases import reads

    if not isinstance(code, str) or not code.isdigit() or not 4 <= len(code) <= 6:
        return CheckResult(valid=False, reason="malformed")
    ctx = wiring.get().ctx
    result = reads.check_code(ctx, message_id, code, producer) if is_ulid(message_id) else None
    if result is None:
        raise LookupError(f"no message {message_id}")
    return result


def __getattr__(name: str) -> Any:
    # The use cases' exceptions, without importing them at package import.
    if name == "IdempotencyConflict":
        from worker.usecases.intake import IdempotencyConflict

        return IdempotencyConflict
    if name == "RateLimited":
        from worker.usecases.limits import RateLimited

        return RateLimited
    raise AttributeError(name)
