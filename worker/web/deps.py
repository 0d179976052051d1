"""Request-scoped access to the process's service, and bearer-token authentication."""

from __future__ import annotations

import hmac

from fastapi import Depends, HTTPException, Request
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer

from worker.service import Service

_bearer = HTTPBearer(auto_error=False, description="one of API_TOKENS")


def get_service(request: Request) -> Service:
    service: Service = request.app.state.service
    return service


def require_token(
    request: Request,
    credentials: HTTPAuthorizationCredentials | None = Depends(_bearer),
) -> None:
    """401 unless the bearer token is one of API_TOKENS (compared in constant time)."""
    tokens: list[bytes] = request.app.state.api_tokens
    given = credentials.credentials.encode() if credentials else b""
    # Compare against every token, so the time taken says nothing about which matched.
    ok = False
    for token in tokens:
        ok |= hmac.compare_digest(token, given)
    if not given or not ok:
        raise HTTPException(
            status_code=401,
            detail="missing or invalid bearer token",
            headers={"WWW-Authenticate": "Bearer"},
        )
