"""The producer API: POST/GET /v1/messages, the code check, health and readiness."""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Depends, Header, HTTPException, Query, Request, Response
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
from worker.service import IdempotencyConflict, RateLimited, Service, accepted_view
from worker.web.deps import get_service, require_token

router = APIRouter(prefix="/v1", dependencies=[Depends(require_token)], tags=["messages"])
health = APIRouter(tags=["health"])

ServiceDep = Annotated[Service, Depends(get_service)]
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
    service: ServiceDep,
    idempotency_key: Annotated[
        str | None, Header(alias="Idempotency-Key", pattern=KEY_PATTERN)
    ] = None,
) -> AcceptedView:
    """Accept a code to send; the first attempt is handed to a worker at once."""
    try:
        result = service.intake(body, idempotency_key=idempotency_key, source="http")
    except IdempotencyConflict as exc:
        raise HTTPException(409, detail=str(exc)) from None
    except RateLimited as exc:
        raise HTTPException(
            429, detail=exc.reason, headers={"Retry-After": str(int(exc.retry_after_s + 0.999))}
        ) from None
    if result.created:
        assert result.attempt_id is not None
        service.hand_off(result.attempt_id)
    else:
        response.status_code = 200
    return accepted_view(result.message)


@router.get(
    "/messages/{message_id}",
    response_model=MessageView,
    responses={404: {"description": "no such message", **_ERR}},
)
def get_message(message_id: str, service: ServiceDep) -> MessageView:
    """A message's status with every attempt."""
    found = service.get(message_id) if is_ulid(message_id) else None
    if found is None:
        raise HTTPException(404, detail="message not found")
    return found


@router.get(
    "/messages",
    response_model=MessageView,
    responses={404: {"description": "no message with that key", **_ERR}},
)
def find_message(
    service: ServiceDep,
    idempotency_key: Annotated[str, Query(pattern=KEY_PATTERN)],
) -> MessageView:
    """The message recorded under an idempotency key (for Dramatiq producers, the message id)."""
    found = service.find(idempotency_key)
    if found is None:
        raise HTTPException(404, detail="message not found")
    return found


@router.post(
    "/messages/{message_id}/check",
    response_model=CheckResult,
    responses={404: {"description": "no such message", **_ERR}},
)
def check_code(message_id: str, body: CheckRequest, service: ServiceDep) -> CheckResult:
    """Is this the code we sent? At most 5 checks per message; never once expired."""
    result = service.check_code(message_id, body.code) if is_ulid(message_id) else None
    if result is None:
        raise HTTPException(404, detail="message not found")
    return result


@health.get("/healthz")
def healthz() -> dict[str, str]:
    """The process is up."""
    return {"status": "ok"}


@health.get("/readyz", responses={503: {"description": "a dependency is down", **_ERR}})
def readyz(request: Request, service: ServiceDep) -> Any:
    """Postgres and Redis are reachable."""
    checks: dict[str, str] = {}
    try:
        with service.rt.engine.connect() as conn:
            conn.execute(text("SELECT 1"))
        checks["postgres"] = "ok"
    except Exception as exc:
        checks["postgres"] = f"down: {type(exc).__name__}"
    try:
        request.app.state.redis_ping()
        checks["redis"] = "ok"
    except Exception as exc:
        checks["redis"] = f"down: {type(exc).__name__}"
    ready = all(v == "ok" for v in checks.values())
    return JSONResponse({"ready": ready, **checks}, status_code=200 if ready else 503)
