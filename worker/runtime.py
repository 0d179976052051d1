"""The per-process wiring: settings, database, kod.mobi client, code box — built once."""

from __future__ import annotations

import threading
from dataclasses import dataclass, field
from typing import Any

from sqlalchemy import Engine
from sqlalchemy.orm import Session, sessionmaker

from worker.db import make_engine, make_session_factory
from worker.kodmobi import KodMobiClient
from worker.logging import configure_logging
from worker.security import CodeBox
from worker.settings import Settings, get_settings


@dataclass
class Runtime:
    settings: Settings
    engine: Engine
    sessions: sessionmaker[Session]
    codebox: CodeBox
    kodmobi: KodMobiClient
    #: A semaphore shared by every process (see worker.limits), or None for no cap.
    kodmobi_slots: Any = None
    extras: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def from_settings(cls, settings: Settings) -> Runtime:
        # Connections are opened on demand up to the pool size and then kept: overflow
        # connections would be closed and reopened under load (a backend fork each).
        engine = make_engine(settings.database_url, pool_size=settings.db_pool_size, max_overflow=0)
        return cls(
            settings=settings,
            engine=engine,
            sessions=make_session_factory(engine),
            codebox=CodeBox(settings.code_key.get_secret_value()),
            kodmobi=KodMobiClient(
                settings.kodmobi_base_url,
                settings.kodmobi_api_key.get_secret_value(),
                connect_timeout_s=settings.kodmobi_connect_timeout_s,
                read_timeout_s=settings.kodmobi_read_timeout_s,
                max_connections=max(16, settings.kodmobi_max_concurrency),
            ),
        )

    def close(self) -> None:
        self.kodmobi.close()
        self.engine.dispose()


_lock = threading.Lock()
_runtime: Runtime | None = None


def get_runtime() -> Runtime:
    """This process's runtime, built on first use from the environment."""
    global _runtime
    with _lock:
        if _runtime is None:
            _runtime = Runtime.from_settings(get_settings())
        return _runtime


def set_runtime(runtime: Runtime | None) -> None:
    """Install a runtime (tests, `kodmobi dev`); None forgets the current one."""
    global _runtime
    with _lock:
        _runtime = runtime


def configure_process_logging(settings: Settings) -> None:
    """JSON logs for this process, with its own secrets registered for scrubbing."""
    configure_logging(
        settings.log_format,
        settings.log_level,
        secrets=[
            settings.kodmobi_api_key.get_secret_value(),
            settings.callback_secret.get_secret_value(),
            settings.code_key.get_secret_value(),
            *(t.get_secret_value() for t in settings.api_tokens),
        ],
    )
