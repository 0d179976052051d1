"""The chaos run: the Procfile's processes against real Postgres, Redis and a misbehaving
sandbox, while workers are SIGKILLed and the servers restarted; then the figures.

`scripts/chaos.py` (`make chaos`) runs the full version and
tests/integration/test_chaos_small.py a smaller one in `make test`. Every process is a
real OS process (its own session, so a kill takes its whole group), and Postgres and
Redis are always our own embedded servers in `workdir`: never the machine's, even when
DATABASE_URL / REDIS_URL are set.

The drain bound. After the last fault a message may still need, in the worst case:
Dramatiq's dead-worker heartbeat (20 s) before a killed worker's unacknowledged messages
go back on the queue, the sweeper's re-dispatch delay for an attempt whose hand-off was
lost (20 s), and then its whole chain: per channel up to 4 transient tries (each a read
timeout plus backoff of at most 2 s) and the delivery timeout, about 3 × 17 s for three
channels with the defaults below. That is about 90 s; the default bound is 120 s,
counted from the last fault or the last send, whichever came later.
"""

from __future__ import annotations

import contextlib
import json
import os
import random
import secrets
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections import Counter, defaultdict
from collections.abc import Callable, Iterable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import IO, Any
from urllib.parse import urlsplit

import dramatiq
import httpx
import psycopg
import redis
from psycopg.rows import dict_row

from worker.embedded import EmbeddedPostgres, EmbeddedRedis, free_port, wait_for_port

ROOT = Path(__file__).resolve().parents[2]
FINAL = frozenset({"delivered", "failed", "expired", "rejected"})
OPEN_ATTEMPT = frozenset({"queued", "sending", "accepted"})
PHONE_CHANNELS = ("telegram", "whatsapp", "sms")
#: Dramatiq's consumer poll when its queue is empty, ms (as in the Procfile).
WORKER_POLL_MS = "20"
#: What the workers call the Redis counter of kod.mobi call slots (worker.limits).
SLOTS_KEY = "dramatiq:kodmobi-calls"

Echo = Callable[[str], None]


@dataclass
class ChaosParams:
    """One chaos run. The defaults are the full run of `make chaos`."""

    messages: int = 1000
    #: share of the messages sent through `POST /v1/messages`; the rest are raw Dramatiq
    http_share: float = 0.5
    #: share of email recipients (their chain is `email` alone)
    email_share: float = 0.1
    #: malformed raw Dramatiq messages among the rest: they must end `rejected`
    invalid_messages: int = 5
    worker_processes: int = 2
    worker_threads: int = 8
    worker_kills: int = 2
    redis_restarts: int = 1
    postgres_restarts: int = 1
    #: a killed worker stays down this long before it is started again
    kill_downtime_s: float = 1.0
    #: a restarted Redis / Postgres stays down this long (0: stop and start at once)
    redis_downtime_s: float = 0.0
    postgres_downtime_s: float = 0.0
    # The sandbox's misbehaviour.
    error_5xx_rate: float = 0.10
    throttle_429_rate: float = 0.05
    slow_rate: float = 0.05
    slow_ms: int = 3000
    failure_callback_rate: float = 0.20
    lost_callback_rate: float = 0.05
    duplicate_callback_rate: float = 0.10
    out_of_order_rate: float = 0.05
    callback_delay_ms: int = 50
    seed: int = 1
    # The system's settings.
    delivery_timeout_s: float = 4.0
    code_ttl_s: float = 300.0
    #: below slow_ms, so that a slow answer times out at our client
    read_timeout_s: float = 2.0
    sweep_interval_s: float = 1.0
    # The producers.
    #: messages per second
    send_rate: float = 20.0
    producer_threads: int = 32
    #: a producer retrying through a fault gives up on one message after this long
    producer_give_up_s: float = 120.0
    #: every message must be final this long after the last fault (or the last send)
    drain_bound_s: float = 120.0
    #: an explicit schedule instead of the even spread, e.g. "postgres_restart@15,redis_restart@+1"
    #: (worker_kill, redis_restart, postgres_restart; @s after the first send, @+s after the
    #: end of the fault before)
    fault_plan: str = ""


@dataclass
class FaultEvent:
    kind: str  # worker_kill | redis_restart | postgres_restart
    target: str
    started_s: float
    ended_s: float
    #: wall clock at the end, to compare with database timestamps
    ended_at: datetime


@dataclass
class Duplicate:
    """An attempt that kod.mobi (the sandbox) accepted more than once."""

    attempt_id: str
    message_id: str | None
    sends: list[dict[str, Any]]
    reason: str
    explained: bool


@dataclass
class ChaosReport:
    params: ChaosParams
    workdir: Path
    sent_http: int = 0
    sent_dramatiq: int = 0
    accepted_http: int = 0
    accepted_dramatiq: int = 0
    #: producer sends that never got an acceptance (refused or gave up), with why
    not_accepted: list[str] = field(default_factory=list)
    http_retries: int = 0
    enqueue_retries: int = 0
    final: int = 0
    #: accepted but missing or not final at the bound
    lost: list[str] = field(default_factory=list)
    expected_rejected: int = 0
    status_counts: dict[str, int] = field(default_factory=dict)
    attempt_status_counts: dict[str, int] = field(default_factory=dict)
    attempts: int = 0
    messages_in_database: int = 0
    sandbox_sends: int = 0
    sandbox_stats: dict[str, Any] = field(default_factory=dict)
    sandbox_outcomes: dict[str, int] = field(default_factory=dict)
    unknown_sandbox_sends: int = 0
    duplicates: list[Duplicate] = field(default_factory=list)
    order_violations: list[str] = field(default_factory=list)
    consistency_violations: list[str] = field(default_factory=list)
    late_deliveries: int = 0
    faults: list[FaultEvent] = field(default_factory=list)
    restarts: dict[str, int] = field(default_factory=dict)
    #: processes that exited without being killed by us (then restarted), with when
    crashes: list[str] = field(default_factory=list)
    sending_s: float = 0.0
    last_fault_s: float = 0.0
    drained: bool = False
    drain_after_last_fault_s: float | None = None
    drain_after_last_send_s: float | None = None
    run_s: float = 0.0
    slots_leaked: int | None = None
    broker: BrokerLeftovers | None = None
    #: Dramatiq consumer threads that died inside a live worker process (from its log)
    dead_consumer_threads: list[str] = field(default_factory=list)
    #: most callbacks the sandbox had waiting or in flight at once (sampled each second)
    peak_callbacks_pending: int = 0

    @property
    def sent(self) -> int:
        return self.sent_http + self.sent_dramatiq

    @property
    def accepted(self) -> int:
        return self.accepted_http + self.accepted_dramatiq

    @property
    def unexplained_duplicates(self) -> list[Duplicate]:
        return [d for d in self.duplicates if not d.explained]

    @property
    def ok(self) -> bool:
        """Nothing lost, everything final in time, order and consistency hold."""
        return (
            not self.lost
            and self.drained
            and self.final == self.accepted
            and not self.not_accepted
            and not self.order_violations
            and not self.consistency_violations
            and not self.crashes
        )


