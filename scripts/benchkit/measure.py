"""Measuring while a figure runs: CPU per role, peak RSS of the workers, a quiet machine."""

from __future__ import annotations

import contextlib
import os
import threading
import time

import psutil

from scripts.benchkit.common import (
    RSS_EVERY_S,
    log,
)
from scripts.benchkit.system import System


def _tree(pid: int) -> list[psutil.Process]:
    try:
        root = psutil.Process(pid)
        return [root, *root.children(recursive=True)]
    except psutil.Error:
        return []


class CpuMeter:
    """CPU seconds per role between start() and stop(), and what the rest of the machine used."""

    def __init__(self, roles: dict[str, int]) -> None:
        self.roles = roles
        self.before: dict[str, dict[int, float]] = {}
        self.machine_before = psutil.cpu_times()
        self.t0 = time.monotonic()

    @staticmethod
    def _snap(pid: int) -> dict[int, float]:
        out = {}
        for p in _tree(pid):
            with contextlib.suppress(psutil.Error):
                t = p.cpu_times()
                out[p.pid] = t.user + t.system
        return out

    def start(self) -> None:
        self.before = {role: self._snap(pid) for role, pid in self.roles.items()}
        self.before["bench"] = self._snap_self()
        self.machine_before = psutil.cpu_times()
        self.t0 = time.monotonic()

    @staticmethod
    def _snap_self() -> dict[int, float]:
        t = psutil.Process().cpu_times()
        return {os.getpid(): t.user + t.system}

    def stop(self) -> dict[str, float]:
        """Average cores used by each role over the window, plus `other` (not ours)."""
        wall = max(time.monotonic() - self.t0, 1e-9)
        used: dict[str, float] = {}
        for role, pid in self.roles.items():
            after = self._snap(pid)
            before = self.before.get(role, {})
            used[role] = sum(v - before.get(p, 0.0) for p, v in after.items())
        after_self = self._snap_self()
        used["bench"] = sum(v - self.before["bench"].get(p, 0.0) for p, v in after_self.items())
        m0, m1 = self.machine_before, psutil.cpu_times()
        busy = (
            m1.user + m1.system + m1.nice + getattr(m1, "irq", 0) + getattr(m1, "softirq", 0)
        ) - (m0.user + m0.system + m0.nice + getattr(m0, "irq", 0) + getattr(m0, "softirq", 0))
        used["other"] = max(0.0, busy - sum(used.values()))
        return {role: round(seconds / wall, 3) for role, seconds in used.items()}


class RssSampler:
    """Peak RSS of every worker child (and of web) every RSS_EVERY_S, in a thread."""

    def __init__(self, sys_: System) -> None:
        self.sys = sys_
        self.peaks: dict[int, int] = {}
        self.web_peak = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        web = self.sys.processes.get("web")
        while not self._stop.is_set():
            for child in self.sys.worker_children():
                with contextlib.suppress(psutil.Error):
                    rss = child.memory_info().rss
                    self.peaks[child.pid] = max(self.peaks.get(child.pid, 0), rss)
            if web is not None:
                with contextlib.suppress(psutil.Error):
                    self.web_peak = max(self.web_peak, psutil.Process(web.pid).memory_info().rss)
            self._stop.wait(RSS_EVERY_S)

    def __enter__(self) -> RssSampler:
        self._thread.start()
        return self

    def __exit__(self, *_exc: object) -> None:
        self._stop.set()
        self._thread.join()


def wait_for_quiet(max_wait_s: float, threshold_cores: float = 0.4) -> float:
    """Wait (up to max_wait_s) until the rest of the machine is nearly idle for 2 s in a row:
    on a shared 2-core box another job's CPU shows up directly in every figure.
    Returns the cores the machine was using when we went ahead."""
    cpus = psutil.cpu_count() or 1
    deadline = time.monotonic() + max_wait_s
    quiet = 0
    busy = 0.0
    said = False
    while True:
        busy = psutil.cpu_percent(interval=1.0) / 100 * cpus
        quiet = quiet + 1 if busy < threshold_cores else 0
        if quiet >= 2:
            return busy
        if time.monotonic() >= deadline:
            log(f"machine still busy ({busy:.2f} cores used by others); going ahead anyway")
            return busy
        if quiet == 0 and not said:
            log(f"waiting up to {max_wait_s:g}s for a quiet machine ({busy:.2f} cores busy)")
            said = True
