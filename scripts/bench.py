"""`make bench`: the real processes (web, worker, clock, sandbox) on real Postgres and Redis.

Prints one table: each figure's median over --runs, every run's value, the target and
whether it is met. Postgres and Redis are the machine's when DATABASE_URL / REDIS_URL are
set (then every run gets a fresh database on that server and a Dramatiq namespace of its
own, both removed after), embedded servers in a temporary directory otherwise.

Figures (see --help for the flags):
  limit          a no-op actor on the same broker, 2 processes x 16 threads (msg/s)
  e2e            N raw `send_code` messages from intake to `delivered`, sandbox at once
  latency-bound  the same with the sandbox answering after 200 ms
  latency        20 codes/s: POST /v1/messages or raw enqueue -> sandbox got manual/send
  callbacks      callbacks/s the receiver applies, vs a bare endpoint on the same stack
  memory         peak RSS of each worker process during the e2e and latency-bound runs
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import platform
import re
import secrets
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import uuid
from collections import Counter, defaultdict
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import dramatiq
import httpx
import psutil
import psycopg
import redis
from ulid import ULID

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from worker.broker import QUEUE, build_broker  # noqa: E402
from worker.dev import stop_processes  # noqa: E402
from worker.embedded import EmbeddedPostgres, EmbeddedRedis, free_port, wait_for_port  # noqa: E402
from worker.security import callback_token  # noqa: E402

PYTHON = sys.executable


def _procfile_worker() -> tuple[int, int, str]:
    """(processes, threads, dramatiq_worker_timeout) from the Procfile's `worker:` line, so the
    bench runs the workers exactly as deployed; Dramatiq's defaults for what it leaves out."""
    processes, threads, poll = 2, 16, "1000"
    with contextlib.suppress(OSError):
        for line in (ROOT / "Procfile").read_text().splitlines():
            if line.startswith("worker:"):
                if m := re.search(r"--processes[ =](\d+)", line):
                    processes = int(m[1])
                if m := re.search(r"--threads[ =](\d+)", line):
                    threads = int(m[1])
                if m := re.search(r"dramatiq_worker_timeout=(\d+)", line):
                    poll = m[1]
    return processes, threads, poll


PROCESSES, THREADS, WORKER_POLL_MS = _procfile_worker()
FIGURES = ("limit", "e2e", "latency-bound", "latency", "callbacks", "memory")
#: Sandbox answer delay of the latency-bound figure.
SLOW_KODMOBI_MS = 200
LATENCY_RATE = 20.0
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


# -- servers and databases -----------------------------------------------------------------------


def _with_database(url: str, name: str) -> str:
    parts = urlsplit(url)
    return urlunsplit((parts.scheme, parts.netloc, "/" + name, parts.query, parts.fragment))


def _libpq_url(url: str) -> str:
    """psycopg wants postgresql://; DATABASE_URL may say postgres:// or postgresql+psycopg://."""
    for prefix in ("postgresql+psycopg://", "postgres://"):
        if url.startswith(prefix):
            return "postgresql://" + url[len(prefix) :]
    return url


class Infra:
    """Postgres and Redis for the whole bench, a migrated template database, the secrets."""

    def __init__(self, workdir: Path) -> None:
        self.workdir = workdir
        self.tag = f"{os.getpid()}{secrets.token_hex(3)}"
        self.postgres: EmbeddedPostgres | None = None
        self.redis_server: EmbeddedRedis | None = None
        self.pg_url = ""
        self.redis_url = ""
        self.template = f"kodmobi_bench_{self.tag}_tpl"
        self.databases: list[str] = []
        self.runs = 0
        self.secrets = {
            "KODMOBI_API_KEY": "sandbox-" + secrets.token_urlsafe(18),
            "CALLBACK_SECRET": secrets.token_urlsafe(32),
            "CODE_KEY": secrets.token_urlsafe(32),
            "API_TOKENS": "bench-" + secrets.token_urlsafe(24),
        }

    @property
    def embedded(self) -> bool:
        return self.postgres is not None

    def start(self) -> None:
        if os.environ.get("DATABASE_URL"):
            self.pg_url = _libpq_url(os.environ["DATABASE_URL"])
        else:
            log("starting embedded Postgres")
            self.postgres = EmbeddedPostgres(self.workdir / "postgres")
            self.pg_url = self.postgres.start()
        if os.environ.get("REDIS_URL"):
            self.redis_url = os.environ["REDIS_URL"]
        else:
            log("starting embedded Redis")
            self.redis_server = EmbeddedRedis(self.workdir / "redis")
            self.redis_url = self.redis_server.start()
        self.redis = redis.Redis.from_url(self.redis_url)
        self._admin(f'CREATE DATABASE "{self.template}"')
        self.databases.append(self.template)
        from worker.migrate import upgrade

        log("migrating the template database")
        upgrade(_with_database(self.pg_url, self.template))

    def _admin(self, *statements: str) -> None:
        with psycopg.connect(self.pg_url, autocommit=True) as conn:
            for statement in statements:
                conn.execute(statement)  # type: ignore[arg-type]

    def _drop(self, name: str) -> None:
        self._admin(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
            f"WHERE datname = '{name}' AND pid <> pg_backend_pid()",
            f'DROP DATABASE IF EXISTS "{name}"',
        )

    @contextlib.contextmanager
    def fresh(self) -> Iterator[tuple[str, str]]:
        """A fresh migrated database and a Dramatiq namespace of its own: (db url, namespace)."""
        self.runs += 1
        name = f"kodmobi_bench_{self.tag}_{self.runs}"
        namespace = f"kodmobi-bench-{self.tag}-{self.runs}"
        self._admin(f'CREATE DATABASE "{name}" TEMPLATE "{self.template}"')
        self.databases.append(name)
        try:
            yield _with_database(self.pg_url, name), namespace
        finally:
            with contextlib.suppress(Exception):
                self._drop(name)
                self.databases.remove(name)
            with contextlib.suppress(Exception):
                keys = list(self.redis.scan_iter(match=f"{namespace}:*", count=1000))
                for i in range(0, len(keys), 500):
                    self.redis.delete(*keys[i : i + 500])

    def stop(self) -> None:
        for name in list(self.databases):
            with contextlib.suppress(Exception):
                self._drop(name)
        if self.redis_server is not None:
            self.redis_server.stop()
        if self.postgres is not None:
            self.postgres.stop(mode="immediate")
        # The servers' data is of no use after the run; the processes' logs are kept.
        for name in ("postgres", "redis"):
            shutil.rmtree(self.workdir / name, ignore_errors=True)

    def server_pids(self) -> dict[str, int]:
        """Embedded servers' root pids, for CPU accounting (none for the machine's servers)."""
        pids: dict[str, int] = {}
        if self.postgres is not None:
            with contextlib.suppress(Exception):
                pid_file = self.postgres.pgdata / "postmaster.pid"
                pids["postgres"] = int(pid_file.read_text().split()[0])
        if self.redis_server is not None and self.redis_server.process is not None:
            pids["redis"] = self.redis_server.process.pid
        return pids

    def versions(self) -> dict[str, str]:
        """Server versions and the durability settings that weigh on every figure."""
        pg: dict[str, str] = {}
        with psycopg.connect(self.pg_url) as conn:
            for name in ("server_version", "fsync", "synchronous_commit", "max_connections"):
                row = conn.execute(f"SHOW {name}").fetchone()  # type: ignore[arg-type]
                pg[name] = str(row[0]) if row else "?"
        info: dict[str, Any] = self.redis.info("server")  # type: ignore[assignment]
        redis_conf: dict[str, str] = {}
        with contextlib.suppress(redis.RedisError):
            for name in ("appendonly", "appendfsync"):
                redis_conf.update(self.redis.config_get(name))  # type: ignore[arg-type]
        return {
            "postgres": pg.pop("server_version"),
            "postgres_settings": " ".join(f"{k}={v}" for k, v in pg.items()),
            "redis": str(info.get("redis_version", "?")),
            "redis_settings": " ".join(f"{k}={v}" for k, v in redis_conf.items()) or "?",
        }


