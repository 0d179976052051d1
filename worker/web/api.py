"""The producer API: POST/GET /v1/messages, the code check, health and readiness."""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Depends, Header, HTTPException, Query, Response
from fastapi.responses import JSONResponse
from sqlalchemy import text

from worker.schemas import (
    KEY_PATTERN,
    AcceptedView,
    CheckRequest,
    CheckResult,
    MessageView,
    SendRequest,
    is_ulid,
)
from worker.usecases import intake, reads
from worker.usecases.context import Context
from worker.usecases.intake import IdempotencyConflict
from worker.usecases.limits import RateLimited
from worker.usecases.outbox import NotifyRefused
from worker.web.deps import get_context, get_root, require_token
from worker.wiring import Root

router = APIRouter(prefix="/v1", dependencies=[Depends(require_token)], tags=["messages"])
health = APIRouter(tags=["health"])

ContextDep = Annotated[Context, Depends(get_context)]
#: The producer the bearer token speaks for: it sees its own messages only (issue 13).
ProducerDep = Annotated[str, Depends(require_token)]
_ERR: dict[str, Any] = {"content": {"application/json": {}}}


@router.post(
    "/messages",
    status_code=202,
    response_model=AcceptedView,
    responses={
        200: {"model": AcceptedView, "description": "same Idempotency-Key, same body"},
        401: {"description": "missing or invalid bearer token", **_ERR},
        409: {"description": "Idempotency-Key used with another body", **_ERR},
        429: {"description": "per-recipient limit; see Retry-After", **_ERR},
    },
)
def create_message(
    body: SendRequest,
    response: Response,
    ctx: ContextDep,
    producer: ProducerDep,
    idempotency_key: Annotated[
        str | None, Header(alias="Idempotency-Key", pattern=KEY_PATTERN)
    ] = None,
) -> AcceptedView:
    """Accept a code to send; the first attempt is handed to a worker at once."""
    try:
        result = intake.accept(
            ctx, body, idempotency_key=idempotency_key, source="http", producer=producer
        )
    except IdempotencyConflict as exc:
        raise HTTPException(409, detail=str(exc)) from None
    except NotifyRefused as exc:
        loc = ["body", *exc.field.split(".")]
        detail = [{"loc": loc, "msg": exc.reason, "type": "value_error"}]
        raise HTTPException(422, detail=detail) from None
    except RateLimited as exc:
        raise HTTPException(
            429, detail=exc.reason, headers={"Retry-After": str(int(exc.retry_after_s + 0.999))}
        ) from None
    if result.created:
        assert result.attempt_id is not None
        ctx.hand_off(result.attempt_id)
    else:
        response.status_code = 200
    return result.accepted


@router.get(
    "/messages/{message_id}",
    response_model=MessageView,
    responses={404: {"description": "no such message", **_ERR}},
)
def get_message(message_id: str, ctx: ContextDep, producer: ProducerDep) -> MessageView:
    """A message's status with every attempt."""
    found = reads.get(ctx, message_id, producer) if is_ulid(message_id) else None
    if found is None:
        raise HTTPException(404, detail="message not found")
    return found


@router.get(
    "/messages",
    response_model=MessageView,
    responses={404: {"description": "no message with that key", **_ERR}},
)
def find_message(
    ctx: ContextDep,
    producer: ProducerDep,
    idempotency_key: Annotated[str, Query(pattern=KEY_PATTERN)],
) -> MessageView:
    """The message recorded under an idempotency key (for Dramatiq producers, the message id)."""
    found = reads.find(ctx, idempotency_key, producer)
    if found is None:
        raise HTTPException(404, detail="message not found")
    return found


@router.post(
    "/messages/{message_id}/check",
    response_model=CheckResult,
    responses={404: {"description": "no such message", **_ERR}},
)
def check_code(
    message_id: str, body: CheckRequest, ctx: ContextDep, producer: ProducerDep
) -> CheckResult:
    """Is this the code we sent? At most 5 checks per message; never once expired."""
    result = (
        reads.check_code(ctx, message_id, body.code, producer) if is_ulid(message_id) else None
    )
    if result is None:
        raise HTTPException(404, detail="message not found")
    return result


@health.get("/healthz")
def healthz() -> dict[str, str]:
    """The process is up."""
    return {"status": "ok"}


@health.get("/readyz", responses={503: {"description": "a dependency is down", **_ERR}})
def readyz(root: Annotated[Root, Depends(get_root)]) -> Any:
    """Postgres and Redis are reachable."""
    checks: dict[str, str] = {}
    try:
        with root.engine.connect() as conn:
            conn.execute(text("SELECT 1"))
        checks["postgres"] = "ok"
    except Exception as exc:
        checks["postgres"] = f"down: {type(exc).__name__}"
    try:
        root.redis.ping()
        checks["redis"] = "ok"
    except Exception as exc:
        checks["redis"] = f"down: {type(exc).__name__}"
    ready = all(v == "ok" for v in checks.values())
    return JSONResponse({"ready": ready, **checks}, status_code=200 if ready else 503)