# -- processes ---------------------------------------------------------------------------


class ManagedProcess:
    """One process of the Procfile, in its own session; output to `<log_dir>/<name>.log`."""

    def __init__(self, name: str, argv: list[str], env: dict[str, str], log_dir: Path) -> None:
        self.name = name
        self.argv = argv
        self.env = env
        self.log_path = log_dir / f"{name}.log"
        self.popen: subprocess.Popen[bytes] | None = None
        self.restarts = 0
        #: set while we stop or kill it on purpose, so the watchdog leaves it alone
        self.expected_exit = False
        self._log: IO[bytes] | None = None

    def start(self) -> None:
        self._log = open(self.log_path, "ab")  # noqa: SIM115 - handed to the child
        self.popen = subprocess.Popen(  # noqa: S603 - our own argv
            self.argv,
            env=self.env,
            cwd=ROOT,
            stdout=self._log,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        self.expected_exit = False

    def exited(self) -> int | None:
        return None if self.popen is None else self.popen.poll()

    def _signal_group(self, sig: int) -> None:
        assert self.popen is not None
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.popen.pid, sig)

    def kill(self) -> None:
        """SIGKILL the whole process group: no shutdown, no requeue, no goodbye."""
        if self.popen is None:
            return
        self.expected_exit = True
        self._signal_group(signal.SIGKILL)
        self.popen.wait()
        self._close_log()

    def stop(self, timeout_s: float = 20.0) -> None:
        if self.popen is None:
            return
        self.expected_exit = True
        if self.popen.poll() is None:
            self._signal_group(signal.SIGTERM)
            try:
                self.popen.wait(timeout=timeout_s)
            except subprocess.TimeoutExpired:
                self._signal_group(signal.SIGKILL)
                self.popen.wait()
        # Whatever the leader left behind in its group goes too.
        self._signal_group(signal.SIGKILL)
        self._close_log()

    def restart(self) -> None:
        self.restarts += 1
        self.start()

    def _close_log(self) -> None:
        if self._log is not None:
            self._log.close()
            self._log = None


def _clean_env() -> dict[str, str]:
    """Our environment without any setting of the system: every value is ours."""
    from worker.settings import Settings

    names = {(f.alias or name).upper() for name, f in Settings.model_fields.items()}
    # Everything talks over loopback: a proxy from the environment must not get in between.
    names |= {"PORT", "DRAMATIQ_WORKER_TIMEOUT", "HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY"}
    return {k: v for k, v in os.environ.items() if k.upper() not in names}


class Cluster:
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
        self.web_port = free_port()
        self.sandbox_port = free_port()
        self.processes: dict[str, ManagedProcess] = {}
        self.workers: list[ManagedProcess] = []
        self.crashes: list[str] = []
        self.server_restarts: Counter[str] = Counter()
        self.t0 = time.monotonic()
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._watchdog: threading.Thread | None = None

    @property
    def web_url(self) -> str:
        return f"http://127.0.0.1:{self.web_port}"

    @property
    def sandbox_url(self) -> str:
        return f"http://127.0.0.1:{self.sandbox_port}"

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
                "LOG_FORMAT": "json",
                "LOG_LEVEL": "INFO",
                "PYTHONUNBUFFERED": "1",
            }
        )
        self.database_url = database_url
        self.redis_url = redis_url
        python = sys.executable
        sandbox_argv = [
            python, "-m", "worker.cli", "sandbox",
            "--port", str(self.sandbox_port),
            "--api-key", self.api_key,
            "--error-5xx-rate", str(p.error_5xx_rate),
            "--throttle-429-rate", str(p.throttle_429_rate),
            "--slow-rate", str(p.slow_rate),
            "--slow-ms", str(p.slow_ms),
            "--failure-callback-rate", str(p.failure_callback_rate),
            "--lost-callback-rate", str(p.lost_callback_rate),
            "--duplicate-callback-rate", str(p.duplicate_callback_rate),
            "--out-of-order-rate", str(p.out_of_order_rate),
            "--callback-delay-ms", str(p.callback_delay_ms),
            "--record-limit", "0",
            "--seed", str(p.seed),
        ]  # fmt: skip
        self._add("sandbox", sandbox_argv, env)
        wait_for_port(self.sandbox_port)
        web_argv = [
            python, "-m", "uvicorn", "--factory", "worker.web.app:create_app",
            "--host", "127.0.0.1", "--port", str(self.web_port), "--no-access-log",
        ]  # fmt: skip
        self._add("web", web_argv, env)
        worker_env = {**env, "dramatiq_worker_timeout": WORKER_POLL_MS}
        for n in range(1, p.worker_processes + 1):
            worker_argv = [
                python, "-m", "dramatiq", "worker.actors",
                "--processes", "1", "--threads", str(p.worker_threads), "--skip-logging",
            ]  # fmt: skip
            self.workers.append(self._add(f"worker-{n}", worker_argv, worker_env))
        self._add("clock", [python, "-m", "worker.cli", "sweep", "--forever"], env)
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

    def _add(self, name: str, argv: list[str], env: dict[str, str]) -> ManagedProcess:
        process = ManagedProcess(name, argv, env, self.log_dir)
        self.processes[name] = process
        process.start()
        return process

    def _wait_ready(self, timeout_s: float = 60.0) -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            for name, process in self.processes.items():
                code = process.exited()
                if code is not None:
                    raise RuntimeError(f"{name} exited with {code}: see {process.log_path}")
            with contextlib.suppress(httpx.HTTPError):
                if (
                    httpx.get(f"{self.web_url}/readyz", timeout=2, trust_env=False).status_code
                    == 200
                ):
                    return
            time.sleep(0.2)
        raise TimeoutError(f"web not ready at {self.web_url} after {timeout_s}s")

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
        self.redis.stop()
        time.sleep(self.params.redis_downtime_s)
        self.redis.start()
        self.server_restarts["redis"] += 1
        return "redis"

    def restart_postgres(self) -> str:
        self.postgres.stop()
        time.sleep(self.params.postgres_downtime_s)
        self.postgres.start()
        self.server_restarts["postgres"] += 1
        return "postgres"

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
            for name in reversed(list(self.processes)):
                with contextlib.suppress(Exception):
                    self.processes[name].stop()
        with contextlib.suppress(Exception):
            self.redis.stop()
        with contextlib.suppress(Exception):
            self.postgres.stop()