# -- the processes of one run ---------------------------------------------------------------------


class System:
    """The processes of one run, started as the Procfile starts them; stopped in reverse."""

    def __init__(self, infra: Infra, db_url: str, namespace: str, label: str) -> None:
        self.infra = infra
        self.db_url = db_url
        self.namespace = namespace
        self.label = label
        self.web_port = free_port()
        self.sandbox_port = free_port()
        self.processes: dict[str, subprocess.Popen[bytes]] = {}
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
                "dramatiq_worker_timeout": WORKER_POLL_MS,
            }
        )
        self.broker = build_broker(infra.redis_url, namespace)
        self.redis = infra.redis

    @property
    def web_url(self) -> str:
        return f"http://127.0.0.1:{self.web_port}"

    @property
    def sandbox_url(self) -> str:
        return f"http://127.0.0.1:{self.sandbox_port}"

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

    def spawn(self, name: str, argv: list[str]) -> subprocess.Popen[bytes]:
        with open(self.log_dir / f"{self.label}-{name}.log", "ab") as log_file:
            process = subprocess.Popen(  # noqa: S603 - our own argv
                argv, env=self.env, cwd=ROOT, stdout=log_file, stderr=subprocess.STDOUT
            )
        self.processes[name] = process
        return process

    def start_sandbox(self, latency_ms: float = 0, callback_delay_ms: float = 0) -> None:
        self.spawn(
            "sandbox",
            [
                PYTHON,
                "-m",
                "worker.cli",
                "sandbox",
                "--port",
                str(self.sandbox_port),
                "--api-key",
                self.env["KODMOBI_API_KEY"],
                "--latency-ms",
                str(latency_ms),
                "--callback-delay-ms",
                str(callback_delay_ms),
            ],
        )
        wait_for_port(self.sandbox_port)

    def start_web(self, app: str = "worker.web.app:create_app", app_dir: str | None = None) -> None:
        argv = [PYTHON, "-m", "uvicorn", "--factory", app]
        if app_dir:
            argv += ["--app-dir", app_dir]
        argv += ["--host", "127.0.0.1", "--port", str(self.web_port), "--no-access-log"]
        self.spawn("web", argv)
        ready = "/readyz" if app_dir is None else "/healthz"
        self._wait_http(self.web_url + ready, "web")

    def start_clock(self) -> None:
        self.spawn("clock", [PYTHON, "-m", "worker.cli", "sweep", "--forever"])

    def start_workers(self, module: str = "worker.actors", path: str | None = None) -> None:
        """The worker process, and wait until each of its children polls the queue."""
        before = set(self.redis.zrange(f"{self.namespace}:__heartbeats__", 0, -1))
        argv = [PYTHON, "-m", "dramatiq", module]
        if path:
            argv += ["--path", path]
        argv += ["--processes", str(PROCESSES), "--threads", str(THREADS), "--skip-logging"]
        self.spawn("worker", argv)
        deadline = time.monotonic() + 60
        while True:
            now = set(self.redis.zrange(f"{self.namespace}:__heartbeats__", 0, -1))
            if len(now - before) >= PROCESSES:
                return
            self.check_alive()
            if time.monotonic() > deadline:
                raise TimeoutError("worker processes did not start polling within 60 s")
            time.sleep(0.02)

    def _wait_http(self, url: str, name: str, timeout_s: float = 60) -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            self.check_alive()
            with contextlib.suppress(httpx.HTTPError):
                if httpx.get(url, timeout=2).status_code == 200:
                    return
            time.sleep(0.1)
        raise TimeoutError(f"{name} not ready at {url}")

    def check_alive(self) -> None:
        for name, process in self.processes.items():
            if process.poll() is not None:
                raise RuntimeError(
                    f"{name} exited with {process.returncode}; see "
                    f"{self.log_dir / f'{self.label}-{name}.log'}"
                )

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
        stop_processes(list(self.processes.values()))
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


