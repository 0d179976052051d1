"""The running system, once per test session (worker.actors binds to one broker per process)."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.support.system import System, running_system


@pytest.fixture(scope="session")
def system(pg_server_url: str, redis_url: str) -> Iterator[System]:
    with running_system(pg_server_url, redis_url) as running:
        yield running