# -- the producers -----------------------------------------------------------------------


@dataclass
class PlannedSend:
    index: int
    via: str  # http | dramatiq
    body: dict[str, Any]
    #: malformed on purpose: must end `rejected`
    invalid: bool = False


def plan_sends(params: ChaosParams) -> list[PlannedSend]:
    """Unique recipients (never the sandbox's magic +79990… numbers), chains of 2–3
    channels for phones, `email` for emails; a few malformed Dramatiq messages."""
    rng = random.Random(params.seed)
    n = params.messages
    http_count = round(n * params.http_share)
    vias = ["http"] * http_count + ["dramatiq"] * (n - http_count)
    rng.shuffle(vias)
    dramatiq_indexes = [i for i, via in enumerate(vias) if via == "dramatiq"]
    invalid = set(rng.sample(dramatiq_indexes, min(params.invalid_messages, len(dramatiq_indexes))))
    sends = []
    for i, via in enumerate(vias):
        if i in invalid:
            body: dict[str, Any] = {"to": f"not-a-number-{i}", "channels": ["sms"]}
        elif rng.random() < params.email_share:
            body = {"to": f"chaos.{i}@example.com", "channels": ["email"]}
        else:
            chain = rng.sample(PHONE_CHANNELS, rng.choice((2, 3)))
            body = {"to": f"+79991{i:06d}", "channels": chain}
        body["metadata"] = {"chaos": i}
        sends.append(PlannedSend(i, via, body, invalid=i in invalid))
    return sends


class Producers:
    """Sends at a steady rate, as real producers would: HTTP with an Idempotency-Key and
    raw Dramatiq messages; each retries through a fault with the same key or message."""

    def __init__(self, cluster: Cluster, params: ChaosParams, run_id: str) -> None:
        self.cluster = cluster
        self.params = params
        self.run_id = run_id
        self.lock = threading.Lock()
        #: idempotency key -> (via, message id from the HTTP answer or None)
        self.accepted: dict[str, tuple[str, str | None]] = {}
        self.expected_rejected: set[str] = set()
        self.not_accepted: list[str] = []
        self.http_retries = 0
        self.enqueue_retries = 0
        self.http = httpx.Client(
            base_url=cluster.web_url,
            headers={"Authorization": f"Bearer {cluster.api_token}"},
            timeout=10,
            limits=httpx.Limits(max_connections=params.producer_threads),
            trust_env=False,  # loopback only: never through a proxy from the environment
        )
        from worker.broker import build_broker

        self.broker = build_broker(cluster.redis_url)

    def close(self) -> None:
        self.http.close()
        with contextlib.suppress(Exception):
            self.broker.close()

    def run(self, sends: list[PlannedSend], t0: float) -> None:
        with ThreadPoolExecutor(self.params.producer_threads, "producer") as pool:
            for n, send in enumerate(sends):
                pause = t0 + n / self.params.send_rate - time.monotonic()
                if pause > 0:
                    time.sleep(pause)
                pool.submit(self._send, send)

    def _send(self, send: PlannedSend) -> None:
        try:
            if send.via == "http":
                self._post(send)
            else:
                self._enqueue(send)
        except Exception as exc:  # a producer bug must show in the report, not vanish
            with self.lock:
                self.not_accepted.append(f"#{send.index}: producer crashed: {exc!r}")

    def _post(self, send: PlannedSend) -> None:
        key = f"chaos-{self.run_id}-{send.index}"
        give_up = time.monotonic() + self.params.producer_give_up_s
        pause = 0.1
        while True:
            try:
                response = self.http.post(
                    "/v1/messages", json=send.body, headers={"Idempotency-Key": key}
                )
            except httpx.TransportError as exc:
                problem = type(exc).__name__
            else:
                if response.status_code in (200, 202):
                    with self.lock:
                        self.accepted[key] = ("http", response.json()["id"])
                    return
                if response.status_code != 429 and response.status_code < 500:
                    with self.lock:
                        self.not_accepted.append(
                            f"#{send.index}: HTTP {response.status_code} {response.text[:200]}"
                        )
                    return
                problem = f"HTTP {response.status_code}"
            if time.monotonic() > give_up:
                with self.lock:
                    self.not_accepted.append(f"#{send.index}: gave up after {problem}")
                return
            with self.lock:
                self.http_retries += 1
            time.sleep(pause)
            pause = min(pause * 2, 2.0)

    def _enqueue(self, send: PlannedSend) -> None:
        message = dramatiq.Message(
            queue_name="kodmobi", actor_name="send_code", args=(), kwargs=send.body, options={}
        )
        give_up = time.monotonic() + self.params.producer_give_up_s
        pause = 0.1
        while True:
            try:
                self.broker.enqueue(message)
            except Exception as exc:  # Redis away: the same message again, same message_id
                problem = type(exc).__name__
            else:
                with self.lock:
                    self.accepted[message.message_id] = ("dramatiq", None)
                    if send.invalid:
                        self.expected_rejected.add(message.message_id)
                return
            if time.monotonic() > give_up:
                with self.lock:
                    self.not_accepted.append(f"#{send.index}: gave up enqueueing: {problem}")
                return
            with self.lock:
                self.enqueue_retries += 1
            time.sleep(pause)
            pause = min(pause * 2, 2.0)