# -- measuring helpers ----------------------------------------------------------------------------


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


# -- producing ------------------------------------------------------------------------------------


def send_code_message(to: str) -> dramatiq.Message[Any]:
    return dramatiq.Message(
        queue_name=QUEUE,
        actor_name="send_code",
        args=(),
        kwargs={"to": to, "channels": ["sms"]},
        options={},
    )


def stage_messages(sys_: System, messages: list[dramatiq.Message[Any]]) -> str:
    """Write the messages as Dramatiq's enqueue does (HSET the body, RPUSH the id), but
    onto a staging list that `release()` renames into place: workers then find the whole
    backlog at once, after their start-up. Pipelined, so the producer is not what we time."""
    queue_key = f"{sys_.namespace}:{QUEUE}"
    staging = f"{sys_.namespace}:bench-staging"
    pipe = sys_.redis.pipeline(transaction=False)
    for i, message in enumerate(messages, 1):
        redis_id = str(uuid.uuid4())
        data = message.copy(options={"redis_message_id": redis_id}).encode()
        pipe.hset(f"{queue_key}.msgs", redis_id, data)
        pipe.rpush(staging, redis_id)
        if i % 1000 == 0:
            pipe.execute()
    pipe.execute()
    return staging


def release(sys_: System, staging: str) -> float:
    """Make the staged backlog visible to the workers; the figure's clock starts here."""
    t0 = time.monotonic()
    sys_.redis.rename(staging, f"{sys_.namespace}:{QUEUE}")
    return t0


def phone(prefix: int, i: int) -> str:
    """+7999Pxxxxxx: unique, valid, never a sandbox magic number (those start +79990)."""
    return f"+7999{prefix}{i:06d}"


# -- figure: limit ------------------------------------------------------------------------------


def run_limit(infra: Infra, n: int, label: str) -> dict[str, Any]:
    with system(infra, label) as sys_:
        messages = [
            dramatiq.Message(queue_name=QUEUE, actor_name="noop", args=(), kwargs={}, options={})
            for _ in range(n)
        ]
        staging = stage_messages(sys_, messages)
        sys_.start_workers("noop_actor", path="benchmarks")
        msgs_key = f"{sys_.namespace}:{QUEUE}.msgs"
        meter = CpuMeter(sys_.roles())
        meter.start()
        t0 = release(sys_, staging)
        # Every ack HDELs the body: the hash is empty once every message is done.
        last, last_change = n, time.monotonic()
        while True:
            left = sys_.redis.hlen(msgs_key)
            now = time.monotonic()
            if left == 0:
                break
            if left != last:
                last, last_change = left, now
            elif now - last_change > STALL_S:
                raise RuntimeError(f"limit: {left} messages not done after {STALL_S:g}s stall")
            time.sleep(0.005)
        elapsed = now - t0
        cpu = meter.stop()
    return {"msgs_per_s": n / elapsed, "elapsed_s": elapsed, "messages": n, "cpu_cores": cpu}


# -- figures: e2e and latency-bound ---------------------------------------------------------------


def _status_counts(conn: psycopg.Connection[Any]) -> dict[str, int]:
    rows = conn.execute("SELECT status, count(*) FROM messages GROUP BY status").fetchall()
    return {str(status): int(count) for status, count in rows}


def run_throughput(
    infra: Infra, n: int, latency_ms: float, label: str, profile: Path | None = None
) -> dict[str, Any]:
    with system(infra, label) as sys_:
        sys_.start_sandbox(latency_ms=latency_ms, callback_delay_ms=0)
        sys_.start_web()
        sys_.start_clock()
        staging = stage_messages(sys_, [send_code_message(phone(1, i)) for i in range(n)])
        sys_.start_workers()
        profiler = None
        if profile is not None:
            profiler = Profiler(sys_.processes["worker"].pid, profile, subprocesses=True)
        http = sys_.sandbox_client()
        sent_at: float | None = None
        with psycopg.connect(sys_.db_url, autocommit=True) as conn, RssSampler(sys_) as rss:
            meter = CpuMeter(sys_.roles())
            meter.start()
            t0 = release(sys_, staging)
            last, last_change = -1, t0
            while True:
                time.sleep(0.1)
                now = time.monotonic()
                row = conn.execute(
                    "SELECT count(*) FROM messages WHERE status = 'delivered'"
                ).fetchone()
                delivered = int(row[0]) if row else 0
                if sent_at is None:
                    stats = http.get("/sandbox/stats").json()
                    if stats["sends"]["accepted"] >= n:
                        sent_at = now
                if delivered >= n:
                    break
                if delivered != last:
                    last, last_change = delivered, now
                elif now - last_change > STALL_S:
                    log(f"{label}: no progress for {STALL_S:g}s at {delivered}/{n} delivered")
                    break
                sys_.check_alive()
            elapsed = now - t0
            cpu = meter.stop()
            if profiler is not None:
                profiler.stop()
            counts = _status_counts(conn)
        stats = http.get("/sandbox/stats").json()
        http.close()
        peaks = sorted(rss.peaks.values(), reverse=True)
    delivered = counts.get("delivered", 0)
    return {
        "msgs_per_s": delivered / elapsed,
        "elapsed_s": elapsed,
        "messages": n,
        "not_delivered": n - delivered,
        "statuses": counts,
        "sends_per_s": n / (sent_at - t0) if sent_at else None,
        "sandbox": stats,
        "worker_rss_mb": [round(p / MB, 1) for p in peaks],
        "web_rss_mb": round(rss.web_peak / MB, 1),
        "cpu_cores": cpu,
    }


