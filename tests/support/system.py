"""The whole system inside the test process: a database cloned from a migrated template,
the sandbox, the web app on a loopback socket, a real Dramatiq worker on Redis, and the
sweeper."""

from __future__ import annotations

import contextlib
import threading
import time
import uuid
from collections.abc import Iterator
from contextlib import ExitStack, contextmanager
from dataclasses import dataclass, field
from typing import Any

import dramatiq
import httpx
import psycopg
from sqlalchemy.engine import make_url

from tests.support.servers import serve
from worker import wiring
from worker.embedded import free_port
from worker.jobs import declare_actors
from worker.migrate import upgrade as migrate
from worker.rules import MESSAGE_FINAL
from worker.settings import Settings, normalise_database_url
from worker.usecases.events import EventDispatcher, broker_reply
from worker.usecases.sweep import sweep
from worker.web.app import create_app
from worker.wiring import Root

API_KEY = "sandbox-test-key-abcdefghijkl"
API_TOKEN = "test-token-abcdefghijklmnop"
CALLBACK_SECRET = "callback-secret-qwertyuiopasdfgh"
CODE_KEY = "code-key-zyxwvutsrqponmlkjihgfedcba"
FINAL = MESSAGE_FINAL


def _admin_url(server_url: str) -> tuple[Any, str]:
    url = make_url(normalise_database_url(server_url))
    return url, url.set(drivername="postgresql").render_as_string(hide_password=False)