# -- faults ------------------------------------------------------------------------------


@dataclass(frozen=True)
class PlannedFault:
    at_s: float
    kind: str
    index: int
    #: `at_s` counts from the end of the fault before, not from the first send
    after_previous: bool = False


def plan_faults(params: ChaosParams) -> list[PlannedFault]:
    """(seconds after the first send, kind, index): spread evenly over the sending window,
    kinds interleaved so that no two faults of one kind are next to each other; or as
    `fault_plan` says."""
    if params.fault_plan:
        return _explicit_plan(params.fault_plan)
    queues = {
        "worker_kill": params.worker_kills,
        "redis_restart": params.redis_restarts,
        "postgres_restart": params.postgres_restarts,
    }
    kinds: list[str] = []
    done: Counter[str] = Counter()
    while len(kinds) < sum(queues.values()):
        for kind, count in queues.items():
            if done[kind] < count:
                kinds.append(kind)
                done[kind] += 1
    window = params.messages / params.send_rate
    plan = []
    seen: Counter[str] = Counter()
    for n, kind in enumerate(kinds):
        plan.append(PlannedFault(window * (n + 1) / (len(kinds) + 1), kind, seen[kind]))
        seen[kind] += 1
    return plan


FAULT_KINDS = ("worker_kill", "redis_restart", "postgres_restart")


def _explicit_plan(text: str) -> list[PlannedFault]:
    """`kind@seconds` after the first send, or `kind@+seconds` after the fault before."""
    plan = []
    seen: Counter[str] = Counter()
    for item in text.split(","):
        kind, _, at = item.strip().partition("@")
        if kind not in FAULT_KINDS or not at:
            raise ValueError(f"fault_plan: {item!r} is not one of {FAULT_KINDS} @ seconds")
        relative = at.startswith("+")
        plan.append(PlannedFault(float(at.lstrip("+")), kind, seen[kind], relative))
        seen[kind] += 1
    return plan


def _run_faults(
    cluster: Cluster,
    plan: list[PlannedFault],
    t0: float,
    events: list[FaultEvent],
    stop: threading.Event,
    echo: Echo,
) -> None:
    actions: dict[str, Callable[[int], str]] = {
        "worker_kill": cluster.kill_worker,
        "redis_restart": lambda _i: cluster.restart_redis(),
        "postgres_restart": lambda _i: cluster.restart_postgres(),
    }
    previous_end = 0.0
    for fault in plan:
        kind = fault.kind
        at = fault.at_s + (previous_end if fault.after_previous else 0.0)
        if stop.wait(max(0.0, t0 + at - time.monotonic())):
            return
        started = time.monotonic() - t0
        echo(f"chaos: t={started:.1f}s {kind} …")
        target = actions[kind](fault.index)
        ended = previous_end = time.monotonic() - t0
        events.append(FaultEvent(kind, target, started, ended, datetime.now(UTC)))
        echo(f"chaos: t={ended:.1f}s {kind} {target} done ({ended - started:.1f}s)")


# -- reading the outcome -------------------------------------------------------------------


def _connect(database_url: str) -> psycopg.Connection[Any]:
    return psycopg.connect(
        database_url,
        autocommit=True,
        connect_timeout=5,
        options="-c default_transaction_read_only=on",
    )


def _query(database_url: str, sql: str, *params: Any) -> list[tuple[Any, ...]]:
    with _connect(database_url) as conn:
        return conn.execute(sql, params).fetchall()


def wait_final(
    database_url: str, keys: Iterable[str], deadline: float, echo: Echo
) -> tuple[bool, float]:
    """Poll Postgres until every key's message is final, or `deadline` (monotonic) passes.
    Returns (all final, when)."""
    wanted = list(keys)
    last_note = 0.0
    while True:
        now = time.monotonic()
        try:
            rows = _query(
                database_url,
                "SELECT count(*) FILTER (WHERE status = ANY(%s)) FROM messages"
                " WHERE idempotency_key = ANY(%s)",
                list(FINAL),
                wanted,
            )
            final = int(rows[0][0])
        except psycopg.Error:
            final = -1
        if final == len(wanted):
            return True, now
        if now >= deadline:
            return False, now
        if now - last_note > 10:
            echo(f"chaos: {final}/{len(wanted)} final, waiting")
            last_note = now
        time.sleep(0.25)


@dataclass
class Outcome:
    """What Postgres and the sandbox hold at the end."""

    messages: dict[str, dict[str, Any]]  # by idempotency key
    attempts: dict[str, list[dict[str, Any]]]  # by message id, in seq order
    events: dict[str, list[dict[str, Any]]]  # by attempt id
    sandbox_sends: list[dict[str, Any]]
    sandbox_stats: dict[str, Any]
    messages_in_database: int


