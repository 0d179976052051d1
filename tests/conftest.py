"""Shared fixtures: real Postgres and Redis (the URLs when set, embedded servers when not)."""

from __future__ import annotations

import os
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from worker.embedded import EmbeddedPostgres, EmbeddedRedis


@pytest.fixture(scope="session")
def pg_server_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A Postgres server URL: DATABASE_URL's server, or an embedded one."""
    if os.environ.get("DATABASE_URL"):
        yield os.environ["DATABASE_URL"]
        return
    server = EmbeddedPostgres(Path(tmp_path_factory.mktemp("pg")))
    server.start()
    try:
        yield server.url
    finally:
        server.stop(mode="immediate")


@pytest.fixture(scope="session")
def redis_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A Redis URL: REDIS_URL, or an embedded server."""
    if os.environ.get("REDIS_URL"):
        yield os.environ["REDIS_URL"]
        return
    server = EmbeddedRedis(Path(tmp_path_factory.mktemp("redis")))
    server.start()
    try:
        yield server.url
    finally:
        server.stop()


@pytest.fixture(scope="session")
def broker_namespace() -> str:
    """A Redis key namespace of this test run, so runs sharing one Redis never meet."""
    return f"kodmobi-test-{uuid.uuid4().hex[:8]}"


def pytest_terminal_summary(terminalreporter: pytest.TerminalReporter) -> None:
    """Say loudly which checks did not run for want of a program (tests/support/tools.py)."""
    from tests.support.tools import MISSING

    if not MISSING:
        return
    terminalreporter.section("CHECKS NOT RUN", sep="!", red=True, bold=True)
    for reason in MISSING.values():
        terminalreporter.write_line(f"SKIPPED: {reason}", red=True, bold=True)
