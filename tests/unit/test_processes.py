"""The Procfile's commands are written once (worker/processes.py); the Procfile agrees."""

from __future__ import annotations

import os
import signal
import sys
import time
from pathlib import Path

import pytest

from worker import processes

ROOT = Path(__file__).resolve().parents[2]


def test_the_procfile_at_the_repository_root_says_exactly_what_processes_defines() -> None:
    # Given the commands defined in worker/processes.py (the Procfile is not in the wheel)
    # Then the Procfile deployed from the repository is their rendering, line for line
    assert (ROOT / "Procfile").read_text() == processes.procfile_text()


def test_the_local_worker_runs_as_the_procfile_says_with_our_interpreter() -> None:
    command = processes.worker()
    assert command.argv("python") == [
        "python", "-m", "dramatiq", "worker.actors",
        "--processes", "2", "--threads", "16", "--skip-logging",
        "--fork-function", "worker.metrics_setup:serve_worker_metrics",
    ]  # fmt: skip
    assert command.env == {"dramatiq_worker_timeout": str(processes.WORKER_POLL_MS)}


def test_the_local_web_listens_on_loopback_without_an_access_log() -> None:
    argv = processes.local_web(8123).argv("python")
    assert argv == [
        "python", "-m", "uvicorn", "--factory", "worker.web.app:create_app",
        "--host", "127.0.0.1", "--port", "8123", "--no-access-log",
    ]  # fmt: skip


def test_a_managed_process_is_stopped_with_its_whole_group(tmp_path: Path) -> None:
    # Given a process that starts a child in its group and ignores SIGTERM
    script = (
        "import signal, subprocess, sys, time\n"
        "signal.signal(signal.SIGTERM, signal.SIG_IGN)\n"
        "child = subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(60)'])\n"
        "print(child.pid, flush=True)\n"
        "time.sleep(60)\n"
    )
    log = tmp_path / "stubborn.log"
    process = processes.ManagedProcess("stubborn", [sys.executable, "-c", script], {}, log)
    process.start()
    deadline = time.monotonic() + 10
    while not log.read_text().strip() and time.monotonic() < deadline:
        time.sleep(0.05)
    child = int(log.read_text().split()[0])
    # When it is stopped with a short grace period
    processes.stop_processes([process], timeout_s=0.5)
    # Then the leader is gone, killed, and so is its child
    assert process.exited() == -signal.SIGKILL
    assert _gone(child)


def _gone(pid: int, within_s: float = 5.0) -> bool:
    deadline = time.monotonic() + within_s
    while time.monotonic() < deadline:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            return True
        time.sleep(0.05)  # killed, not yet reaped by init
    return False


def test_check_alive_names_the_process_that_died_and_its_log(tmp_path: Path) -> None:
    log = tmp_path / "quitter.log"
    quitter = processes.ManagedProcess(
        "quitter", [sys.executable, "-c", "raise SystemExit(3)"], {}, log
    )
    quitter.start()
    assert quitter.popen is not None
    quitter.popen.wait()
    with pytest.raises(RuntimeError, match=r"quitter exited with 3 \(see .*quitter.log\)"):
        processes.check_alive({"quitter": quitter})
