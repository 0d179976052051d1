"""The callbacks figure: callbacks/s the receiver applies, vs a bare endpoint on the same stack."""

from __future__ import annotations

import json
import time
from datetime import datetime
from pathlib import Path
from typing import Any

import psycopg
from ulid import ULID

from scripts.benchkit.common import (
    phone,
)
from scripts.benchkit.infra import Infra
from scripts.benchkit.load import fire
from scripts.benchkit.measure import CpuMeter
from scripts.benchkit.profile import Profiler
from scripts.benchkit.system import system
from worker.security import callback_token


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
        to = phone(4, i)
        messages.append(
            (message_id, message_id, "bench", "dramatiq", to, to, "phone", ["sms"],
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
            "recipient_key, recipient_kind, channels, code_ciphertext, status, created_at, "
            "updated_at, expires_at) VALUES (%s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s, %s)",
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

    # Callback URLs carry their expiry (issue 13): these live an hour, as a real one would.
    expires_at = int(time.time()) + 3600

    def requests_for(pairs: list[tuple[str, int]]) -> list[tuple[bytes, bytes]]:
        return [
            (
                f"/callbacks/kodmobi/{aid}/{callback_token(secret, aid, expires_at)}".encode(),
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
        # Anything but 200 (a timeout or a refused connection counts under its own key).
        "failed": sum(n for status, n in real.statuses.items() if status != 200),
        "elapsed_s": real.elapsed_s,
        "bare_per_s": bare.per_s,
        "bare_statuses": bare.statuses,
        "ratio": (applied / real.elapsed_s) / bare.per_s,
        "concurrency": concurrency,
        "cpu_cores": cpu,
        "bare_cpu_cores": bare_cpu,
    }
