"""The one composition root: settings -> runtime -> broker -> use cases, built in one place.

Every process gets its `Root` here: `start("web" | "worker" | "clock")` for the Procfile's
processes (they own their logging, and the worker its Dramatiq global broker), `get()` for
the Python API and the CLI's one-shot commands (a host service's logging and global
broker stay untouched). Nothing is built at import time."""

from __future__ import annotations

import threading
from dataclasses import dataclass
from typing import Any, Literal

import dramatiq
from dramatiq.brokers.redis import RedisBroker
from sqlalchemy import Engine

from worker.broker import DELIVER_ATTEMPT, build_broker, enqueue
from worker.call_slots import KodMobiSlots
from worker.db import make_engine, make_session_factory
from worker.kodmobi import KodMobiClient
from worker.logging import configure_logging
from worker.security import CodeBox
from worker.settings import Settings, get_settings
from worker.spool import CallbackSpool
from worker.usecases.context import Context

Process = Literal["web", "worker", "clock"]


@dataclass
class Root:
    """One process's wiring: what the use cases need (`ctx`) and what owns resources."""

    settings: Settings
    engine: Engine
    broker: RedisBroker
    ctx: Context

    @property
    def redis(self) -> Any:
        """The broker's Redis client (also the call slots' and readiness's)."""
        return self.broker.client

    def close(self) -> None:
        self.ctx.kodmobi.close()
        self.engine.dispose()
        self.broker.close()


def build(settings: Settings) -> Root:
    """Everything a process needs, from its settings; no global state is touched."""
    # Connections are opened on demand up to the pool size and then kept: overflow
    # connections would be closed and reopened under load (a backend fork each).
    engine = make_engine(settings.database_url, pool_size=settings.db_pool_size, max_overflow=0)
    broker = build_broker(settings.redis_url, settings.broker_namespace)

    def dispatch(attempt_id: str) -> None:
        enqueue(broker, DELIVER_ATTEMPT, attempt_id)

    ctx = Context(
        settings=settings,
        engine=engine,
        sessions=make_session_factory(engine),
        codebox=CodeBox([k.get_secret_value() for k in settings.code_key]),
        kodmobi=KodMobiClient(
            settings.kodmobi_base_url,
            settings.kodmobi_api_key.get_secret_value(),
            connect_timeout_s=settings.kodmobi_connect_timeout_s,
            read_timeout_s=settings.kodmobi_read_timeout_s,
            max_connections=max(16, settings.kodmobi_max_concurrency),
        ),
        dispatch=dispatch,
        slots=KodMobiSlots(
            broker.client, settings.kodmobi_max_concurrency, namespace=settings.broker_namespace
        ),
        spool=CallbackSpool(broker.client, settings.broker_namespace),
    )
    return Root(settings=settings, engine=engine, broker=broker, ctx=ctx)


_lock = threading.Lock()
_root: Root | None = None


def get() -> Root:
    """This process's root, built on first use from the environment (DESIGN §2)."""
    global _root
    with _lock:
        if _root is None:
            _root = build(get_settings())
        return _root


def use(root: Root | None) -> Root | None:
    """Install `root` as this process's (tests); returns the one it replaces."""
    global _root
    with _lock:
        previous, _root = _root, root
        return previous


def start(process: Process) -> Root:
    """The root of a Procfile process, which owns its logging: JSON logs with this
    process's secrets registered for scrubbing; the worker's broker becomes Dramatiq's
    global one (its actors bind to it)."""
    root = get()
    configure_process_logging(root.settings)
    if process == "worker":
        dramatiq.set_broker(root.broker)
        add_worker_metrics(root.broker)
    return root


def add_worker_metrics(broker: RedisBroker) -> None:
    """Dramatiq's Prometheus middleware for its own series; the host's exposition on
    METRICS_PORT is our fork function's (worker.metrics_setup.serve_worker_metrics)."""
    from dramatiq.middleware.prometheus import Prometheus

    class WorkerMetrics(Prometheus):
        @property
        def forks(self) -> list[Any]:
            return []

    if not any(isinstance(m, Prometheus) for m in broker.middleware):
        broker.add_middleware(WorkerMetrics())


def configure_process_logging(settings: Settings) -> None:
    configure_logging(
        settings.log_format,
        settings.log_level,
        secrets=[
            settings.kodmobi_api_key.get_secret_value(),
            settings.callback_secret.get_secret_value(),
            *(k.get_secret_value() for k in settings.code_key),
            *(t.token.get_secret_value() for t in settings.api_tokens),
            *(t.get_secret_value() for t in settings.ops_tokens),
            *([settings.webhook_secret.get_secret_value()] if settings.webhook_secret else []),
        ],
    )
