"""Thin Dramatiq actors: take the message, call the service, never lose or loop on bad input.

`dramatiq worker.actors` imports this module: the broker is set up from the
environment right here, before the actors bind to it.
"""

from __future__ import annotations

import functools
from typing import Any

import dramatiq
from dramatiq.middleware import CurrentMessage
from pydantic import ValidationError

from worker.broker import QUEUE, setup_broker
from worker.db import retry_on_disconnect
from worker.limits import KodMobiSlots
from worker.logging import get_logger
from worker.runtime import configure_process_logging, get_runtime
from worker.schemas import SendRequest, describe_errors, valid_key
from worker.service import IdempotencyConflict, RateLimited, Service
from worker.settings import get_settings

settings = get_settings()
configure_process_logging(settings)
broker = setup_broker(settings.redis_url, settings.broker_namespace)
log = get_logger("worker.actors")

#: Unexpected errors (database or Redis away) are retried with backoff for about an
#: hour; the sweeper covers anything that still slips through for deliveries.
RETRY_OPTIONS: dict[str, Any] = {
    "max_retries": 120,
    "min_backoff": 250,
    "max_backoff": 30_000,
    "time_limit": 120_000,
}


def dispatch(attempt_id: str, delay_s: float = 0.0) -> None:
    """Hand an attempt to a worker, now or after `delay_s`."""
    delay_ms = int(delay_s * 1000)
    deliver_attempt.send_with_options(args=(attempt_id,), delay=delay_ms or None)


@functools.cache
def service() -> Service:
    runtime = get_runtime()
    if runtime.kodmobi_slots is None:
        runtime.kodmobi_slots = KodMobiSlots(
            broker.client, settings.kodmobi_max_concurrency, namespace=settings.broker_namespace
        )
    return Service(runtime, dispatch)


@dramatiq.actor(actor_name="send_code", queue_name=QUEUE, **RETRY_OPTIONS)
def send_code(*args: Any, **kwargs: Any) -> None:
    """Intake from a Dramatiq producer, then deliver the first attempt in this same run.

    Takes anything, so that a malformed message is recorded as `rejected` with a
    reason instead of failing in Dramatiq's own call (and being retried)."""
    current = CurrentMessage.get_current_message()
    message_id = current.message_id if current is not None else None
    # Wait out a database restart here rather than in a delayed Dramatiq retry: those
    # sit in worker memory, and a Redis reconnect drops them (dramatiq#527).
    attempt_id = retry_on_disconnect(lambda: _take_in(args, dict(kwargs), message_id))
    if attempt_id is not None:
        service().deliver(attempt_id)


def _take_in(args: tuple[Any, ...], kwargs: dict[str, Any], message_id: str | None) -> str | None:
    """Record the producer's message (or its rejection); the attempt to deliver, if any."""
    svc = service()
    key: Any = kwargs.pop("idempotency_key", None)
    if key is None:
        key = message_id
    raw_to = kwargs.get("to")
    if not valid_key(key):
        reason = "idempotency_key: must be text of 1 to 255 characters without NUL"
        svc.reject(
            idempotency_key=message_id or "unknown",
            source="dramatiq",
            reason=reason,
            raw_to=raw_to,
        )
        return None
    if args:
        reason = "positional arguments are not accepted: pass keyword arguments"
        svc.reject(idempotency_key=key, source="dramatiq", reason=reason, raw_to=raw_to)
        return None
    try:
        request = SendRequest.model_validate(kwargs)
    except ValidationError as exc:
        svc.reject(
            idempotency_key=key, source="dramatiq", reason=describe_errors(exc), raw_to=raw_to
        )
        return None
    try:
        result = svc.intake(request, idempotency_key=key, source="dramatiq")
    except IdempotencyConflict as exc:
        log.warning("message.idempotency_conflict", message_id=exc.message_id)
        return None
    except RateLimited as exc:
        svc.reject(idempotency_key=key, source="dramatiq", reason=exc.reason, raw_to=request.to)
        return None
    return result.attempt_id


@dramatiq.actor(actor_name="deliver_attempt", queue_name=QUEUE, **RETRY_OPTIONS)
def deliver_attempt(attempt_id: str) -> None:
    """Deliver one attempt (a fallback, a retry, or a re-dispatch by the sweeper)."""
    service().deliver(attempt_id)
