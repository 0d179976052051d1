"""py-spy on a process while a figure runs, and what its folded stacks say."""

from __future__ import annotations

import re
import signal
import subprocess
import time
from collections import Counter
from pathlib import Path
from typing import Any

from scripts.benchkit.common import (
    PYTHON,
)


class Profiler:
    """py-spy record on a process (and its children) while a figure runs."""

    def __init__(self, pid: int, out: Path, *, subprocesses: bool) -> None:
        self.out = out
        argv = [str(Path(PYTHON).parent / "py-spy"), "record", "--pid", str(pid)]
        # --gil: only the thread holding the GIL is sampled, so the shares are of the CPU
        # time spent in Python, not of threads waiting on sockets and locks.
        argv += ["--rate", "100", "--gil", "--format", "raw", "--output", str(out)]
        if subprocesses:
            argv.append("--subprocesses")
        self.process = subprocess.Popen(  # noqa: S603 - our own argv
            argv, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE
        )
        time.sleep(0.5)  # let it attach before the clock starts

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.send_signal(signal.SIGINT)
        try:
            self.process.wait(timeout=60)
        except subprocess.TimeoutExpired:
            self.process.kill()


#: Libraries whose inclusive share (time under any of their frames) is worth printing.
INCLUSIVE_PACKAGES = frozenset(
    {"worker", "sqlalchemy", "psycopg", "redis", "httpx", "httpcore", "dramatiq", "structlog",
     "logging", "pydantic", "fastapi", "starlette", "uvicorn", "json", "ssl", "cryptography"}
)  # fmt: skip


def summarize_profile(path: Path, top: int = 15) -> dict[str, Any]:
    """Self and inclusive shares of functions and packages in a py-spy raw (folded) file."""
    if not path.exists():
        return {"error": f"no profile written at {path}"}
    self_time: Counter[str] = Counter()
    inclusive: Counter[str] = Counter()
    packages: Counter[str] = Counter()
    packages_inclusive: Counter[str] = Counter()
    total = 0
    for line in path.read_text().splitlines():
        stack, _, count_text = line.rpartition(" ")
        if not stack or not count_text.isdigit():
            continue
        count = int(count_text)
        total += count
        frames = [f for f in stack.split(";") if not f.startswith(("process ", "thread "))]
        names = [_frame_name(f) for f in frames]
        if names:
            self_time[names[-1]] += count
            packages[_frame_package(frames[-1])] += count
        # Inclusive shares of our own functions: which use case the CPU goes to.
        for name in {n for n in names if "(worker/" in n}:
            inclusive[name] += count
        for package in {_frame_package(f) for f in frames} & INCLUSIVE_PACKAGES:
            packages_inclusive[package] += count
    if not total:
        return {"error": "empty profile"}

    def share(counter: Counter[str]) -> list[tuple[str, float]]:
        return [(name, round(100 * n / total, 1)) for name, n in counter.most_common(top)]

    return {
        "samples": total,
        "self": share(self_time),
        "inclusive": share(inclusive),
        "packages_self": share(packages),
        "packages_inclusive": share(packages_inclusive),
    }


_FRAME = re.compile(r"^(?P<func>\S+) \((?P<file>.*?)(?::\d+)?\)$")


def _frame_name(frame: str) -> str:
    """`func (path/module.py)`: py-spy already writes paths relative to sys.path."""
    match = _FRAME.match(frame)
    return f"{match['func']} ({match['file']})" if match else frame


def _frame_package(frame: str) -> str:
    """The top-level package of a frame's file (`sqlalchemy`, `worker`, `threading`...)."""
    match = _FRAME.match(frame)
    file = match["file"] if match else frame
    if file.startswith("<"):  # <frozen os>, <frozen importlib._bootstrap>, <sqlalchemy ...>
        words = file[1:].rstrip(">").split(" ")
        return words[1].split(".")[0] if words[0] == "frozen" and len(words) > 1 else words[0]
    return file.split("/", 1)[0].removesuffix(".py")


def print_profiles(profiles: dict[str, Any], directory: Path | None) -> None:
    for name, summary in profiles.items():
        print(f"\nprofile {name} (py-spy, {directory}/{name}.folded):")
        if "error" in summary:
            print(f"  {summary['error']}")
            continue
        print(f"  {summary['samples']} samples of the GIL holder (100 Hz)")
        print("  self time by package:")
        print("    " + ", ".join(f"{k} {v}%" for k, v in summary["packages_self"]))
        print("  inclusive by package:")
        print("    " + ", ".join(f"{k} {v}%" for k, v in summary["packages_inclusive"]))
        print("  self time:")
        for fn, share in summary["self"]:
            print(f"    {share:5.1f}%  {fn}")
        print("  inclusive, our functions (worker/):")
        for fn, share in summary["inclusive"]:
            print(f"    {share:5.1f}%  {fn}")
