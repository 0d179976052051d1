"""The Procfile's commands, written once, for `kodmobi dev`, `make demo`, bench and chaos.

The commands are *defined here*, not parsed from the Procfile: the Procfile is not in the
wheel (only `worker*` is), and `kodmobi dev` must run from an installed package.
`procfile_text()` renders them in the Procfile's words, and tests/unit/test_processes.py
checks that the Procfile at the repository root says exactly that.

Each command knows two forms: its Procfile line (console scripts, `0.0.0.0`,
`${PORT:-8000}`) and the argv a harness starts on this machine (`python -m <module>`,
loopback, a given port, no access log). The harnesses run `release` in-process
(`worker.migrate.upgrade`, the same Alembic upgrade).

`ManagedProcess` and `stop_processes` are the one way the harnesses start a process (in
its own process group, output to a log file), kill its whole group, and stop them all in
reverse start order (clock before worker before web).
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import sys
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

import httpx

from worker.embedded import free_port

#: Dramatiq's idle timeout (ms): an idle consumer waits up to this long for a wake-up
#: from our producers (worker.broker) before it polls its queue; worker threads wait as
#: long for work. Dramatiq's default; a short one (10 ms) cost an idle worker process
#: ~19% of a core.
WORKER_POLL_MS = 1000
#: The Procfile's `worker`: processes x threads.
WORKER_PROCESSES = 2
WORKER_THREADS = 16
#: The actors module the worker runs, and the web app factory.
ACTORS = "worker.actors"
WEB_APP = "worker.web.app:create_app"
#: The Procfile's web address: every interface, the platform's $PORT.
PROCFILE_HOST = "0.0.0.0"
PROCFILE_PORT = "${PORT:-8000}"
#: The harnesses' web address.
LOCAL_HOST = "127.0.0.1"


def local_url(port: int) -> str:
    return f"http://{LOCAL_HOST}:{port}"


class LocalEndpoints:
    """Where a harness's web and sandbox listen: loopback ports of their own."""

    def __init__(self) -> None:
        self.web_port = free_port()
        self.sandbox_port = free_port()

    @property
    def web_url(self) -> str:
        return local_url(self.web_port)

    @property
    def sandbox_url(self) -> str:
        return local_url(self.sandbox_port)


@dataclass(frozen=True)
class Command:
    """One process: `program args…` in the Procfile, `python -m module args…` here."""

    #: the console script the Procfile names (`uvicorn`, `dramatiq`, `kodmobi`, `alembic`)
    program: str
    #: the module that script runs, for `python -m` (same interpreter as ours)
    module: str
    args: tuple[str, ...] = ()
    #: environment the process needs on top of the settings (written before it in the Procfile)
    env: Mapping[str, str] = field(default_factory=dict)

    def argv(self, python: str = sys.executable) -> list[str]:
        return [python, "-m", self.module, *self.args]

    def procfile_line(self) -> str:
        return " ".join([*(f"{k}={v}" for k, v in self.env.items()), self.program, *self.args])


def release() -> Command:
    return Command("alembic", "alembic", ("upgrade", "head"))


def web(
    *,
    host: str = PROCFILE_HOST,
    port: int | str = PROCFILE_PORT,
    app: str = WEB_APP,
    app_dir: str | None = None,
    access_log: bool = True,
) -> Command:
    args = ["--factory", app]
    if app_dir:
        args += ["--app-dir", app_dir]
    args += ["--host", host, "--port", str(port)]
    if not access_log:
        args.append("--no-access-log")
    return Command("uvicorn", "uvicorn", tuple(args))


def local_web(port: int, *, app: str = WEB_APP, app_dir: str | None = None) -> Command:
    """`web` as the harnesses run it: loopback, a port of theirs, no access log (a log line
    per request is not what dev, bench or chaos are about)."""
    return web(host=LOCAL_HOST, port=port, app=app, app_dir=app_dir, access_log=False)


def worker(
    *,
    processes: int = WORKER_PROCESSES,
    threads: int = WORKER_THREADS,
    poll_ms: int | str = WORKER_POLL_MS,
    module: str = ACTORS,
    path: str | None = None,
) -> Command:
    args = [module]
    if path:
        args += ["--path", path]
    args += ["--processes", str(processes), "--threads", str(threads), "--skip-logging"]
    # Dramatiq reads its poll interval from this (lower-case) environment variable only.
    return Command("dramatiq", "dramatiq", tuple(args), {"dramatiq_worker_timeout": str(poll_ms)})


def clock() -> Command:
    return Command("kodmobi", "worker.cli", ("sweep", "--forever"))


def sandbox(port: int, api_key: str, *options: str) -> Command:
    """The kod.mobi imitation (not a Procfile process; docker-compose runs it beside them)."""
    return Command(
        "kodmobi", "worker.cli", ("sandbox", "--port", str(port), "--api-key", api_key, *options)
    )


