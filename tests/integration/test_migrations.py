"""The models and the migrations agree, and the migrations run both ways on a real Postgres."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import psycopg
from alembic import command

from tests.support.system import fresh_database
from worker.migrate import alembic_config, check

ROOT = Path(__file__).resolve().parents[2]


def _tables(url: str) -> set[str]:
    with psycopg.connect(url.replace("postgresql+psycopg://", "postgresql://")) as conn:
        rows = conn.execute(
            "SELECT tablename FROM pg_tables WHERE schemaname = 'public'"
        ).fetchall()
    return {r[0] for r in rows}


def test_alembic_check_finds_nothing_to_generate(pg_server_url: str) -> None:
    # Given a database migrated to head
    with fresh_database(pg_server_url) as url:
        # Then autogenerate sees no difference with the models (`alembic check`)
        check(url)
        assert {"messages", "attempts", "callback_events"} <= _tables(url)


def test_downgrade_and_upgrade_again(pg_server_url: str) -> None:
    with fresh_database(pg_server_url) as url:
        command.downgrade(alembic_config(url), "base")
        assert not {"messages", "attempts", "callback_events"} & _tables(url)
        command.upgrade(alembic_config(url), "head")
        check(url)


def test_release_command_builds_an_empty_database(pg_server_url: str) -> None:
    # The Procfile's release process, exactly: `alembic upgrade head` with DATABASE_URL.
    with fresh_database(pg_server_url) as url:
        command.downgrade(alembic_config(url), "base")
        alembic = Path(sys.executable).with_name("alembic")
        result = subprocess.run(
            [str(alembic), "upgrade", "head"],
            cwd=ROOT,
            env={"DATABASE_URL": url, "PATH": "/usr/bin:/bin"},
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert result.returncode == 0, result.stderr
        assert {"messages", "attempts", "callback_events"} <= _tables(url)
