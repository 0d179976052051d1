"""`kodmobi dev`: the whole system on one machine — Postgres, Redis, sandbox, web, worker, clock.

Postgres and Redis are embedded (under ./.kodmobi/) unless DATABASE_URL / REDIS_URL
are set; kod.mobi is the sandbox unless KODMOBI_BASE_URL is set. Secrets that are
not set are generated once and kept in ./.kodmobi/dev.env (mode 0600).
"""

from __future__ import annotations

import argparse
import os
import secrets
import shutil
import signal
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from worker import devstate, processes
from worker.embedded import (
    EmbeddedPostgres,
    EmbeddedRedis,
    default_root,
    free_port,
    wait_for_port,
)


@dataclass
class DevOptions:
    root: Path = field(default_factory=default_root)
    web_port: int = 8000
    worker_processes: int = processes.WORKER_PROCESSES
    worker_threads: int = processes.WORKER_THREADS
    #: Where each process's output goes: a directory of <name>.log files, or None for ours.
    log_dir: Path | None = None
    sandbox_args: list[str] = field(default_factory=list)
    extra_env: dict[str, str] = field(default_factory=dict)


def _dev_secrets(root: Path) -> dict[str, str]:
    """Secrets for a dev machine: made once, kept in a private file, never printed."""
    path = root / "dev.env"
    values: dict[str, str] = {}
    if path.exists():
        for line in path.read_text().splitlines():
            key, _, value = line.partition("=")
            if key and value:
                values[key] = value
    wanted: dict[str, Callable[[], str]] = {
        "KODMOBI_API_KEY": lambda: "sandbox-" + secrets.token_urlsafe(18),
        "CALLBACK_SECRET": lambda: secrets.token_urlsafe(32),
        "CODE_KEY": lambda: secrets.token_urlsafe(32),
        "API_TOKENS": lambda: "dev-" + secrets.token_urlsafe(24),
        "OPS_TOKENS": lambda: "ops-" + secrets.token_urlsafe(24),
    }
    changed = False
    for key, make in wanted.items():
        if key not in values:
            values[key] = make()
            changed = True
    if changed:
        root.mkdir(parents=True, exist_ok=True)
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as fh:
            fh.writelines(f"{k}={v}\n" for k, v in values.items())
    return values