# -- figure: latency ----------------------------------------------------------------------------


def _epoch(iso: str) -> float:
    return datetime.fromisoformat(iso.replace("Z", "+00:00")).timestamp()


def run_latency(infra: Infra, duration_s: float, label: str) -> dict[str, Any]:
    with system(infra, label) as sys_:
        sys_.start_sandbox(latency_ms=0, callback_delay_ms=0)
        sys_.start_web()
        sys_.start_clock()
        sys_.start_workers()
        http = httpx.Client(
            base_url=sys_.web_url,
            headers={"Authorization": f"Bearer {sys_.api_token}"},
            timeout=10,
            limits=httpx.Limits(max_connections=16, max_keepalive_connections=16),
        )
        sandbox = sys_.sandbox_client()
        sent: dict[str, tuple[str, float]] = {}
        http_durations: list[float] = []
        errors: list[str] = []
        lock = threading.Lock()

        def send(path: str, to: str) -> None:
            try:
                if path == "http":
                    t0 = time.time()
                    response = http.post("/v1/messages", json={"to": to, "channels": ["sms"]})
                    took = time.time() - t0
                    if response.status_code != 202:
                        raise RuntimeError(f"POST /v1/messages: {response.status_code}")
                    with lock:
                        http_durations.append(took)
                else:
                    t0 = time.time()
                    sys_.broker.enqueue(send_code_message(to))
                with lock:
                    sent[to] = (path, t0)
            except Exception as exc:  # noqa: BLE001 - counted and reported
                with lock:
                    errors.append(f"{path} {to}: {exc}")

        def wait_received(count: int, timeout_s: float = 60) -> None:
            deadline = time.monotonic() + timeout_s
            while time.monotonic() < deadline:
                if sandbox.get("/sandbox/stats").json()["sends"]["accepted"] >= count:
                    return
                time.sleep(0.1)
            log(f"{label}: the sandbox did not receive {count} sends in {timeout_s:g}s")

        with ThreadPoolExecutor(max_workers=8) as pool:
            # Warm up: connections, pools and code paths of both processes, then go idle.
            warm = 40
            for i in range(warm):
                pool.submit(send, "http" if i % 2 == 0 else "raw", phone(2, i))
                time.sleep(0.01)
            wait_received(warm)
            time.sleep(1.0)
            count = int(duration_s * LATENCY_RATE)
            meter = CpuMeter(sys_.roles())
            meter.start()
            start = time.monotonic() + 0.05
            for i in range(count):
                due = start + i / LATENCY_RATE
                pause = due - time.monotonic()
                if pause > 0:
                    time.sleep(pause)
                pool.submit(send, "http" if i % 2 == 0 else "raw", phone(3, i))
        wait_received(warm + count)
        cpu = meter.stop()
        records = sandbox.get("/sandbox/messages").json()["messages"]
        received = {r["to"]: _epoch(r["received_at"]) for r in records}
        precision = {len(r["received_at"]) for r in records}
        # Where the time goes, from the database's own clocks (microseconds).
        with psycopg.connect(sys_.db_url) as conn:
            rows = conn.execute(
                "SELECT m.recipient, extract(epoch FROM m.created_at), "
                "extract(epoch FROM a.sent_at) FROM messages m "
                "JOIN attempts a ON a.message_id = m.id AND a.seq = 1"
            ).fetchall()
        db_times = {
            str(r[0]): (float(r[1]), float(r[2]) if r[2] is not None else None) for r in rows
        }
        http.close()
        sandbox.close()
    result: dict[str, Any] = {
        "codes": count,
        "rate_per_s": LATENCY_RATE,
        "errors": errors[:5],
        "error_count": len(errors),
        "received_at_format": sorted(precision),
        "cpu_cores": cpu,
    }
    for path in ("http", "raw"):
        latencies, to_intake, to_send, to_sandbox = [], [], [], []
        for to, (p, t0) in sent.items():
            if p != path or not to.startswith("+79993"):
                continue
            if to not in received:
                continue
            latencies.append((received[to] - t0) * 1000)
            created, attempt_sent = db_times.get(to, (None, None))
            if created is not None and attempt_sent is not None:
                to_intake.append((created - t0) * 1000)
                to_send.append((attempt_sent - created) * 1000)
                to_sandbox.append((received[to] - attempt_sent) * 1000)
        expected = sum(1 for to, (p, _) in sent.items() if p == path and to.startswith("+79993"))
        result[path] = {
            "n": len(latencies),
            "missing": max(0, expected - len(latencies)),
            "p50_ms": percentile(latencies, 50),
            "p95_ms": percentile(latencies, 95),
            "p99_ms": percentile(latencies, 99),
            "max_ms": max(latencies) if latencies else float("nan"),
            # medians of the three legs: producer -> intake row, intake -> attempt marked
            # sending, attempt marked sending -> sandbox received the call
            "legs_p50_ms": [
                round(percentile(to_intake, 50), 2),
                round(percentile(to_send, 50), 2),
                round(percentile(to_sandbox, 50), 2),
            ],
        }
    if http_durations:
        result["http"]["post_p50_ms"] = percentile([d * 1000 for d in http_durations], 50)
    return result


# -- figure: callbacks ---------------------------------------------------------------------------


@dataclass
class LoadResult:
    requests: int
    elapsed_s: float
    statuses: dict[int, int]
    per_s: float


