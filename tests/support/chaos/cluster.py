"""The cluster: embedded Postgres and Redis, the sandbox, web, N workers and clock, with a
watchdog; and the faults it can suffer (a worker SIGKILLed, a server restarted)."""

from __future__ import annotations

import contextlib
import os
import secrets
import shutil
import subprocess
import threading
import time
from collections import Counter
from pathlib import Path

import httpx

from tests.support.chaos.model import ChaosParams, Echo
from worker import processes
from worker.embedded import EmbeddedPostgres, EmbeddedRedis, wait_for_port

ROOT = Path(__file__).resolve().parents[3]


def _clean_env() -> dict[str, str]:
    """Our environment without any setting of the system: every value is ours."""
    from worker.settings import Settings

    names = {(f.alias or name).upper() for name, f in Settings.model_fields.items()}
    # Everything talks over loopback: a proxy from the environment must not get in between.
    names |= {"PORT", "DRAMATIQ_WORKER_TIMEOUT", "HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY"}
    return {k: v for k, v in os.environ.items() if k.upper() not in names}


class Cluster(processes.LocalEndpoints):
    """Postgres, Redis, the sandbox, web, N workers and clock; a watchdog restarts any
    process that dies without being killed on purpose, and records it as a crash."""

    def __init__(self, params: ChaosParams, workdir: Path, echo: Echo) -> None:
        self.params = params
        self.workdir = workdir
        self.echo = echo
        self.log_dir = workdir / "logs"
        self.postgres = EmbeddedPostgres(workdir / "postgres")
        self.redis = EmbeddedRedis(workdir / "redis")
        self.api_key = "sandbox-" + secrets.token_urlsafe(18)
        self.api_token = "chaos-" + secrets.token_urlsafe(24)
        super().__init__()
        #: the workers' Dramatiq namespace, which their call slots share (worker.call_slots)
        self.namespace = "dramatiq"
        self.env: dict[str, str] = {}
        self.processes: dict[str, processes.ManagedProcess] = {}
        self.workers: list[processes.ManagedProcess] = []
        self.crashes: list[str] = []
        self.server_restarts: Counter[str] = Counter()
        self.t0 = time.monotonic()
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._watchdog: threading.Thread | None = None
        #: more settings for every process (the webhook secret and allowed hosts)
        self.extra_env: dict[str, str] = {}

    def start(self) -> None:
        p = self.params
        self.log_dir.mkdir(parents=True, exist_ok=True)
        database_url = self._start_postgres()
        redis_url = self.redis.start()
        from worker.migrate import upgrade

        upgrade(database_url)
        env = _clean_env()
        env.update(
            {
                "DATABASE_URL": database_url,
                "REDIS_URL": redis_url,
                "KODMOBI_API_KEY": self.api_key,
                "KODMOBI_BASE_URL": self.sandbox_url,
                "PUBLIC_BASE_URL": self.web_url,
                "CALLBACK_SECRET": secrets.token_urlsafe(32),
                "API_TOKENS": self.api_token,
                "CODE_KEY": secrets.token_urlsafe(32),
                "DELIVERY_TIMEOUT_S": str(p.delivery_timeout_s),
                "CODE_TTL_S": str(p.code_ttl_s),
                "RECIPIENT_LIMIT": "0",
                "CHANNEL_COOLDOWN_S": "0",
                "KODMOBI_READ_TIMEOUT_S": str(p.read_timeout_s),
                "SWEEP_INTERVAL_S": str(p.sweep_interval_s),
                "BROKER_NAMESPACE": self.namespace,
                "LOG_FORMAT": "json",
                "LOG_LEVEL": "INFO",
                "PYTHONUNBUFFERED": "1",
                "WEBHOOK_TIMEOUT_S": str(p.webhook_timeout_s),
                # Retries after the receiver's outage come within the run's drain bound.
                "WEBHOOK_MAX_BACKOFF_S": "8",
            }
        )
        env.update(self.extra_env)
        self.database_url = database_url
        self.redis_url = redis_url
        self.env = env
        sandbox_options = [
            "--error-5xx-rate", str(p.error_5xx_rate),
            "--throttle-429-rate", str(p.throttle_429_rate),
            "--slow-rate", str(p.slow_rate),
            "--slow-ms", str(p.slow_ms),
            "--failure-callback-rate", str(p.failure_callback_rate),
            "--lost-callback-rate", str(p.lost_callback_rate),
            "--duplicate-callback-rate", str(p.duplicate_callback_rate),
            "--out-of-order-rate", str(p.out_of_order_rate),
            "--callback-delay-ms", str(p.callback_delay_ms),
            "--callback-retries", str(p.callback_retries),
            "--record-limit", "0",
            "--seed", str(p.seed),
        ]  # fmt: skip
        self._add("sandbox", processes.sandbox(self.sandbox_port, self.api_key, *sandbox_options))
        wait_for_port(self.sandbox_port)
        self._add("web", processes.local_web(self.web_port))
        # One worker process (its own process group) per kill target, rather than one
        # Dramatiq master with N children: a SIGKILL takes exactly one of them.
        for n in range(1, p.worker_processes + 1):
            worker = processes.worker(processes=1, threads=p.worker_threads)
            self.workers.append(self._add(f"worker-{n}", worker))
        self._add("clock", processes.clock())
        self._wait_ready()
        self._watchdog = threading.Thread(target=self._watch, name="watchdog", daemon=True)
        self._watchdog.start()

    def _start_postgres(self) -> str:
        try:
            return self.postgres.start()
        except subprocess.CalledProcessError as exc:
            # initdb has failed once under a loaded machine; its output is in our log.
            self.echo(f"chaos: Postgres did not start ({exc}); again on a fresh data directory")
            self.postgres.stop(mode="immediate")
            shutil.rmtree(self.postgres.pgdata, ignore_errors=True)
            return self.postgres.start()

    def _add(self, name: str, command: processes.Command) -> processes.ManagedProcess:
        log_path = self.log_dir / f"{name}.log"
        process = processes.ManagedProcess.of(name, command, self.env, log_path, cwd=ROOT)
        self.processes[name] = process.start()
        return process

    def _wait_ready(self, timeout_s: float = 60.0) -> None:
        processes.wait_ready(f"{self.web_url}/readyz", self.processes, timeout_s)

    def _watch(self) -> None:
        while not self._stop.wait(0.5):
            with self._lock:
                for name, process in self.processes.items():
                    code = process.exited()
                    if code is None or process.expected_exit:
                        continue
                    at = time.monotonic() - self.t0
                    self.crashes.append(f"{name} exited with {code} at t={at:.1f}s")
                    self.echo(f"chaos: {name} exited by itself ({code}); restarting it")
                    process.restart()

    # -- faults ------------------------------------------------------------------------

    def kill_worker(self, index: int) -> str:
        worker = self.workers[index % len(self.workers)]
        with self._lock:
            worker.kill()
        time.sleep(self.params.kill_downtime_s)
        with self._lock:
            worker.restart()
        return worker.name

    def restart_redis(self) -> str:
        return self._restart_server("redis", self.redis, self.params.redis_downtime_s)

    def restart_postgres(self, downtime_s: float | None = None) -> str:
        if downtime_s is None:
            downtime_s = self.params.postgres_downtime_s
        return self._restart_server("postgres", self.postgres, downtime_s)

    def take_both_down(self, downtime_s: float) -> str:
        """Redis and Postgres away together for `downtime_s`, then both back."""
        self.redis.stop()
        self.postgres.stop()
        time.sleep(downtime_s)
        self.postgres.start()
        self.redis.start()
        self.server_restarts["redis"] += 1
        self.server_restarts["postgres"] += 1
        return "redis+postgres"

    def callback_tries(self) -> int:
        """Callback tries the sandbox has had answered so far (-1: cannot tell)."""
        try:
            stats = httpx.get(
                f"{self.sandbox_url}/sandbox/stats",
                headers={"x-api-key": self.api_key},
                timeout=2,
                trust_env=False,
            ).json()
            return sum(int(n) for n in stats["callbacks"]["answers"].values())
        except (httpx.HTTPError, ValueError, KeyError):
            return -1

    def callbacks_arriving(self) -> bool:
        """kod.mobi's callbacks are reaching web right now (more answered within 0.2 s)."""
        before = self.callback_tries()
        time.sleep(0.2)
        return before >= 0 and self.callback_tries() > before

    def _restart_server(
        self, name: str, server: EmbeddedPostgres | EmbeddedRedis, downtime_s: float
    ) -> str:
        server.stop()
        time.sleep(downtime_s)
        server.start()
        self.server_restarts[name] += 1
        return name

    def restarts(self) -> dict[str, int]:
        counts = {name: p.restarts for name, p in self.processes.items() if p.restarts}
        counts.update(self.server_restarts)
        return counts

    def stop(self) -> None:
        self._stop.set()
        if self._watchdog is not None:
            self._watchdog.join(timeout=5)
        with self._lock:
            # Producers' side first: the clock and workers, then web, then the sandbox.
            processes.stop_processes(list(self.processes.values()))
        with contextlib.suppress(Exception):
            self.redis.stop()
        with contextlib.suppress(Exception):
            self.postgres.stop()