def procfile() -> dict[str, Command]:
    """The Procfile, process by process, in its order."""
    return {"release": release(), "web": web(), "worker": worker(), "clock": clock()}


def procfile_text() -> str:
    return "".join(f"{name}: {command.procfile_line()}\n" for name, command in procfile().items())


class ManagedProcess:
    """One process in its own process group (so a kill takes its children too), its output
    appended to `log_path` (or ours when None); restartable with the same argv and env."""

    def __init__(
        self,
        name: str,
        argv: Sequence[str],
        env: Mapping[str, str],
        log_path: Path | None = None,
        cwd: Path | None = None,
    ) -> None:
        self.name = name
        self.argv = list(argv)
        self.env = dict(env)
        self.log_path = log_path
        self.cwd = cwd
        self.popen: subprocess.Popen[bytes] | None = None
        self.restarts = 0
        #: set while we stop or kill it on purpose, so a watchdog leaves it alone
        self.expected_exit = False
        self._log: IO[bytes] | None = None

    @classmethod
    def of(
        cls,
        name: str,
        command: Command,
        env: Mapping[str, str],
        log_path: Path | None = None,
        cwd: Path | None = None,
    ) -> ManagedProcess:
        """A process for `command`, its own environment on top of `env`."""
        return cls(name, command.argv(), {**env, **command.env}, log_path, cwd)

    @property
    def pid(self) -> int:
        assert self.popen is not None, f"{self.name} was never started"
        return self.popen.pid

    def start(self) -> ManagedProcess:
        stdout: Any = None
        if self.log_path is not None:
            self.log_path.parent.mkdir(parents=True, exist_ok=True)
            self._log = open(self.log_path, "ab")  # noqa: SIM115 - handed to the child
            stdout = self._log
        self.popen = subprocess.Popen(  # noqa: S603 - our own argv
            self.argv,
            env=self.env,
            cwd=self.cwd,
            stdout=stdout,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        self.expected_exit = False
        return self

    def restart(self) -> None:
        self.restarts += 1
        self.start()

    def exited(self) -> int | None:
        """The exit code once it has exited; None while it runs (or before it started)."""
        return None if self.popen is None else self.popen.poll()

    def where(self) -> str:
        """Where to look when it died."""
        return f" (see {self.log_path})" if self.log_path is not None else ""

    def signal_group(self, sig: int) -> None:
        if self.popen is not None:
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(self.popen.pid, sig)

    def kill(self) -> None:
        """SIGKILL the whole process group: no shutdown, no requeue, no goodbye."""
        if self.popen is None:
            return
        self.expected_exit = True
        self.signal_group(signal.SIGKILL)
        self.popen.wait()
        self._close_log()

    def terminate(self) -> None:
        """SIGTERM its group (once started and still running); `wait_stopped` then."""
        if self.popen is None:
            return
        self.expected_exit = True
        if self.popen.poll() is None:
            self.signal_group(signal.SIGTERM)

    def wait_stopped(self, timeout_s: float) -> None:
        """Wait for the leader; SIGKILL the group if it is not gone in `timeout_s`. Whatever
        the leader left behind in its group goes too."""
        if self.popen is None:
            return
        try:
            self.popen.wait(timeout=timeout_s)
        except subprocess.TimeoutExpired:
            self.signal_group(signal.SIGKILL)
            self.popen.wait()
        self.signal_group(signal.SIGKILL)
        self._close_log()

    def stop(self, timeout_s: float = 20.0) -> None:
        self.terminate()
        self.wait_stopped(timeout_s)

    def _close_log(self) -> None:
        if self._log is not None:
            self._log.close()
            self._log = None


def stop_processes(processes: Sequence[ManagedProcess], timeout_s: float = 20.0) -> None:
    """SIGTERM in reverse start order (clock before worker before web), then wait for each;
    kill what is still there after `timeout_s`."""
    for process in reversed(processes):
        process.terminate()
    for process in processes:
        process.wait_stopped(timeout_s)


def check_alive(processes: Mapping[str, ManagedProcess]) -> None:
    """Raise RuntimeError naming the first process that has exited (and its log)."""
    for name, process in processes.items():
        code = process.exited()
        if code is not None and not process.expected_exit:
            raise RuntimeError(f"process {name} exited with {code}{process.where()}")


def wait_ready(
    url: str, processes: Mapping[str, ManagedProcess], timeout_s: float = 60.0, name: str = "web"
) -> None:
    """Poll `url` until it answers 200, failing at once if one of `processes` has exited.
    Loopback only: never through a proxy from the environment."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        check_alive(processes)
        with contextlib.suppress(httpx.HTTPError):
            if httpx.get(url, timeout=2, trust_env=False).status_code == 200:
                return
        time.sleep(0.1)
    raise TimeoutError(f"{name} not ready at {url} after {timeout_s:g}s")
