"""Where a running `kodmobi dev` can be found (issue 11 item 6): it writes its settings —
the embedded servers' URLs, PUBLIC_BASE_URL, the sandbox's address and the dev secrets —
to `.kodmobi/running.env` (mode 0600) while it runs, and removes the file when it stops.

`kodmobi send`, `status` and `purge` call `adopt()` first: with no DATABASE_URL in the
environment and a live `kodmobi dev` on this directory, they use its settings. Settings
given in the environment always win."""

from __future__ import annotations

import os
import sys
from collections.abc import Mapping
from pathlib import Path

from worker.embedded import default_root

FILE = "running.env"
PID = "KODMOBI_DEV_PID"


def path(root: Path | None = None) -> Path:
    return (root or default_root()) / FILE


def settings_names() -> list[str]:
    """Every environment variable Settings reads (DESIGN §2 and the tuning knobs)."""
    from worker.settings import Settings

    return [(f.alias or name).upper() for name, f in Settings.model_fields.items()]


def write(env: Mapping[str, str], root: Path) -> Path:
    """Record a running dev system's settings; only this user can read the file."""
    wanted = [*settings_names(), "BROKER_NAMESPACE"]
    lines = [f"{PID}={os.getpid()}"]
    lines += [f"{k}={env[k]}" for k in dict.fromkeys(wanted) if env.get(k)]
    target = path(root)
    target.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(target, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as fh:
        fh.write("\n".join(lines) + "\n")
    return target


def remove(root: Path) -> None:
    target = path(root)
    try:
        values = read(target)
        if values.get(PID) == str(os.getpid()):
            target.unlink()
    except FileNotFoundError:
        pass


def read(target: Path) -> dict[str, str]:
    values: dict[str, str] = {}
    for line in target.read_text().splitlines():
        key, sep, value = line.partition("=")
        if sep and key:
            values[key.strip()] = value
    return values


def _alive(pid: str | None) -> bool:
    if not pid or not pid.isdigit():
        return False
    try:
        os.kill(int(pid), 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def adopt(root: Path | None = None, environ: dict[str, str] | None = None) -> bool:
    """Fill the settings a one-shot command needs from a running `kodmobi dev`, when the
    environment has no DATABASE_URL; True when it did."""
    env = os.environ if environ is None else environ
    if env.get("DATABASE_URL"):
        return False
    target = path(root)
    if not target.exists():
        return False
    values = read(target)
    if not _alive(values.get(PID)):
        print(
            f"kodmobi: {target} is left from a kodmobi dev that is no longer running",
            file=sys.stderr,
        )
        return False
    for key, value in values.items():
        if key != PID:
            env.setdefault(key, value)
    print(
        f"kodmobi: using the running kodmobi dev (pid {values[PID]}, "
        f"web {values.get('PUBLIC_BASE_URL', '?')})",
        file=sys.stderr,
    )
    return True