@contextmanager
def template_database(server_url: str) -> Iterator[str]:
    """A database migrated once, to clone test databases from; dropped afterwards."""
    url, admin = _admin_url(server_url)
    name = f"kodmobi_template_{uuid.uuid4().hex[:10]}"
    with psycopg.connect(admin, autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"')
    db_url = url.set(database=name).render_as_string(hide_password=False)
    try:
        migrate(db_url)
        yield name
    finally:
        with psycopg.connect(admin, autocommit=True) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


@contextmanager
def fresh_database(server_url: str, template: str | None = None) -> Iterator[str]:
    """A new migrated database on `server_url`'s server, cloned from `template` when given
    (`CREATE DATABASE … TEMPLATE`, a file copy) or migrated from empty; dropped afterwards."""
    url, admin = _admin_url(server_url)
    name = f"kodmobi_test_{uuid.uuid4().hex[:10]}"
    clause = f' TEMPLATE "{template}"' if template else ""
    with psycopg.connect(admin, autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{name}"{clause}')
    db_url = url.set(database=name).render_as_string(hide_password=False)
    if template is None:
        migrate(db_url)
    try:
        yield db_url
    finally:
        with psycopg.connect(admin, autocommit=True) as conn:
            conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


@dataclass
class System:
    db_url: str
    redis_url: str
    sandbox_url: str
    web_url: str
    broker: Any
    root: Root
    #: The settings as environment variables, for processes started on this system.
    env: dict[str, str]
    api: httpx.Client
    sandbox: httpx.Client
    extras: dict[str, Any] = field(default_factory=dict)

    def send_raw(self, **kwargs: Any) -> str:
        """Enqueue `send_code` as a producer would, without importing our actors."""
        message = dramatiq.Message(
            queue_name="kodmobi", actor_name="send_code", args=(), kwargs=kwargs, options={}
        )
        self.broker.enqueue(message)
        return message.message_id

    def message(self, message_id: str) -> dict[str, Any]:
        response = self.api.get(f"/v1/messages/{message_id}")
        response.raise_for_status()
        result: dict[str, Any] = response.json()
        return result

    def by_key(self, key: str) -> dict[str, Any] | None:
        response = self.api.get("/v1/messages", params={"idempotency_key": key})
        if response.status_code == 404:
            return None
        response.raise_for_status()
        result: dict[str, Any] = response.json()
        return result

    def wait_final(self, message_id: str, timeout_s: float = 30.0) -> dict[str, Any]:
        deadline = time.monotonic() + timeout_s
        while True:
            found = self.message(message_id)
            if found["status"] in FINAL:
                return found
            if time.monotonic() > deadline:
                raise AssertionError(f"message not final after {timeout_s}s: {found}")
            time.sleep(0.05)

    def wait_key_final(self, key: str, timeout_s: float = 30.0) -> dict[str, Any]:
        deadline = time.monotonic() + timeout_s
        while True:
            found = self.by_key(key)
            if found is not None and found["status"] in FINAL:
                return found
            if time.monotonic() > deadline:
                raise AssertionError(f"message {key} not final after {timeout_s}s: {found}")
            time.sleep(0.05)

    def sandbox_sends(self, to: str) -> list[dict[str, Any]]:
        response = self.sandbox.get("/sandbox/messages", params={"to": to})
        response.raise_for_status()
        sends: list[dict[str, Any]] = response.json()["messages"]
        return sends


def unique_phone() -> str:
    """A valid phone number nobody else in this run uses (never a magic sandbox number)."""
    return f"+79991{uuid.uuid4().int % 10**6:06d}"


def magic_phone(telegram: int, whatsapp: int = 0, sms: int = 0) -> str:
    """A sandbox magic number: two digits of outcome per channel (docs/sandbox.md)."""
    return f"+79990{telegram:02d}{whatsapp:02d}{sms:02d}"


def test_settings(**values: str) -> Settings:
    """Settings from these environment-style values alone (the process environment is
    not consulted for them: init values win over it)."""
    return Settings(**values)  # type: ignore[arg-type]


@contextmanager
def running_system(
    pg_server_url: str,
    redis_url: str,
    *,
    template: str | None = None,
    delivery_timeout_s: float = 2.0,
    sweep_interval_s: float = 0.2,
    extra_env: dict[str, str] | None = None,
) -> Iterator[System]:
    """The whole system on its own database, Redis namespace, broker and sandbox; its root
    is this process's for the Python API (`from worker import send_code`) while it runs."""
    from worker.sandbox.app import create_app as create_sandbox
    from worker.sandbox.config import SandboxConfig

    with ExitStack() as stack:
        db_url = stack.enter_context(fresh_database(pg_server_url, template))
        sandbox_url = stack.enter_context(
            serve(create_sandbox(SandboxConfig(api_key=API_KEY, callback_delay_ms=20)))
        )
        web_port = free_port()
        env = {
            "DATABASE_URL": db_url,
            "REDIS_URL": redis_url,
            "KODMOBI_API_KEY": API_KEY,
            "KODMOBI_BASE_URL": sandbox_url,
            "PUBLIC_BASE_URL": f"http://127.0.0.1:{web_port}",
            "CALLBACK_SECRET": CALLBACK_SECRET,
            "API_TOKENS": f"other-token-zzzzzzzz,{API_TOKEN}",
            "CODE_KEY": CODE_KEY,
            "DELIVERY_TIMEOUT_S": str(delivery_timeout_s),
            "BROKER_NAMESPACE": f"kodmobi-test-{uuid.uuid4().hex[:8]}",
            "RECIPIENT_LIMIT": "0",
            "CHANNEL_COOLDOWN_S": "0",
            "KODMOBI_READ_TIMEOUT_S": "5",
            "LOG_LEVEL": "INFO",
            **(extra_env or {}),
        }
        root = wiring.build(test_settings(**env))
        stack.callback(root.close)
        previous = wiring.use(root)
        stack.callback(wiring.use, previous)
        declare_actors(root)

        web_url = stack.enter_context(serve(create_app(root), port=web_port))
        worker = dramatiq.Worker(root.broker, worker_threads=8, worker_timeout=50)
        worker.start()
        stack.callback(worker.stop)

        stop = threading.Event()

        def sweep_forever() -> None:
            while not stop.is_set():
                with contextlib.suppress(Exception):  # keep sweeping, as the clock does
                    sweep(root.ctx)
                stop.wait(sweep_interval_s)

        sweeper = threading.Thread(target=sweep_forever, daemon=True)
        sweeper.start()
        stack.callback(sweeper.join, 5)
        stack.callback(stop.set)
        # The clock's other thread: outcome events out to webhooks and Dramatiq replies.
        dispatcher = EventDispatcher(root.ctx, broker_reply(root.broker), poll_s=0.05)
        stack.callback(dispatcher.close)
        dispatching = threading.Thread(target=dispatcher.run, args=(stop,), daemon=True)
        dispatching.start()
        stack.callback(dispatching.join, 15)
        stack.callback(stop.set)

        api = stack.enter_context(
            httpx.Client(
                base_url=web_url, headers={"Authorization": f"Bearer {API_TOKEN}"}, timeout=10
            )
        )
        sandbox = stack.enter_context(
            httpx.Client(base_url=sandbox_url, headers={"x-api-key": API_KEY}, timeout=10)
        )
        yield System(
            db_url=db_url,
            redis_url=redis_url,
            sandbox_url=sandbox_url,
            web_url=web_url,
            broker=root.broker,
            root=root,
            env=env,
            api=api,
            sandbox=sandbox,
        )


def callback_token_for(attempt_id: str, valid_s: float = 3600.0) -> str:
    """A callback token of this system for `attempt_id`, valid for `valid_s` more seconds
    (negative: expired that long ago)."""
    from worker.security import callback_token

    return callback_token(CALLBACK_SECRET, attempt_id, int(time.time() + valid_s))
