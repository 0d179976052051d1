"""Each test module gets its own running system on a database cloned from one migrated
template: no module sees another's rows, and nothing runs between modules."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.support.system import System, running_system, template_database


@pytest.fixture(scope="session")
def template_db(pg_server_url: str) -> Iterator[str]:
    with template_database(pg_server_url) as name:
        yield name


@pytest.fixture(scope="module")
def system(pg_server_url: str, redis_url: str, template_db: str) -> Iterator[System]:
    with running_system(pg_server_url, redis_url, template=template_db) as running:
        yield running
