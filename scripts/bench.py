"""`make bench`: the real processes (web, worker, clock, sandbox) on real Postgres and Redis.

The bench itself is the package scripts/benchkit/ (its docstring lists the figures);
this file is the command: `python scripts/bench.py --help`.
"""

from __future__ import annotations

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from scripts.benchkit.main import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main())
