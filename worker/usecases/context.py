"""What every use case needs from the process, built by worker.wiring and passed down."""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

from sqlalchemy import Connection, Engine
from sqlalchemy.orm import Session, sessionmaker

from worker.db import session_scope
from worker.kodmobi import KodMobiClient
from worker.logging import get_logger, mask_recipient
from worker.security import CodeBox, callback_token
from worker.settings import Settings
from worker.spool import CallbackSpool

#: Hand an attempt to a worker (enqueue `deliver_attempt`).
Dispatch = Callable[[str], None]
#: A cap on concurrent kod.mobi calls shared by all processes (worker.call_slots).
Slots = Callable[[], AbstractContextManager[None]]

log = get_logger("worker.usecases")


def utcnow() -> datetime:
    return datetime.now(UTC)


@dataclass(frozen=True)
class Context:
    settings: Settings
    engine: Engine
    sessions: sessionmaker[Session]
    codebox: CodeBox
    kodmobi: KodMobiClient
    dispatch: Dispatch
    #: None: no cap (tests of one use case).
    slots: Slots | None = None
    #: Where callbacks wait while Postgres is away (issue 12); None: no spool.
    spool: CallbackSpool | None = None

    @contextmanager
    def tx(self) -> Iterator[Session]:
        """One ORM transaction (reads, the code check): commit on success, else roll back."""
        with session_scope(self.sessions) as session:
            yield session

    @contextmanager
    def conn(self) -> Iterator[Connection]:
        """One Core transaction (the hot path): commit on success, else roll back."""
        with self.engine.begin() as connection:
            yield connection

    def callback_url(self, attempt_id: str, deadline: datetime | None = None) -> str:
        """The attempt's callback URL, dead CALLBACK_GRACE_S after its deadline."""
        settings = self.settings
        if deadline is None:
            deadline = utcnow() + timedelta(
                seconds=settings.kodmobi_read_timeout_s + settings.delivery_timeout_s
            )
        expires_at = math.ceil(deadline.timestamp() + settings.callback_grace_s)
        token = callback_token(settings.callback_secret.get_secret_value(), attempt_id, expires_at)
        return f"{self.settings.public_base_url}/callbacks/kodmobi/{attempt_id}/{token}"

    def hand_off(self, attempt_id: str) -> None:
        """Dispatch an attempt; if the broker is away the sweeper re-dispatches it later."""
        try:
            self.dispatch(attempt_id)
        except Exception as exc:
            log.warning("attempt.dispatch_failed", attempt_id=attempt_id, error=str(exc))

    @contextmanager
    def call_slot(self) -> Iterator[None]:
        if self.slots is None:
            yield
            return
        with self.slots():
            yield


def bind(message: Any, attempt: Any = None) -> Any:
    """A logger bound to a message (masked recipient) and, when given, its attempt: any
    rows with `id` and `recipient` (and `channel`, `seq`)."""
    bound = log.bind(message_id=message.id, recipient=mask_recipient(message.recipient))
    if attempt is not None:
        bound = bound.bind(attempt_id=attempt.id, channel=attempt.channel, seq=attempt.seq)
    return bound