@dataclass
class _Load:
    items: Iterator[tuple[bytes, bytes]]
    statuses: Counter[int] = field(default_factory=Counter)


async def _connection(host: str, port: int, load: _Load) -> None:
    reader, writer = await asyncio.open_connection(host, port)
    try:
        for path, body in load.items:
            writer.write(
                b"POST " + path + b" HTTP/1.1\r\nHost: " + host.encode() + b"\r\n"
                b"Content-Type: application/json\r\nUser-Agent: kodmobi-bench\r\n"
                b"Content-Length: " + str(len(body)).encode() + b"\r\n\r\n" + body
            )
            head = await reader.readuntil(b"\r\n\r\n")
            status = int(head[9:12])
            length = 0
            close = False
            for line in head.split(b"\r\n")[1:]:
                name, _, value = line.partition(b":")
                name = name.strip().lower()
                if name == b"content-length":
                    length = int(value)
                elif name == b"connection" and value.strip().lower() == b"close":
                    close = True
            if length:
                await reader.readexactly(length)
            load.statuses[status] += 1
            if close:
                writer.close()
                reader, writer = await asyncio.open_connection(host, port)
    finally:
        writer.close()


def fire(url: str, requests: list[tuple[bytes, bytes]], concurrency: int) -> LoadResult:
    """A small keep-alive HTTP/1.1 load generator: `concurrency` connections, each sending
    the next request once its previous answer is read (uvloop when available)."""
    parts = urlsplit(url)
    host, port = parts.hostname or "127.0.0.1", parts.port or 80
    load = _Load(iter(requests))

    async def main() -> float:
        t0 = time.monotonic()
        await asyncio.gather(*(_connection(host, port, load) for _ in range(concurrency)))
        return time.monotonic() - t0

    try:
        import uvloop

        elapsed = uvloop.run(main())
    except ImportError:
        elapsed = asyncio.run(main())
    done = sum(load.statuses.values())
    return LoadResult(done, elapsed, dict(load.statuses), done / elapsed)


def _callback_body(kodmobi_id: int) -> bytes:
    return json.dumps({"message_id": kodmobi_id, "status": "delivered"}).encode()


def _insert_accepted(db_url: str, count: int) -> list[tuple[str, int]]:
    """`count` messages, each with one attempt in `accepted`, as a real send leaves them."""
    now = datetime.now().astimezone()
    far = now.replace(year=now.year + 1)
    messages, attempts, out = [], [], []
    for i in range(count):
        message_id, attempt_id = str(ULID()), str(ULID())
        kodmobi_id = 1_000_000 + i
        messages.append(
            (message_id, message_id, "bench", "dramatiq", phone(4, i), "phone", ["sms"],
             b"\0" * 28, "sent", now, now, far)
        )  # fmt: skip
        attempts.append(
            (attempt_id, message_id, 1, "sms", "accepted", kodmobi_id, 1, now, now, now, far,
             now, now, 200)
        )  # fmt: skip
        out.append((attempt_id, kodmobi_id))
    with psycopg.connect(db_url) as conn, conn.cursor() as cur:
        cur.executemany(
            "INSERT INTO messages (id, idempotency_key, fingerprint, source, recipient, "
            "recipient_kind, channels, code_ciphertext, status, created_at, updated_at, "
            "expires_at) VALUES (%s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s)",
            messages,
        )
        cur.executemany(
            "INSERT INTO attempts (id, message_id, seq, channel, status, kodmobi_message_id, "
            "tries, next_try_at, sent_at, accepted_at, deadline, created_at, updated_at, "
            "http_status) VALUES (%s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s)",
            attempts,
        )
    return out


def run_callbacks(
    infra: Infra, n: int, concurrency: int, label: str, profile: Path | None = None
) -> dict[str, Any]:
    warm = 200
    secret = infra.secrets["CALLBACK_SECRET"]

    def requests_for(pairs: list[tuple[str, int]]) -> list[tuple[bytes, bytes]]:
        return [
            (
                f"/callbacks/kodmobi/{aid}/{callback_token(secret, aid)}".encode(),
                _callback_body(kid),
            )
            for aid, kid in pairs
        ]

    # The bare endpoint, on the same stack and with the same load: the stack's ceiling.
    with system(infra, label + "-bare") as sys_:
        sys_.start_web("bare_app:create_app", app_dir="benchmarks")
        # At least 5,000: the bare endpoint is fast and a short run measures start-up noise.
        fake = [(str(ULID()), 1_000_000 + i) for i in range(max(n, 5000) + warm)]
        reqs = requests_for(fake)
        fire(sys_.web_url, reqs[:warm], concurrency)
        meter = CpuMeter({"web": sys_.processes["web"].pid})
        meter.start()
        bare = fire(sys_.web_url, reqs[warm:], concurrency)
        bare_cpu = meter.stop()

    with system(infra, label) as sys_:
        pairs = _insert_accepted(sys_.db_url, n + warm)
        sys_.start_web()
        reqs = requests_for(pairs)
        fire(sys_.web_url, reqs[:warm], concurrency)
        profiler = None
        if profile is not None:
            profiler = Profiler(sys_.processes["web"].pid, profile, subprocesses=False)
        meter = CpuMeter(sys_.roles())
        meter.start()
        real = fire(sys_.web_url, reqs[warm:], concurrency)
        cpu = meter.stop()
        if profiler is not None:
            profiler.stop()
        with psycopg.connect(sys_.db_url) as conn:
            row = conn.execute(
                "SELECT count(*) FILTER (WHERE applied), count(*) FROM callback_events"
            ).fetchone()
            delivered = conn.execute(
                "SELECT count(*) FROM messages WHERE status = 'delivered'"
            ).fetchone()
    applied = int(row[0]) - warm if row else 0
    return {
        "applied_per_s": applied / real.elapsed_s,
        "applied": applied,
        "events": int(row[1]) - warm if row else 0,
        "messages_delivered": int(delivered[0]) - warm if delivered else 0,
        "statuses": real.statuses,
        "elapsed_s": real.elapsed_s,
        "bare_per_s": bare.per_s,
        "bare_statuses": bare.statuses,
        "ratio": (applied / real.elapsed_s) / bare.per_s,
        "concurrency": concurrency,
        "cpu_cores": cpu,
        "bare_cpu_cores": bare_cpu,
    }


