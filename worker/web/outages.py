"""Answers for a dependency outage (issue 12): 503 with Retry-After, one warning line, no
traceback, for every route that needs Postgres or Redis (intake, reads, the code check).

A producer that retries with the same Idempotency-Key gets the one message: either the
first try never committed, or the retry finds what it committed."""

from __future__ import annotations

from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import TimeoutError as RedisTimeoutError
from sqlalchemy.exc import DBAPIError
from sqlalchemy.exc import TimeoutError as PoolTimeout

from worker.db import is_disconnect
from worker.logging import get_logger

log = get_logger("worker.web")

#: What a producer is told to wait before trying again: about a Postgres restart.
RETRY_AFTER_S = 2


def unavailable(request: Request, dependency: str, exc: BaseException) -> JSONResponse:
    log.warning(
        "request.unavailable",
        method=request.method,
        path=request.url.path,
        dependency=dependency,
        error=type(exc).__name__,
        detail=str(exc).splitlines()[0][:200] if str(exc) else "",
    )
    return JSONResponse(
        {"detail": f"{dependency} temporarily unavailable; try again"},
        status_code=503,
        headers={"Retry-After": str(RETRY_AFTER_S)},
    )


def install(app: FastAPI) -> None:
    """Register the outage answers on `app`."""

    async def database(request: Request, exc: Exception) -> Any:
        if isinstance(exc, DBAPIError) and not is_disconnect(exc):
            raise exc  # a real bug: Starlette's 500 and its traceback
        return unavailable(request, "database", exc)

    async def broker(request: Request, exc: Exception) -> Any:
        return unavailable(request, "redis", exc)

    app.add_exception_handler(DBAPIError, database)
    app.add_exception_handler(PoolTimeout, database)
    app.add_exception_handler(RedisConnectionError, broker)
    app.add_exception_handler(RedisTimeoutError, broker)
