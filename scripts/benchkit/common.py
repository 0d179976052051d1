"""What every part of the bench shares: where it runs, its constants, a log line, numbers."""

from __future__ import annotations

import statistics
import sys
import time
from pathlib import Path

from worker import processes

ROOT = Path(__file__).resolve().parents[2]
PYTHON = sys.executable
#: The workers run exactly as the Procfile runs them (worker.processes).
PROCESSES = processes.WORKER_PROCESSES
THREADS = processes.WORKER_THREADS
WORKER_POLL_MS = processes.WORKER_POLL_MS


FIGURES = ("limit", "e2e", "e2e-notify", "latency-bound", "latency", "callbacks", "memory")
#: Sandbox answer delay of the latency-bound figure.
SLOW_KODMOBI_MS = 200
LATENCY_RATE = 20.0
#: Seconds of nothing to do, measured before the latency run: what an idle system costs.
IDLE_S = 5.0
RSS_EVERY_S = 0.2
#: Give up on a run that makes no progress for this long.
STALL_S = 60.0
MB = 1024 * 1024


def log(text: str) -> None:
    print(f"[bench {time.strftime('%H:%M:%S')}] {text}", file=sys.stderr, flush=True)


# -- numbers -----------------------------------------------------------------------------------


def percentile(values: list[float], q: float) -> float:
    """Linear interpolation between closest ranks (numpy's default)."""
    ordered = sorted(values)
    if not ordered:
        return float("nan")
    pos = (len(ordered) - 1) * q / 100
    low = int(pos)
    high = min(low + 1, len(ordered) - 1)
    return ordered[low] + (ordered[high] - ordered[low]) * (pos - low)


def median(values: list[float]) -> float:
    clean = [v for v in values if v == v]  # drop NaN
    return statistics.median(clean) if clean else float("nan")


def phone(prefix: int, i: int) -> str:
    """+7999Pxxxxxx: unique, valid, never a sandbox magic number (those start +79990)."""
    return f"+7999{prefix}{i:06d}"