def _rows(database_url: str, sql: str, *params: Any) -> list[dict[str, Any]]:
    with _connect(database_url) as conn, conn.cursor(row_factory=dict_row) as cur:
        return cur.execute(sql, params).fetchall()


def collect(cluster: Cluster, keys: list[str]) -> Outcome:
    url = cluster.database_url
    messages = {
        row["idempotency_key"]: row
        for row in _rows(
            url,
            "SELECT id, idempotency_key, source, recipient, channels, status, failure_reason,"
            " created_at, updated_at, delivered_at FROM messages WHERE idempotency_key = ANY(%s)",
            keys,
        )
    }
    ids = [m["id"] for m in messages.values()]
    attempts: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for row in _rows(
        url,
        "SELECT id, message_id, seq, channel, status, reason, tries, error_code, http_status,"
        " created_at, sent_at, accepted_at, finished_at FROM attempts"
        " WHERE message_id = ANY(%s) ORDER BY message_id, seq",
        ids,
    ):
        attempts[row["message_id"]].append(row)
    events: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for row in _rows(
        url,
        "SELECT e.attempt_id, e.status_word, e.parsed_status, e.outcome, e.applied,"
        " e.duplicates, e.received_at FROM callback_events e"
        " JOIN attempts a ON a.id = e.attempt_id WHERE a.message_id = ANY(%s)",
        ids,
    ):
        events[row["attempt_id"]].append(row)
    total = int(_query(url, "SELECT count(*) FROM messages")[0][0])
    headers = {"x-api-key": cluster.api_key}
    sends = httpx.get(
        f"{cluster.sandbox_url}/sandbox/messages", headers=headers, timeout=30, trust_env=False
    )
    sends.raise_for_status()
    stats = httpx.get(
        f"{cluster.sandbox_url}/sandbox/stats", headers=headers, timeout=30, trust_env=False
    )
    stats.raise_for_status()
    return Outcome(
        messages, dict(attempts), dict(events), sends.json()["messages"], stats.json(), total
    )


def attempt_of(send: dict[str, Any]) -> str | None:
    """The attempt id in a sandbox send's `/callbacks/kodmobi/{attempt_id}/{token}`."""
    url = send.get("callback_url") or ""
    parts = urlsplit(url).path.strip("/").split("/")
    if len(parts) == 4 and parts[:2] == ["callbacks", "kodmobi"]:
        return parts[2]
    return None


def check_order(message: dict[str, Any], attempts: list[dict[str, Any]]) -> list[str]:
    """Attempts have seq 1..n on the chain's first n channels, in order, and each one
    ended before the next began: never two open at once."""
    problems = []
    mid = message["id"]
    seqs = [a["seq"] for a in attempts]
    if seqs != list(range(1, len(attempts) + 1)):
        problems.append(f"{mid}: attempt seqs {seqs}")
    channels = [a["channel"] for a in attempts]
    if channels != list(message["channels"])[: len(channels)]:
        problems.append(f"{mid}: channels {channels} not a prefix of chain {message['channels']}")
    for earlier, later in zip(attempts, attempts[1:], strict=False):
        if earlier["status"] in OPEN_ATTEMPT or earlier["finished_at"] is None:
            problems.append(f"{mid}: attempt {earlier['seq']} still {earlier['status']}")
        elif earlier["finished_at"] > later["created_at"]:
            problems.append(f"{mid}: attempt {earlier['seq']} ended after {later['seq']} began")
    if sum(a["status"] in OPEN_ATTEMPT for a in attempts) > 1:
        problems.append(f"{mid}: more than one open attempt")
    return problems


def check_consistency(
    message: dict[str, Any],
    attempts: list[dict[str, Any]],
    events: dict[str, list[dict[str, Any]]],
    sandbox_by_attempt: dict[str, list[dict[str, Any]]],
) -> list[str]:
    """A final message has no open attempt; delivered ⇔ an attempt delivered (or a late
    delivery recorded) and the sandbox really sent a `delivered` callback; failed and
    expired have no delivered attempt; rejected has no attempt at all."""
    problems = []
    mid, status = message["id"], message["status"]
    statuses = [a["status"] for a in attempts]
    if status in FINAL and any(s in OPEN_ATTEMPT for s in statuses):
        problems.append(f"{mid}: {status} with an open attempt {statuses}")
    delivered_attempt = "delivered" in statuses
    late = any(e["outcome"] == "late_delivery" for a in attempts for e in events.get(a["id"], ()))
    if status == "delivered":
        if not (delivered_attempt or late):
            problems.append(f"{mid}: delivered, but no attempt delivered {statuses}")
        told = any(
            cb["status"] == "delivered"
            for a in attempts
            for send in sandbox_by_attempt.get(a["id"], ())
            for cb in send["callbacks"]
        )
        if not told:
            problems.append(f"{mid}: delivered, but kod.mobi never said so")
    elif status in ("failed", "expired") and delivered_attempt:
        problems.append(f"{mid}: {status} with a delivered attempt {statuses}")
    elif status == "rejected" and attempts:
        problems.append(f"{mid}: rejected with {len(attempts)} attempts")
    if status != "delivered" and late:
        problems.append(f"{mid}: {status} though a late delivery was applied")
    return problems


