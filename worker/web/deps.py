"""Request-scoped access to the process's root and use-case context, and bearer-token
authentication."""

from __future__ import annotations

import hmac

from fastapi import Depends, HTTPException, Request
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer

from worker.usecases.context import Context
from worker.wiring import Root

_bearer = HTTPBearer(auto_error=False, description="one of API_TOKENS")


def get_root(request: Request) -> Root:
    root: Root = request.app.state.root
    return root


def get_context(request: Request) -> Context:
    root: Root = request.app.state.root
    return root.ctx


def require_token(
    request: Request,
    credentials: HTTPAuthorizationCredentials | None = Depends(_bearer),
) -> str:
    """The producer whose API_TOKENS entry the bearer token is (compared in constant
    time); 401 when none."""
    tokens: list[tuple[bytes, str]] = request.app.state.api_tokens
    given = credentials.credentials.encode() if credentials else b""
    # Compare against every token, so the time taken says nothing about which matched.
    producer: str | None = None
    for token, name in tokens:
        if hmac.compare_digest(token, given):
            producer = name
    if not given or producer is None:
        raise HTTPException(
            status_code=401,
            detail="missing or invalid bearer token",
            headers={"WWW-Authenticate": "Bearer"},
        )
    return producer
