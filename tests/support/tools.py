"""Outside programs some tests need (prometheus, promtool, chromium): found, or the test is
skipped and the run says so loudly at the end (tests/conftest.py)."""

from __future__ import annotations

import os
import shutil

import pytest

#: Why tests were skipped for want of a program; printed in the run's summary.
MISSING: dict[str, str] = {}

CHROMIUM = os.environ.get("KODMOBI_CHROMIUM", "/usr/bin/chromium")


def require(program: str, install: str) -> str:
    """The path of `program`, or skip (loudly) naming the package that provides it."""
    path = program if os.path.isabs(program) else shutil.which(program)
    if path is None or not os.access(path, os.X_OK):
        MISSING[program] = f"{program} not found: `apt-get install {install}` (.ci/run does)"
        pytest.skip(MISSING[program])
    return path


def require_playwright() -> None:
    try:
        import playwright.sync_api  # noqa: F401
    except ImportError:
        MISSING["playwright"] = "the playwright package is missing: `make install`"
        pytest.skip(MISSING["playwright"])
