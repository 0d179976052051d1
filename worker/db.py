"""Engine and session factories; `session_scope()` commits or rolls back."""

from __future__ import annotations

import random
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import TypeVar

from sqlalchemy import Engine, create_engine
from sqlalchemy.exc import DBAPIError, InterfaceError, OperationalError
from sqlalchemy.orm import Session, sessionmaker

T = TypeVar("T")

#: How long a step waits out a database restart before giving up and raising.
RECONNECT_BUDGET_S = 60.0


def make_engine(url: str, *, pool_size: int = 10, max_overflow: int = 10) -> Engine:
    """A pooled engine that survives a database restart: connections are checked
    before use (`pool_pre_ping`) and recycled, so workers reconnect by themselves."""
    return create_engine(
        url,
        pool_size=pool_size,
        max_overflow=max_overflow,
        pool_pre_ping=True,
        pool_recycle=1800,
        pool_timeout=30,
        # A statement's parameters (recipients, ciphertexts) never reach an exception's
        # text, and so never a log line (issue 13).
        hide_parameters=True,
        # JIT compiles a plan when its cost estimate is high, which our short statements
        # never repay (the outbox's CTEs estimate high): a millisecond lost per statement.
        connect_args={
            "connect_timeout": 5,
            "application_name": "kodmobi-worker",
            "options": "-c jit=off",
        },
    )


def make_session_factory(engine: Engine) -> sessionmaker[Session]:
    return sessionmaker(engine, expire_on_commit=False)


@contextmanager
def session_scope(factory: sessionmaker[Session]) -> Iterator[Session]:
    """One transaction: commit on success, roll back on any exception."""
    session = factory()
    try:
        yield session
        session.commit()
    except BaseException:
        session.rollback()
        raise
    finally:
        session.close()


def is_disconnect(exc: BaseException) -> bool:
    """Postgres went away (restart, failover, network), as opposed to a bad statement."""
    if isinstance(exc, DBAPIError) and exc.connection_invalidated:
        return True
    return isinstance(exc, OperationalError | InterfaceError)


def retry_on_disconnect(step: Callable[[], T], budget_s: float = RECONNECT_BUDGET_S) -> T:
    """Run a transaction, and run it again while Postgres is unreachable.

    For steps that must not be left half-done by a database restart: recording what
    kod.mobi answered, and taking in a producer's message (whose Dramatiq retry would sit
    in worker memory, where a Redis reconnect can drop it)."""
    deadline = time.monotonic() + budget_s
    pause = 0.1
    while True:
        try:
            return step()
        except DBAPIError as exc:
            if not is_disconnect(exc) or time.monotonic() + pause > deadline:
                raise
        time.sleep(random.uniform(pause / 2, pause))  # noqa: S311 - jitter
        pause = min(pause * 2, 2.0)