def classify_duplicates(
    sandbox_by_attempt: dict[str, list[dict[str, Any]]],
    message_of_attempt: dict[str, str],
    retry_errors: dict[str, list[str]],
) -> list[Duplicate]:
    """Every attempt kod.mobi accepted more than once, and why, from the sandbox's own
    record (was the earlier send a slow answer?) and our workers' retry log lines."""
    found = []
    for attempt_id, sends in sandbox_by_attempt.items():
        if len(sends) < 2:
            continue
        sends = sorted(sends, key=lambda s: s["message_id"])
        earlier = sends[:-1]
        timeouts = sum("ResponseTimeoutError" in e for e in retry_errors.get(attempt_id, ()))
        if all(s["outcome"].startswith("slow") for s in earlier):
            reason = "slow answer timed out at our client, retried"
            explained = True
        elif timeouts >= len(earlier):
            reason = "late answer under load timed out at our client, retried"
            explained = True
        else:
            reason = (
                f"unexplained: earlier outcomes {[s['outcome'] for s in earlier]},"
                f" our retries {retry_errors.get(attempt_id, [])}"
            )
            explained = False
        found.append(
            Duplicate(
                attempt_id,
                message_of_attempt.get(attempt_id),
                [
                    {k: s.get(k) for k in ("message_id", "channel", "outcome", "received_at")}
                    for s in sends
                ],
                reason,
                explained,
            )
        )
    return found


def dead_consumer_threads(log_dir: Path) -> list[str]:
    """Dramatiq consumer threads that died while their worker process kept running (a
    dead `kodmobi.DQ` consumer never promotes a delayed message again)."""
    found = []
    for path in sorted(log_dir.glob("worker-*.log")):
        consumer = "?"
        with open(path, encoding="utf-8", errors="replace") as fh:
            for line in fh:
                if "Consumer encountered an unexpected error" in line:
                    with contextlib.suppress(ValueError):
                        logger = str(json.loads(line).get("logger", "?"))
                        consumer = logger.partition("ConsumerThread(")[2].rstrip(")") or logger
                elif line.startswith("Exception in thread"):
                    found.append(f"{path.stem}: {consumer}")
    return found


def retry_errors_from_logs(log_dir: Path) -> dict[str, list[str]]:
    """attempt id -> the errors our workers retried it after (`attempt.retry_scheduled`)."""
    found: dict[str, list[str]] = defaultdict(list)
    for path in log_dir.glob("worker-*.log"):
        with open(path, encoding="utf-8", errors="replace") as fh:
            for line in fh:
                if "attempt.retry_scheduled" not in line:
                    continue
                with contextlib.suppress(ValueError):
                    record = json.loads(line)
                    found[record.get("attempt_id", "")].append(str(record.get("error")))
    return dict(found)


def analyse(report: ChaosReport, outcome: Outcome, producers: Producers, log_dir: Path) -> None:
    accepted = producers.accepted
    report.messages_in_database = outcome.messages_in_database
    report.expected_rejected = len(producers.expected_rejected)
    statuses: Counter[str] = Counter()
    for key, (via, http_id) in accepted.items():
        message = outcome.messages.get(key)
        if message is None:
            where = report.broker.stranded.get(key) if report.broker else None
            report.lost.append(
                f"{via} {key}: no message in the database" + (f"; {where}" if where else "")
            )
            continue
        statuses[message["status"]] += 1
        if http_id is not None and message["id"] != http_id:
            report.consistency_violations.append(
                f"{key}: answered id {http_id}, recorded {message['id']}"
            )
        if message["status"] not in FINAL:
            report.lost.append(f"{via} {key}: still {message['status']} at the bound")
        if (key in producers.expected_rejected) != (message["status"] == "rejected"):
            report.consistency_violations.append(
                f"{message['id']}: {message['status']}, but the input was"
                f" {'malformed' if key in producers.expected_rejected else 'valid'}"
            )
    report.status_counts = dict(statuses.most_common())
    report.final = sum(n for s, n in statuses.items() if s in FINAL)

    message_of_attempt: dict[str, str] = {}
    attempt_statuses: Counter[str] = Counter()
    for attempts in outcome.attempts.values():
        for a in attempts:
            message_of_attempt[a["id"]] = a["message_id"]
            attempt_statuses[a["status"]] += 1
    report.attempts = sum(attempt_statuses.values())
    report.attempt_status_counts = dict(attempt_statuses.most_common())

    sandbox_by_attempt: dict[str, list[dict[str, Any]]] = defaultdict(list)
    outcomes: Counter[str] = Counter()
    for send in outcome.sandbox_sends:
        outcomes[send["outcome"]] += 1
        attempt_id = attempt_of(send)
        if attempt_id is None or attempt_id not in message_of_attempt:
            report.unknown_sandbox_sends += 1
            continue
        sandbox_by_attempt[attempt_id].append(send)
    report.sandbox_sends = len(outcome.sandbox_sends)
    report.sandbox_outcomes = dict(outcomes.most_common())
    report.sandbox_stats = outcome.sandbox_stats

    for message in outcome.messages.values():
        attempts = outcome.attempts.get(message["id"], [])
        if message["status"] != "rejected":
            report.order_violations += check_order(message, attempts)
        report.consistency_violations += check_consistency(
            message, attempts, outcome.events, sandbox_by_attempt
        )
        report.late_deliveries += sum(
            e["outcome"] == "late_delivery"
            for a in attempts
            for e in outcome.events.get(a["id"], ())
        )
    report.dead_consumer_threads = dead_consumer_threads(log_dir)
    report.duplicates = classify_duplicates(
        sandbox_by_attempt, message_of_attempt, retry_errors_from_logs(log_dir)
    )


# -- the run -------------------------------------------------------------------------------


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


def _read_slots(redis_url: str) -> int | None:
    with contextlib.suppress(Exception):
        client = redis.Redis.from_url(redis_url, socket_timeout=5)
        try:
            value = client.get(SLOTS_KEY)
        finally:
            client.close()
        return int(value or 0)
    return None


@dataclass
class BrokerLeftovers:
    """What the broker still holds once every message is final (or the bound passed)."""

    queued: int = 0
    delayed: int = 0
    #: fetched by a worker that is still alive and never acknowledged: Dramatiq gives these
    #: back only when that worker dies (or stops)
    unacked: int = 0
    dead_lettered: int = 0
    #: Dramatiq message id -> where it sits, for the unacked ones
    stranded: dict[str, str] = field(default_factory=dict)