class DevSystem:
    """Starts everything in order, stops everything in reverse; a context manager."""

    def __init__(self, options: DevOptions) -> None:
        self.options = options
        self.env: dict[str, str] = {}
        self.processes: dict[str, processes.ManagedProcess] = {}
        self.postgres: EmbeddedPostgres | None = None
        self.redis: EmbeddedRedis | None = None
        #: METRICS_PORT of the worker and the clock (the web serves GET /metrics)
        self.metrics_ports: dict[str, int] = {}

    @property
    def api_url(self) -> str:
        return processes.local_url(self.options.web_port)

    @property
    def api_token(self) -> str:
        return self.env["API_TOKENS"].split(",")[0]

    @property
    def sandbox_url(self) -> str:
        return self.env["KODMOBI_BASE_URL"]

    @property
    def console_url(self) -> str:
        return f"{self.api_url}/ops"

    @property
    def ops_token(self) -> str:
        return self.env["OPS_TOKENS"].split(",")[0]

    def start(self) -> None:
        opts = self.options
        opts.root.mkdir(parents=True, exist_ok=True)
        env = dict(os.environ)
        for key, value in _dev_secrets(opts.root).items():
            env.setdefault(key, value)
        if not env.get("DATABASE_URL"):
            self.postgres = EmbeddedPostgres(opts.root / "postgres")
            env["DATABASE_URL"] = self.postgres.start()
        if not env.get("REDIS_URL"):
            self.redis = EmbeddedRedis(opts.root / "redis")
            env["REDIS_URL"] = self.redis.start()
        env.setdefault("PUBLIC_BASE_URL", self.api_url)
        # Logs for a person at a terminal; JSON when read by a program (DESIGN §9).
        if sys.stderr.isatty() and opts.log_dir is None:
            env.setdefault("LOG_FORMAT", "console")
        env.update(opts.extra_env)
        self.env = env
        self.metrics_ports = {"worker": free_port(), "clock": free_port()}
        env.setdefault("METRICS_HOST", processes.LOCAL_HOST)

        from worker.migrate import upgrade

        upgrade(env["DATABASE_URL"])

        if not env.get("KODMOBI_BASE_URL"):
            port = free_port()
            self._spawn(
                "sandbox", processes.sandbox(port, env["KODMOBI_API_KEY"], *opts.sandbox_args)
            )
            wait_for_port(port)
            env["KODMOBI_BASE_URL"] = processes.local_url(port)
        self._spawn("web", processes.local_web(opts.web_port))
        # The worker's processes share one multiprocess directory (worker.metrics_setup),
        # cleared here so a dev run's counters start at zero.
        metrics_dir = opts.root / "metrics" / "worker"
        shutil.rmtree(metrics_dir, ignore_errors=True)
        metrics_dir.mkdir(parents=True)
        self._spawn(
            "worker",
            processes.worker(
                processes=opts.worker_processes,
                threads=opts.worker_threads,
                # One set in our environment wins, as it did before the Procfile's.
                poll_ms=env.get("dramatiq_worker_timeout", processes.WORKER_POLL_MS),
            ),
            METRICS_PORT=str(self.metrics_ports["worker"]),
            PROMETHEUS_MULTIPROC_DIR=str(metrics_dir),
        )
        self._spawn("clock", processes.clock(), METRICS_PORT=str(self.metrics_ports["clock"]))
        self.wait_ready()
        devstate.write(self.env, opts.root)

    def _spawn(self, name: str, command: processes.Command, **own_env: str) -> None:
        log_dir = self.options.log_dir
        log_path = None if log_dir is None else log_dir / f"{name}.log"
        process = processes.ManagedProcess.of(name, command, {**self.env, **own_env}, log_path)
        self.processes[name] = process.start()

    def wait_ready(self, timeout_s: float = 60.0) -> None:
        processes.wait_ready(f"{self.api_url}/readyz", self.processes, timeout_s)

    def check_alive(self) -> None:
        processes.check_alive(self.processes)

    def stop(self) -> None:
        devstate.remove(self.options.root)
        processes.stop_processes(list(self.processes.values()))
        self.processes.clear()
        if self.redis is not None:
            self.redis.stop()
        if self.postgres is not None:
            self.postgres.stop()

    def __enter__(self) -> DevSystem:
        try:
            self.start()
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(self, *_exc: object) -> None:
        self.stop()


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--port", type=int, default=int(os.environ.get("PORT", 8000)))
    parser.add_argument(
        "--processes", type=int, default=processes.WORKER_PROCESSES, help="worker processes"
    )
    parser.add_argument(
        "--threads",
        type=int,
        default=processes.WORKER_THREADS,
        help="threads per worker process",
    )


def run(args: argparse.Namespace) -> int:
    options = DevOptions(
        web_port=args.port, worker_processes=args.processes, worker_threads=args.threads
    )
    stopping = False

    def _stop(*_: object) -> None:
        nonlocal stopping
        stopping = True

    signal.signal(signal.SIGTERM, _stop)
    signal.signal(signal.SIGINT, _stop)
    system = DevSystem(options)
    try:
        system.start()
        print(
            f"kodmobi dev: web {system.api_url} (API token in {options.root / 'dev.env'}), "
            f"kod.mobi at {system.sandbox_url}\n"
            f"  operations console: {system.console_url}  (dev ops token: {system.ops_token})\n"
            f"  metrics: {system.api_url}/metrics, worker :{system.metrics_ports['worker']}, "
            f"clock :{system.metrics_ports['clock']}\n"
            f"  kodmobi send/status/purge in this directory use this system; "
            f"Ctrl-C stops everything",
            file=sys.stderr,
            flush=True,
        )
        while not stopping:
            system.check_alive()
            time.sleep(0.3)
    except RuntimeError as exc:
        print(f"kodmobi dev: {exc}", file=sys.stderr)
        return 1
    finally:
        system.stop()
    return 0
