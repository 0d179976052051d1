"""The figures limit (a no-op actor), e2e and latency-bound (codes from intake to delivered)."""

from __future__ import annotations

import contextlib
import time
from pathlib import Path
from typing import Any

import dramatiq
import psycopg

from scripts.benchkit.common import (
    MB,
    STALL_S,
    log,
    phone,
)
from scripts.benchkit.hooks import Hooks, fast_receiver
from scripts.benchkit.infra import Infra
from scripts.benchkit.load import release, send_code_message, stage_messages
from scripts.benchkit.measure import CpuMeter, RssSampler
from scripts.benchkit.profile import Profiler
from scripts.benchkit.system import system
from worker.broker import QUEUE


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
    infra: Infra,
    n: int,
    latency_ms: float,
    label: str,
    profile: Path | None = None,
    notify: bool = False,
) -> dict[str, Any]:
    """Codes from intake to `delivered`; with `notify`, each also asks for a webhook (the
    final events, the default) to a fast local receiver, and the run ends when Postgres
    counts N delivered and N webhooks taken."""
    with contextlib.ExitStack() as stack:
        hooks = stack.enter_context(fast_receiver()) if notify else None
        return _run_throughput(infra, n, latency_ms, label, profile, hooks)


def _run_throughput(
    infra: Infra, n: int, latency_ms: float, label: str, profile: Path | None, hooks: Hooks | None
) -> dict[str, Any]:
    with system(infra, label) as sys_:
        notify = None
        if hooks is not None:
            sys_.env.update({"WEBHOOK_SECRET": hooks.secret, "WEBHOOK_ALLOWED_HOSTS": "127.0.0.1"})
            notify = {"url": f"{hooks.url}/hook"}
        sys_.start_sandbox(latency_ms=latency_ms, callback_delay_ms=0)
        sys_.start_web()
        sys_.start_clock()
        staging = stage_messages(sys_, [send_code_message(phone(1, i), notify) for i in range(n)])
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
                if hooks is not None:
                    row = conn.execute(
                        "SELECT count(*) FROM event_deliveries WHERE state = 'delivered'"
                    ).fetchone()
                    # Done when both are: the figure counts a code once its webhook is taken.
                    delivered = min(delivered, int(row[0]) if row else 0)
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
            hooks_delivered = None
            if hooks is not None:
                row = conn.execute(
                    "SELECT count(*) FROM event_deliveries WHERE state = 'delivered'"
                ).fetchone()
                hooks_delivered = int(row[0]) if row else 0
        stats = http.get("/sandbox/stats").json()
        http.close()
        peaks = sorted(rss.peaks.values(), reverse=True)
    delivered = counts.get("delivered", 0)
    if hooks_delivered is not None:
        delivered = min(delivered, hooks_delivered)
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
        "webhooks_delivered": hooks_delivered,
        "webhooks_received": hooks.received if hooks is not None else None,
    }
