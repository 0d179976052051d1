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
