"""The latency figure: 20 codes/s over HTTP and raw enqueue until the sandbox gets the call."""

from __future__ import annotations

import threading
import time
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime
from typing import Any

import httpx
import psycopg

from scripts.benchkit.common import (
    IDLE_S,
    LATENCY_RATE,
    PROCESSES,
    log,
    percentile,
    phone,
)
from scripts.benchkit.infra import Infra
from scripts.benchkit.load import send_code_message
from scripts.benchkit.measure import CpuMeter
from scripts.benchkit.system import system


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
            # Idle: nothing to do, every process as it sits between bursts.
            idle_meter = CpuMeter(sys_.roles())
            idle_meter.start()
            time.sleep(IDLE_S)
            idle = idle_meter.stop()
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
        "idle_cores": idle,
        "worker_processes": PROCESSES,
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
