"""The processes of one run, started as the Procfile starts them (worker.processes)."""

from __future__ import annotations

import contextlib
import os
import time
from collections.abc import Iterator

import httpx
import psutil

from scripts.benchkit.common import (
    PROCESSES,
    ROOT,
)
from scripts.benchkit.infra import Infra
from worker import processes
from worker.broker import build_broker
from worker.embedded import wait_for_port


class System(processes.LocalEndpoints):
    """The processes of one run, started as the Procfile starts them; stopped in reverse."""

    def __init__(self, infra: Infra, db_url: str, namespace: str, label: str) -> None:
        self.infra = infra
        self.db_url = db_url
        self.namespace = namespace
        self.label = label
        super().__init__()
        self.processes: dict[str, processes.ManagedProcess] = {}
        self.log_dir = infra.workdir / "logs"
        self.log_dir.mkdir(parents=True, exist_ok=True)
        self.env = dict(os.environ)
        self.env.update(infra.secrets)
        self.env.update(
            {
                "DATABASE_URL": db_url,
                "REDIS_URL": infra.redis_url,
                "BROKER_NAMESPACE": namespace,
                "KODMOBI_BASE_URL": f"http://127.0.0.1:{self.sandbox_port}",
                "PUBLIC_BASE_URL": f"http://127.0.0.1:{self.web_port}",
                "RECIPIENT_LIMIT": "0",
                "CHANNEL_COOLDOWN_S": "0",
                "LOG_LEVEL": "WARNING",
            }
        )
        self.broker = build_broker(infra.redis_url, namespace)
        self.redis = infra.redis

    def sandbox_client(self) -> httpx.Client:
        """For the sandbox's /sandbox/* record and control endpoints (they check the key too)."""
        return httpx.Client(
            base_url=self.sandbox_url,
            headers={"x-api-key": self.env["KODMOBI_API_KEY"]},
            timeout=10,
        )

    @property
    def api_token(self) -> str:
        return self.env["API_TOKENS"]

    def spawn(self, name: str, command: processes.Command) -> processes.ManagedProcess:
        log_path = self.log_dir / f"{self.label}-{name}.log"
        process = processes.ManagedProcess.of(name, command, self.env, log_path, cwd=ROOT)
        self.processes[name] = process.start()
        return process

    def start_sandbox(self, latency_ms: float = 0, callback_delay_ms: float = 0) -> None:
        options = ["--latency-ms", str(latency_ms), "--callback-delay-ms", str(callback_delay_ms)]
        api_key = self.env["KODMOBI_API_KEY"]
        self.spawn("sandbox", processes.sandbox(self.sandbox_port, api_key, *options))
        wait_for_port(self.sandbox_port)

    def start_web(self, app: str = processes.WEB_APP, app_dir: str | None = None) -> None:
        self.spawn("web", processes.local_web(self.web_port, app=app, app_dir=app_dir))
        ready = "/readyz" if app_dir is None else "/healthz"
        processes.wait_ready(self.web_url + ready, self.processes)

    def start_clock(self) -> None:
        self.spawn("clock", processes.clock())

    def start_workers(self, module: str = processes.ACTORS, path: str | None = None) -> None:
        """The worker process, and wait until each of its children polls the queue."""
        before = set(self.redis.zrange(f"{self.namespace}:__heartbeats__", 0, -1))
        self.spawn("worker", processes.worker(module=module, path=path))
        deadline = time.monotonic() + 60
        while True:
            now = set(self.redis.zrange(f"{self.namespace}:__heartbeats__", 0, -1))
            if len(now - before) >= PROCESSES:
                return
            self.check_alive()
            if time.monotonic() > deadline:
                raise TimeoutError("worker processes did not start polling within 60 s")
            time.sleep(0.02)

    def check_alive(self) -> None:
        processes.check_alive(self.processes)

    def worker_children(self) -> list[psutil.Process]:
        process = self.processes.get("worker")
        if process is None:
            return []
        with contextlib.suppress(psutil.Error):
            return psutil.Process(process.pid).children()
        return []

    def roles(self) -> dict[str, int]:
        """Root pid of each role, ours and the embedded servers'."""
        roles = {name: p.pid for name, p in self.processes.items()}
        roles.update(self.infra.server_pids())
        return roles

    def stop(self) -> None:
        processes.stop_processes(list(self.processes.values()))
        self.processes.clear()
        with contextlib.suppress(Exception):
            self.broker.close()


@contextlib.contextmanager
def system(infra: Infra, label: str) -> Iterator[System]:
    with infra.fresh() as (db_url, namespace):
        sys_ = System(infra, db_url, namespace, label)
        try:
            yield sys_
        finally:
            sys_.stop()