def read_broker(redis_url: str, namespace: str = "dramatiq") -> BrokerLeftovers | None:
    try:
        client = redis.Redis.from_url(redis_url, socket_timeout=5)
    except Exception:  # pragma: no cover - a bad URL
        return None
    try:
        left = BrokerLeftovers(
            queued=int(client.llen(f"{namespace}:kodmobi")),
            delayed=int(client.llen(f"{namespace}:kodmobi.DQ")),
            dead_lettered=int(client.zcard(f"{namespace}:kodmobi.XQ")),
        )
        for key in client.scan_iter(f"{namespace}:__acks__.*"):
            name = key.decode()
            queue = name.rsplit(".", 1)[-1] if not name.endswith(".DQ") else "kodmobi.DQ"
            for redis_id in client.smembers(key):
                left.unacked += 1
                data = client.hget(f"{namespace}:{queue}.msgs", redis_id)
                with contextlib.suppress(ValueError, TypeError):
                    message = json.loads(data or b"")
                    left.stranded[message["message_id"]] = (
                        f"{message['actor_name']} unacked in {name.split('__acks__.')[1]}"
                    )
        return left
    except redis.RedisError:
        return None
    finally:
        client.close()


def _save(path: Path, outcome: Outcome) -> None:
    """Everything read at the end, for a closer look after the run."""
    data = {
        "messages": outcome.messages,
        "attempts": outcome.attempts,
        "callback_events": outcome.events,
        "sandbox_sends": outcome.sandbox_sends,
        "sandbox_stats": outcome.sandbox_stats,
    }
    path.write_text(json.dumps(data, default=str, indent=1))


def run_chaos(params: ChaosParams, workdir: Path, echo: Echo | None = None) -> ChaosReport:
    """Start everything in `workdir`, send, break things, drain, and measure."""
    say: Echo = echo or (lambda _line: None)
    workdir = Path(workdir).resolve()
    workdir.mkdir(parents=True, exist_ok=True)
    report = ChaosReport(params=params, workdir=workdir)
    started = time.monotonic()
    cluster = Cluster(params, workdir, say)
    producers: Producers | None = None
    stop_faults = threading.Event()
    fault_thread: threading.Thread | None = None
    sampler: Sampler | None = None
    try:
        say(f"chaos: starting Postgres, Redis, sandbox, web, {params.worker_processes} workers,"
            f" clock in {workdir}")  # fmt: skip
        cluster.start()
        producers = Producers(cluster, params, secrets.token_hex(4))
        sends = plan_sends(params)
        report.sent_http = sum(s.via == "http" for s in sends)
        report.sent_dramatiq = len(sends) - report.sent_http
        t0 = time.monotonic()
        cluster.t0 = t0
        sampler = Sampler(cluster, workdir / "samples.jsonl")
        sampler.start()
        fault_thread = threading.Thread(
            target=_run_faults,
            args=(cluster, plan_faults(params), t0, report.faults, stop_faults, say),
            name="faults",
            daemon=True,
        )
        fault_thread.start()
        say(f"chaos: sending {len(sends)} messages at {params.send_rate:g}/s")
        producers.run(sends, t0)
        report.sending_s = time.monotonic() - t0
        fault_thread.join()
        say(f"chaos: all sent in {report.sending_s:.1f}s; waiting for every message to be final")
        report.last_fault_s = max((f.ended_s for f in report.faults), default=0.0)
        report.accepted_http = sum(v[0] == "http" for v in producers.accepted.values())
        report.accepted_dramatiq = len(producers.accepted) - report.accepted_http
        report.not_accepted = list(producers.not_accepted)
        report.http_retries = producers.http_retries
        report.enqueue_retries = producers.enqueue_retries
        start_bound = t0 + max(report.last_fault_s, report.sending_s)
        drained, when = wait_final(
            cluster.database_url,
            producers.accepted.keys(),
            start_bound + params.drain_bound_s,
            say,
        )
        report.drained = drained
        if drained:
            report.drain_after_last_fault_s = max(0.0, when - t0 - report.last_fault_s)
            report.drain_after_last_send_s = max(0.0, when - t0 - report.sending_s)
        report.slots_leaked = _read_slots(cluster.redis_url)
        report.broker = read_broker(cluster.redis_url)
        # Stragglers (a duplicated callback, a stale "sent") land before we read.
        time.sleep(1.0)
        outcome = collect(cluster, list(producers.accepted))
        _save(workdir / "outcome.json", outcome)
        analyse(report, outcome, producers, cluster.log_dir)
        report.crashes = list(cluster.crashes)
        report.restarts = cluster.restarts()
    finally:
        if sampler is not None:
            sampler.stop()
            report.peak_callbacks_pending = sampler.peak_callbacks_pending
        stop_faults.set()
        if fault_thread is not None:
            fault_thread.join(timeout=60)
        if producers is not None:
            producers.close()
        cluster.stop()
    report.run_s = time.monotonic() - started
    return report


# -- the table -----------------------------------------------------------------------------


def _pct(rate: float) -> str:
    return f"{rate * 100:g}%"


def _counts(counts: dict[str, int]) -> str:
    return ", ".join(f"{k} {v}" for k, v in counts.items()) or "-"


def _mark(ok: bool) -> str:
    return "ok" if ok else "FAIL"