# -- the report -----------------------------------------------------------------------------------


@dataclass
class Row:
    figure: str
    unit: str
    values: list[float]
    target: str = ""
    check: Callable[[float], bool] | None = None
    digits: int = 0
    #: "median", or "worst" for counts where any run's loss is a miss
    agg: str = "median"

    def fmt(self, value: float) -> str:
        if value != value:
            return "n/a"
        return f"{value:,.{self.digits}f}"

    def cells(self) -> list[str]:
        med = max(self.values) if self.agg == "worst" else median(self.values)
        verdict = ""
        if self.check is not None and med == med:
            verdict = "met" if self.check(med) else "MISSED"
        runs = ", ".join(self.fmt(v) for v in self.values)
        shown = self.fmt(med) + (" (worst)" if self.agg == "worst" else "")
        return [f"{self.figure} ({self.unit})", shown, runs, self.target, verdict]


def print_table(rows: list[Row]) -> None:
    header = ["figure", "median", "runs", "target", ""]
    table = [header, *[r.cells() for r in rows]]
    widths = [max(len(line[i]) for line in table) for i in range(len(header))]
    for j, line in enumerate(table):
        print("  ".join(cell.ljust(widths[i]) for i, cell in enumerate(line)).rstrip())
        if j == 0:
            print("  ".join("-" * w for w in widths))


def build_rows(results: dict[str, list[dict[str, Any]]]) -> list[Row]:
    rows: list[Row] = []
    limit = [r["msgs_per_s"] for r in results.get("limit", [])]
    if limit:
        rows.append(Row("limit: no-op actor", "msg/s", limit, "(ceiling)"))
    e2e = results.get("e2e", [])
    if e2e:
        values = [r["msgs_per_s"] for r in e2e]
        rows.append(Row("end-to-end throughput", "msg/s", values))
        if limit:
            ratios = [100 * v / median(limit) for v in values]
            rows.append(Row("  e2e / limit", "%", ratios, ">= 25%", lambda v: v >= 25, digits=1))
        rows.append(
            Row("  e2e not delivered", "msgs", [r["not_delivered"] for r in e2e], "0",
                lambda v: v == 0, agg="worst")
        )  # fmt: skip
    slow = results.get("latency-bound", [])
    if slow:
        rows.append(
            Row(f"latency-bound throughput, kod.mobi {SLOW_KODMOBI_MS} ms", "msg/s",
                [r["msgs_per_s"] for r in slow], ">= 300", lambda v: v >= 300)
        )  # fmt: skip
        rows.append(
            Row("  latency-bound not delivered", "msgs", [r["not_delivered"] for r in slow],
                "0", lambda v: v == 0, agg="worst")
        )  # fmt: skip
    lat = results.get("latency", [])
    for path, name in (("http", "POST /v1/messages"), ("raw", "raw Dramatiq enqueue")):
        if not lat:
            break
        for q, target, check in (
            ("p50", "< 20", lambda v: v < 20),
            ("p95", "", None),
            ("p99", "< 100", lambda v: v < 100),
        ):
            rows.append(
                Row(f"latency {name} -> manual/send {q}", "ms",
                    [r[path][f"{q}_ms"] for r in lat], target, check, digits=1)
            )  # fmt: skip
    cb = results.get("callbacks", [])
    if cb:
        rows.append(Row("callbacks applied", "/s", [r["applied_per_s"] for r in cb]))
        rows.append(Row("  bare endpoint, same stack", "req/s", [r["bare_per_s"] for r in cb]))
        rows.append(
            Row("  callbacks / bare", "%", [100 * r["ratio"] for r in cb], ">= 30%",
                lambda v: v >= 30, digits=1)
        )  # fmt: skip
    for key, name in (("e2e", "e2e"), ("latency-bound", "latency-bound")):
        runs = results.get(key, [])
        if runs and "memory" in results:
            rows.append(
                Row(f"memory: peak RSS per worker process, {name}", "MB",
                    [max(r["worker_rss_mb"] or [float("nan")]) for r in runs], "< 200",
                    lambda v: v < 200, digits=1)
            )  # fmt: skip
    return rows


