"""A once-a-second sample of each process group's CPU and the sandbox's callback backlog."""

from __future__ import annotations

import contextlib
import json
import os
import threading
import time
from collections import defaultdict
from pathlib import Path
from typing import Any

import httpx

from tests.support.chaos.cluster import Cluster


def _cpu_ticks() -> dict[str, dict[int, int]]:
    """CPU ticks (user + system) of the live processes (Linux /proc), summed by process
    group and by parent: Postgres backends each run in a session of their own."""
    by: dict[str, dict[int, int]] = {"pgid": defaultdict(int), "ppid": defaultdict(int)}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        with contextlib.suppress(OSError, ValueError, IndexError):
            pid = int(stat.parent.name)
            fields = stat.read_text().rpartition(")")[2].split()
            # After the command: state ppid pgrp …; utime and stime are the 12th and 13th.
            ticks = int(fields[11]) + int(fields[12])
            by["pgid"][int(fields[2])] += ticks
            by["ppid"][int(fields[1])] += ticks
            by["ppid"][pid] += ticks  # a parent counts itself
    return by


class Sampler:
    """Once a second: CPU of each process group and the sandbox's callback backlog, to
    `samples.jsonl` in the workdir, for whoever wants to see how the run went."""

    def __init__(self, cluster: Cluster, path: Path) -> None:
        self.cluster = cluster
        self.path = path
        self.peak_callbacks_pending = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="sampler", daemon=True)
        self._hz = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5)

    def _groups(self) -> dict[str, tuple[str, int]]:
        groups = {
            name: ("pgid", p.popen.pid)
            for name, p in self.cluster.processes.items()
            if p.popen is not None
        }
        redis_process = self.cluster.redis.process
        if redis_process is not None:
            groups["redis"] = ("pgid", redis_process.pid)
        with contextlib.suppress(OSError, ValueError, IndexError):
            pid_file = self.cluster.postgres.pgdata / "postmaster.pid"
            groups["postgres"] = ("ppid", int(pid_file.read_text().split()[0]))
        return groups

    def _run(self) -> None:
        headers = {"x-api-key": self.cluster.api_key}
        before = _cpu_ticks()
        with open(self.path, "a", encoding="utf-8") as out:
            while not self._stop.wait(1.0):
                now = _cpu_ticks()
                sample: dict[str, Any] = {"t": round(time.monotonic() - self.cluster.t0, 1)}
                cpu = {}
                for name, (by, pid) in self._groups().items():
                    used = now[by].get(pid, 0) - before[by].get(pid, 0)
                    cpu[name] = round(100 * max(0, used) / self._hz)
                sample["cpu_pct"] = cpu
                with contextlib.suppress(Exception):
                    stats = httpx.get(
                        f"{self.cluster.sandbox_url}/sandbox/stats",
                        headers=headers,
                        timeout=2,
                        trust_env=False,
                    ).json()
                    pending = int(stats["callbacks"]["pending"])
                    sample["callbacks_pending"] = pending
                    sample["sends_accepted"] = stats["sends"]["accepted"]
                    self.peak_callbacks_pending = max(self.peak_callbacks_pending, pending)
                before = now
                out.write(json.dumps(sample) + "\n")
                out.flush()
