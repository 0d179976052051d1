"""`kodmobi send/status/purge` find a running `kodmobi dev` (issue 11 item 6)."""

from __future__ import annotations

import os
from pathlib import Path

from worker import devstate


def test_a_running_dev_system_is_adopted_when_settings_are_missing(tmp_path: Path) -> None:
    # Given kodmobi dev (this process stands in for it) wrote its settings
    devstate.write(
        {"DATABASE_URL": "postgresql://dev/db", "REDIS_URL": "redis://dev",
         "PUBLIC_BASE_URL": "http://127.0.0.1:8000", "UNRELATED": "x"},
        tmp_path,
    )
    assert oct(devstate.path(tmp_path).stat().st_mode & 0o777) == "0o600"
    # When a command runs with no DATABASE_URL
    env: dict[str, str] = {"REDIS_URL": "redis://mine"}
    assert devstate.adopt(tmp_path, env)
    # Then it takes the dev system's settings, and keeps its own
    assert env["DATABASE_URL"] == "postgresql://dev/db"
    assert env["PUBLIC_BASE_URL"] == "http://127.0.0.1:8000"
    assert env["REDIS_URL"] == "redis://mine"
    assert "UNRELATED" not in env
    # And settings given in the environment win over the file
    assert not devstate.adopt(tmp_path, {"DATABASE_URL": "postgresql://given/db"})
    # And the file goes when dev stops
    devstate.remove(tmp_path)
    assert not devstate.path(tmp_path).exists()


def test_a_file_left_by_a_dead_dev_system_is_not_used(tmp_path: Path) -> None:
    devstate.path(tmp_path).write_text(f"{devstate.PID}=999999999\nDATABASE_URL=postgresql://x/y\n")
    env: dict[str, str] = {}
    assert not devstate.adopt(tmp_path, env)
    assert env == {}
    assert os.environ.get("KODMOBI_DEV_PID") is None