def print_details(results: dict[str, list[dict[str, Any]]]) -> None:
    """What the table does not show but the next person tuning this will want."""
    print()
    print("details (per run):")
    for figure, runs in results.items():
        if figure == "memory":
            continue
        for i, r in enumerate(runs, 1):
            cpu = " ".join(f"{k}={v:.2f}" for k, v in r.get("cpu_cores", {}).items())
            line = f"  {figure} #{i}:"
            if figure in ("e2e", "latency-bound"):
                sends = r["sends_per_s"]
                line += (
                    f" {r['messages']} in {r['elapsed_s']:.1f}s; kod.mobi calls {sends:.0f}/s"
                    if sends
                    else f" {r['messages']} in {r['elapsed_s']:.1f}s"
                )
                line += f"; statuses {r['statuses']}; worker RSS MB {r['worker_rss_mb']}"
                line += f"; web RSS {r['web_rss_mb']} MB"
                cbs = r["sandbox"]["callbacks"]
                line += f"; sandbox callbacks sent={cbs['sent']} failed={cbs['failed']}"
            elif figure == "limit":
                line += f" {r['messages']} in {r['elapsed_s']:.2f}s"
            elif figure == "latency":
                for path in ("http", "raw"):
                    p = r[path]
                    line += (
                        f" {path}: n={p['n']} missing={p['missing']} max={p['max_ms']:.1f}ms "
                        f"legs p50 (to intake, intake->sending, sending->sandbox)="
                        f"{p['legs_p50_ms']} ms;"
                    )
                if "post_p50_ms" in r["http"]:
                    line += f" POST answered p50 {r['http']['post_p50_ms']:.1f}ms;"
                line += f" errors={r['error_count']}"
            elif figure == "callbacks":
                line += (
                    f" {r['applied']} applied of {r['events']} events in {r['elapsed_s']:.2f}s"
                    f" (HTTP {r['statuses']}), {r['concurrency']} connections; bare "
                    f"{r['bare_per_s']:.0f} req/s (HTTP {r['bare_statuses']}), bare cores "
                    + " ".join(f"{k}={v:.2f}" for k, v in r["bare_cpu_cores"].items())
                )
            print(line)
            if cpu:
                print(f"      cores used: {cpu}")


# -- main -----------------------------------------------------------------------------------------


def machine() -> dict[str, Any]:
    model = ""
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    return {
        "cpus": os.cpu_count(),
        "cpu_model": model,
        "memory_gb": round(psutil.virtual_memory().total / 1024**3, 1),
        "python": platform.python_version(),
        "platform": platform.platform(),
        "dramatiq": dramatiq.__version__,
        "loadavg_at_start": [round(x, 2) for x in os.getloadavg()],
    }


def _count_lines(directory: Path, pattern: str, needle: str) -> int:
    count = 0
    for path in directory.glob(pattern):
        with contextlib.suppress(OSError), open(path, errors="replace") as fh:
            count += sum(1 for line in fh if needle in line)
    return count