def format_report(report: ChaosReport) -> str:
    p = report.params
    rows: list[tuple[str, str, str]] = []

    def row(name: str, value: object, check: str = "") -> None:
        rows.append((name, str(value), check))

    bound = f"bound {p.drain_bound_s:g} s after the last fault or send"
    row("messages sent (http / dramatiq)", f"{report.sent} ({report.sent_http} / "
        f"{report.sent_dramatiq}, {report.expected_rejected} malformed)")  # fmt: skip
    row(
        "accepted (http 202/200 / enqueued)",
        f"{report.accepted} ({report.accepted_http} / {report.accepted_dramatiq})",
        _mark(not report.not_accepted and report.accepted == report.sent),
    )
    row("producer retries (http / enqueue)", f"{report.http_retries} / {report.enqueue_retries}")
    row("reached a final status", f"{report.final} of {report.accepted}",
        f"{_mark(report.drained and report.final == report.accepted)} ({bound})")  # fmt: skip
    row("lost (missing or not final)", len(report.lost), _mark(not report.lost))
    row("message statuses", _counts(report.status_counts))
    row("messages in the database", report.messages_in_database)
    row("attempts", f"{report.attempts} ({_counts(report.attempt_status_counts)})")
    row("late deliveries applied", report.late_deliveries)
    row("kod.mobi sends (sandbox record)", report.sandbox_sends)
    row(
        "  of unknown attempts",
        report.unknown_sandbox_sends,
        _mark(not report.unknown_sandbox_sends),
    )
    dup_reasons = Counter(d.reason for d in report.duplicates if d.explained)
    unexplained = report.unexplained_duplicates
    row("attempts sent more than once", len(report.duplicates),
        "all explained" if not unexplained else f"{len(unexplained)} unexplained")  # fmt: skip
    for reason, count in dup_reasons.most_common():
        row(f"  {reason}", count)
    row("  unexplained", len(unexplained))
    row("fallback order respected", f"{len(report.order_violations)} violations",
        _mark(not report.order_violations))  # fmt: skip
    row("statuses consistent with attempts", f"{len(report.consistency_violations)} violations",
        _mark(not report.consistency_violations))  # fmt: skip
    row("time to drain after the last fault",
        "-" if report.drain_after_last_fault_s is None
        else f"{report.drain_after_last_fault_s:.1f} s", _mark(report.drained))  # fmt: skip
    row("time to drain after the last send",
        "-" if report.drain_after_last_send_s is None
        else f"{report.drain_after_last_send_s:.1f} s")  # fmt: skip
    row("sending took", f"{report.sending_s:.1f} s at {p.send_rate:g}/s")
    row("total run time", f"{report.run_s:.1f} s")
    for fault in report.faults:
        row(f"fault at t={fault.started_s:.1f}s", f"{fault.kind} {fault.target}"
            f" ({fault.ended_s - fault.started_s:.1f} s)")  # fmt: skip
    row("restarts", _counts(report.restarts))
    row("unexpected exits (crashes)", len(report.crashes), _mark(not report.crashes))
    if report.slots_leaked is not None:
        row("kod.mobi call slots held when idle", report.slots_leaked)
    if report.broker is not None:
        b = report.broker
        row(
            "broker when drained (queued/delayed/unacked/dead)",
            f"{b.queued} / {b.delayed} / {b.unacked} / {b.dead_lettered}",
        )
    row(
        "dead consumer threads in live workers",
        ", ".join(report.dead_consumer_threads) or "0",
    )
    row("peak sandbox callback backlog", report.peak_callbacks_pending)
    sandbox_responses = report.sandbox_stats.get("responses", {})
    row("sandbox answers", _counts(sandbox_responses))
    row("sandbox callbacks", _counts(report.sandbox_stats.get("callbacks", {})))

    faults = Counter(f.kind for f in report.faults)
    width = max(len(r[0]) for r in rows)
    vwidth = min(60, max(len(r[1]) for r in rows))
    lines = [
        f"kodmobi chaos run: {p.messages} messages, {p.worker_processes} worker processes,"
        f" {faults['worker_kill']} worker kills, {faults['redis_restart']} Redis restart(s),"
        f" {faults['postgres_restart']} Postgres restart(s)",
        f"sandbox: {_pct(p.error_5xx_rate)} 5xx, {_pct(p.throttle_429_rate)} 429,"
        f" {_pct(p.slow_rate)} slow ({p.slow_ms} ms; read timeout {p.read_timeout_s:g} s),"
        f" {_pct(p.failure_callback_rate)} failure, {_pct(p.lost_callback_rate)} lost,"
        f" {_pct(p.duplicate_callback_rate)} duplicated, {_pct(p.out_of_order_rate)}"
        f" out-of-order callbacks; delivery timeout {p.delivery_timeout_s:g} s",
        "",
        f"{'figure'.ljust(width)}  {'value'.ljust(vwidth)}  check",
        f"{'-' * width}  {'-' * vwidth}  -----",
    ]
    lines += [f"{n.ljust(width)}  {v.ljust(vwidth)}  {c}".rstrip() for n, v, c in rows]
    details: list[str] = []
    stranded = report.broker.stranded if report.broker else {}
    for title, items in (
        ("lost", report.lost),
        ("not accepted", report.not_accepted),
        ("fallback order", report.order_violations),
        ("consistency", report.consistency_violations),
        ("crashes", report.crashes),
        ("unacked in live workers when drained", [f"{k}: {v}" for k, v in stranded.items()]),
        ("unexplained duplicates", [f"{d.attempt_id} ({d.message_id}): {d.reason}"
                                    for d in unexplained]),
    ):  # fmt: skip
        if items:
            details.append(f"{title} ({len(items)}):")
            details += [f"  {item}" for item in items[:20]]
            if len(items) > 20:
                details.append(f"  … and {len(items) - 20} more")
    if report.duplicates:
        lines += [
            "",
            "A duplicate: one attempt (one callback URL) that kod.mobi accepted more than once.",
            f"'slow answer': the sandbox accepted the send but answered after {p.slow_ms} ms, past",
            f"our {p.read_timeout_s:g} s read timeout; a timeout is transient (DESIGN §7), so"
            " the worker sent",
            "the attempt again, and its retry came before the slow send's callback.",
            "'late answer under load': the same for an answer not drawn slow that still came late.",
        ]
    if details:
        lines += ["", *details]
    lines += ["", f"result: {'PASS' if report.ok else 'FAIL'}; logs in {report.workdir / 'logs'}"]
    return "\n".join(lines)
