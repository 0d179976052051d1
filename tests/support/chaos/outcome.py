"""Reading the outcome once everything is final: Postgres, the sandbox's record, Redis."""

from __future__ import annotations

import contextlib
import json
import time
from collections import defaultdict
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

import httpx
import psycopg
import redis
from psycopg.rows import dict_row

from tests.support.chaos.cluster import Cluster
from tests.support.chaos.model import FINAL, BrokerLeftovers, Echo, SlotsHeld
from worker.call_slots import SLOT_TTL_MS


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


def _grouped(database_url: str, by: str, sql: str, *params: Any) -> dict[str, list[dict[str, Any]]]:
    """The rows of `sql` grouped by their column `by`, in the order the query gives them."""
    groups: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for row in _rows(database_url, sql, *params):
        groups[row[by]].append(row)
    return dict(groups)


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
    attempts = _grouped(
        url,
        "message_id",
        "SELECT id, message_id, seq, channel, status, reason, tries, error_code, http_status,"
        " created_at, sent_at, accepted_at, deadline, finished_at FROM attempts"
        " WHERE message_id = ANY(%s) ORDER BY message_id, seq",
        ids,
    )
    events = _grouped(
        url,
        "attempt_id",
        "SELECT e.attempt_id, e.status_word, e.parsed_status, e.outcome, e.applied,"
        " e.duplicates, e.received_at FROM callback_events e"
        " JOIN attempts a ON a.id = e.attempt_id WHERE a.message_id = ANY(%s)",
        ids,
    )
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
    return Outcome(messages, attempts, events, sends.json()["messages"], stats.json(), total)


def slots_key(namespace: str) -> str:
    """The sorted set of call slots, as worker.call_slots.KodMobiSlots names it."""
    return f"{namespace}:kodmobi-call-slots"


def read_slots(redis_url: str, namespace: str, last_fault_at: datetime | None) -> SlotsHeld:
    """The live call slots (those younger than SLOT_TTL_MS, which the acquire script would
    not drop), split at the end of the last fault. Redis's own clock, as the script uses;
    its errors are the caller's to report."""
    client = redis.Redis.from_url(redis_url, socket_timeout=5)
    try:
        seconds, micros = client.time()
        now_ms = seconds * 1000 + micros // 1000
        members = client.zrangebyscore(
            slots_key(namespace), f"({now_ms - SLOT_TTL_MS}", "+inf", withscores=True
        )
    finally:
        client.close()
    cut_ms = last_fault_at.timestamp() * 1000 if last_fault_at is not None else float("-inf")
    held = SlotsHeld()
    for _member, score in members:
        if score > cut_ms:
            held.leaked += 1
        else:
            held.before_last_fault += 1
    return held


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


def save(path: Path, outcome: Outcome) -> None:
    """Everything read at the end, for a closer look after the run."""
    data = {
        "messages": outcome.messages,
        "attempts": outcome.attempts,
        "callback_events": outcome.events,
        "sandbox_sends": outcome.sandbox_sends,
        "sandbox_stats": outcome.sandbox_stats,
    }
    path.write_text(json.dumps(data, default=str, indent=1))