def code_revision() -> str:
    """The commit under test, and whether worker/ has uncommitted changes on top of it."""
    try:
        head = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "status", "--porcelain", "--", "worker", "benchmarks"],
            cwd=ROOT,
            capture_output=True,
            text=True,
        ).stdout.strip()
    except OSError:
        return "?"
    return head + (" (+ uncommitted changes in worker/ or benchmarks/)" if dirty else "")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=3, help="runs per figure (median over runs)")
    parser.add_argument("--messages", type=int, default=None, help="codes per throughput run")
    parser.add_argument("--limit-messages", type=int, default=None, help="no-op messages")
    parser.add_argument("--callbacks", type=int, default=None, help="callbacks per run")
    parser.add_argument("--concurrency", type=int, default=64, help="callback connections")
    parser.add_argument("--latency-seconds", type=float, default=None)
    parser.add_argument("--quick", action="store_true", help="smaller numbers: a smoke run")
    parser.add_argument(
        "--only", action="append", choices=FIGURES, help="run only this figure (repeatable)"
    )
    parser.add_argument("--json", type=Path, help="also write the results here")
    parser.add_argument(
        "--quiet-wait",
        type=float,
        default=120.0,
        metavar="SECONDS",
        help="before each run, wait up to this long for other processes to go idle (0: don't)",
    )
    parser.add_argument(
        "--profile",
        type=Path,
        metavar="DIR",
        help="after the runs, one extra e2e run with py-spy on the workers and one callbacks "
        "run with py-spy on web (not counted in the table); folded stacks go to DIR",
    )
    args = parser.parse_args(argv)
    quick = args.quick
    n_e2e = args.messages or (1000 if quick else 5000)
    n_limit = args.limit_messages or (4000 if quick else 20000)
    n_callbacks = args.callbacks or (1000 if quick else 3000)
    latency_s = args.latency_seconds or (5.0 if quick else 15.0)
    wanted = set(args.only or FIGURES)
    if "memory" in wanted:
        # Memory is sampled during these runs.
        wanted |= {"e2e", "latency-bound"}
    if "e2e" in wanted and args.only and "limit" not in wanted:
        log("note: the e2e/limit ratio needs the limit figure too (add --only limit)")

    workdir = Path(tempfile.mkdtemp(prefix="kodmobi-bench-"))
    infra = Infra(workdir)
    results: dict[str, list[dict[str, Any]]] = defaultdict(list)
    profiles: dict[str, Any] = {}
    started = time.time()
    info = machine()
    info["code"] = code_revision()
    try:
        infra.start()
        info.update(infra.versions())
        plan: list[tuple[str, Callable[[str], dict[str, Any]]]] = []
        if "limit" in wanted:
            plan.append(("limit", lambda label: run_limit(infra, n_limit, label)))
        if "e2e" in wanted:
            plan.append(("e2e", lambda label: run_throughput(infra, n_e2e, 0, label)))
        if "latency-bound" in wanted:
            plan.append(
                (
                    "latency-bound",
                    lambda label: run_throughput(infra, n_e2e, SLOW_KODMOBI_MS, label),
                )
            )
        if "latency" in wanted:
            plan.append(("latency", lambda label: run_latency(infra, latency_s, label)))
        if "callbacks" in wanted:
            plan.append(
                (
                    "callbacks",
                    lambda label: run_callbacks(infra, n_callbacks, args.concurrency, label),
                )
            )
        for figure, run in plan:
            for i in range(1, args.runs + 1):
                if args.quiet_wait > 0:
                    wait_for_quiet(args.quiet_wait)
                log(f"{figure} run {i}/{args.runs}")
                result = run(f"{figure}-{i}")
                results[figure].append(result)
                log(f"{figure} run {i}: {_headline(figure, result)}")
        if "memory" in wanted:
            results["memory"] = []
        if args.profile is not None:
            args.profile.mkdir(parents=True, exist_ok=True)
            log("profiling: e2e with py-spy on the worker processes")
            worker_out = args.profile / "worker-e2e.folded"
            run_throughput(infra, n_e2e, 0, "profile-e2e", profile=worker_out)
            profiles["worker-e2e"] = summarize_profile(worker_out)
            log("profiling: callbacks with py-spy on web")
            web_out = args.profile / "web-callbacks.folded"
            run_callbacks(infra, n_callbacks, args.concurrency, "profile-cb", profile=web_out)
            profiles["web-callbacks"] = summarize_profile(web_out)
    finally:
        infra.stop()

    if args.json:
        payload = {"machine": info, "results": results, "profiles": profiles}
        args.json.write_text(json.dumps(payload, indent=2, default=str))
    print()
    print(
        f"kodmobi-worker bench: {info['cpus']} CPUs ({info['cpu_model']}), "
        f"{info['memory_gb']} GB, Python {info['python']}, dramatiq {info['dramatiq']}, "
        f"Postgres {info.get('postgres', '?')}, Redis {info.get('redis', '?')} "
        f"({'embedded' if infra.embedded else 'DATABASE_URL/REDIS_URL'}); "
        f"load average at start {info['loadavg_at_start']}"
    )
    print(
        f"settings (from the Procfile): worker {PROCESSES} processes x {THREADS} threads, "
        f"dramatiq_worker_timeout={WORKER_POLL_MS} ms; web: 1 uvicorn process "
        "(--no-access-log); clock running during e2e/latency runs; RECIPIENT_LIMIT=0 "
        "CHANNEL_COOLDOWN_S=0; LOG_LEVEL=WARNING (logging cost is not what we measure); "
        "sandbox callbacks at once; "
        f"runs={args.runs}, codes per throughput run={n_e2e}, no-op messages={n_limit}, "
        f"callbacks per run={n_callbacks} over {args.concurrency} connections, latency "
        f"{LATENCY_RATE:g} codes/s for {latency_s:g}s (half HTTP, half raw enqueue)"
    )
    print(
        f"servers: Postgres {info.get('postgres_settings', '?')}; Redis "
        f"{info.get('redis_settings', '?')}"
        + (" (embedded, as `kodmobi dev` runs them)" if infra.embedded else "")
    )
    code_end = code_revision()
    print(f"code: {info['code']}" + ("" if code_end == info["code"] else f" -> {code_end}"))
    if code_end != info["code"]:
        print(
            "WARNING: worker/ changed while the bench ran: runs may have measured different code."
        )
    print(
        "method: backlogs are staged in Redis and released (RENAME) once both worker processes "
        "poll, so worker start-up is not timed; limit ends when every message is acked "
        "(the queue's .msgs hash is empty), e2e when Postgres counts N messages delivered."
    )
    print()
    print_table(build_rows(results))
    if "latency-bound" in results:
        ceiling = PROCESSES * THREADS / (SLOW_KODMOBI_MS / 1000)
        print(
            f"\nnote: with one kod.mobi call per worker thread, {PROCESSES}x{THREADS} threads and "
            f"{SLOW_KODMOBI_MS} ms answers cap the latency-bound figure at {ceiling:.0f} msg/s."
        )
    if "latency" in results:
        formats = {tuple(r["received_at_format"]) for r in results["latency"]}
        print(
            "note: latency = sandbox `received_at` (wall clock, ISO 8601 with millisecond "
            "precision, truncated) minus the producer's time.time() before the call; "
            f"received_at lengths seen: {sorted(formats)}"
        )
    noise = {
        figure: [r["cpu_cores"].get("other", 0.0) for r in runs]
        for figure, runs in results.items()
        if runs and "cpu_cores" in runs[0]
    }
    if noise:
        worst = max(max(v) for v in noise.values())
        print(
            "\nother processes on this machine used (cores, per run): "
            + "; ".join(f"{k} {', '.join(f'{x:.2f}' for x in v)}" for k, v in noise.items())
            + (
                f"\nWARNING: up to {worst:.2f} of {info['cpus']} cores went to other processes "
                "during the runs: the figures above are lower than on an idle machine."
                if worst > 0.3
                else ""
            )
        )
    access_lines = _count_lines(workdir / "logs", "*-web.log", '"uvicorn.access"')
    if access_lines:
        print(
            f"note: the web processes wrote {access_lines:,} uvicorn access-log lines despite "
            "--no-access-log and LOG_LEVEL=WARNING: that logging is part of the web figures."
        )
    print_details(results)
    if profiles:
        print_profiles(profiles, args.profile)
    print(f"\nlogs of every process: {workdir / 'logs'}; took {time.time() - started:.0f}s")
    return 0


def _headline(figure: str, r: dict[str, Any]) -> str:
    if figure == "limit":
        return f"{r['msgs_per_s']:.0f} msg/s"
    if figure in ("e2e", "latency-bound"):
        return (
            f"{r['msgs_per_s']:.1f} msg/s, {r['not_delivered']} not delivered, "
            f"worker RSS {r['worker_rss_mb']} MB"
        )
    if figure == "latency":
        return " | ".join(
            f"{p} p50 {r[p]['p50_ms']:.1f} p95 {r[p]['p95_ms']:.1f} p99 {r[p]['p99_ms']:.1f} ms"
            for p in ("http", "raw")
        )
    if figure == "callbacks":
        return (
            f"{r['applied_per_s']:.0f} applied/s vs bare {r['bare_per_s']:.0f} req/s "
            f"({100 * r['ratio']:.1f}%)"
        )
    return ""


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


if __name__ == "__main__":
    sys.exit(main())
