"""Outcome events (issue 10): waiting for the outbox to empty, reading it, and the checks of
what each subscriber (webhooks, a Dramatiq reply queue) heard against what it holds."""

from __future__ import annotations

import time
from collections import Counter, defaultdict
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import psycopg

from tests.support.chaos.hooks import Receipt
from tests.support.chaos.model import FINAL, Echo, Subscribers
from tests.support.chaos.outcome import _connect, _rows
from worker.schemas import FINAL_EVENTS

_PENDING = """
SELECT (SELECT count(*) FROM events e JOIN messages m ON m.id = e.message_id
         WHERE e.feed_seq IS NULL AND m.idempotency_key = ANY(%(keys)s)),
       (SELECT count(*) FROM event_deliveries d JOIN messages m ON m.id = d.message_id
         WHERE d.state = 'pending' AND m.idempotency_key = ANY(%(keys)s)),
       (SELECT count(*) FROM event_deliveries d JOIN messages m ON m.id = d.message_id
         WHERE d.target = 'dramatiq' AND d.state = 'delivered'
           AND m.idempotency_key = ANY(%(keys)s))
"""


def wait_events(
    database_url: str,
    keys: Iterable[str],
    replies_heard: Any,
    deadline: float,
    echo: Echo,
) -> tuple[bool, float]:
    """Poll until the subscribed messages' events are all sequenced, none of their
    deliveries is pending, and the reply consumer has heard every reply enqueued
    (`replies_heard()`: distinct events it got); or `deadline` (monotonic) passes."""
    wanted = list(keys)
    last_note = 0.0
    while True:
        now = time.monotonic()
        try:
            with _connect(database_url) as conn:
                row = conn.execute(_PENDING, {"keys": wanted}).fetchone()
            unsequenced, pending, replied = (int(v) for v in row) if row else (-1, -1, -1)
        except psycopg.Error:
            unsequenced = pending = replied = -1
        heard = replies_heard()
        if unsequenced == 0 and pending == 0 and heard >= replied >= 0:
            return True, now
        if now >= deadline:
            return False, now
        if now - last_note > 10:
            echo(
                f"chaos: events: {unsequenced} unsequenced, {pending} deliveries pending,"
                f" {heard}/{replied} replies heard; waiting"
            )
            last_note = now
        time.sleep(0.25)


@dataclass
class Outbox:
    """The events of the subscribed messages, by idempotency key in outbox order, and
    their deliveries' states and tries."""

    events: dict[str, list[dict[str, Any]]]
    status: dict[str, str]
    #: target -> state -> count
    states: dict[str, dict[str, int]]
    #: target -> what our tries met ("HTTP 500", "timeout", "ConnectError", "ok")
    tries: dict[str, dict[str, int]]
    unsequenced: int


def read_outbox(database_url: str, keys: list[str]) -> Outbox:
    events: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for row in _rows(
        database_url,
        "SELECT m.idempotency_key AS key, e.id, e.type, e.position, e.feed_seq, e.created_at"
        " FROM events e JOIN messages m ON m.id = e.message_id"
        " WHERE m.idempotency_key = ANY(%s) ORDER BY e.position",
        keys,
    ):
        events[row["key"]].append(row)
    status = {
        r["idempotency_key"]: r["status"]
        for r in _rows(
            database_url,
            "SELECT idempotency_key, status FROM messages WHERE idempotency_key = ANY(%s)",
            keys,
        )
    }
    states: dict[str, dict[str, int]] = defaultdict(dict)
    for r in _rows(
        database_url,
        "SELECT d.target, d.state, count(*) AS n FROM event_deliveries d"
        " JOIN messages m ON m.id = d.message_id WHERE m.idempotency_key = ANY(%s)"
        " GROUP BY 1, 2",
        keys,
    ):
        states[r["target"]][r["state"]] = int(r["n"])
    tries: dict[str, dict[str, int]] = defaultdict(dict)
    for r in _rows(
        database_url,
        "SELECT d.target, CASE WHEN t.error IS NULL THEN 'ok'"
        " ELSE split_part(t.error, ':', 1) END AS what, count(*) AS n"
        " FROM delivery_tries t JOIN event_deliveries d ON d.id = t.delivery_id"
        " JOIN messages m ON m.id = d.message_id WHERE m.idempotency_key = ANY(%s)"
        " GROUP BY 1, 2 ORDER BY 3 DESC",
        keys,
    ):
        tries[r["target"]][r["what"]] = int(r["n"])
    unsequenced = sum(e["feed_seq"] is None for rows in events.values() for e in rows)
    return Outbox(dict(events), status, dict(states), dict(tries), unsequenced)


def subscriptions(notify_of: dict[str, dict[str, Any]], target: str) -> dict[str, set[str]]:
    """Idempotency key -> the event types it subscribed to, for one target."""
    found = {}
    for key, notify in notify_of.items():
        if (notify.get("url") if target == "webhook" else notify.get("queue_name")) is None:
            continue
        found[key] = set(notify.get("events") or FINAL_EVENTS)
    return found


def check_subscriber(
    target: str,
    subscribed: dict[str, set[str]],
    events: dict[str, list[dict[str, Any]]],
    status: dict[str, str],
    receipts: list[Receipt],
) -> Subscribers:
    """What `target` heard (`receipts`, in arrival order) against the outbox (`events`
    by key in outbox order): every subscribed event received and verified, the final one
    of every final message among them, one webhook-id per event (its id), and no event
    received before every earlier one of its message had been taken (answered 2xx)."""
    found = Subscribers(target=target, messages=len(subscribed))
    found.receipts = len(receipts)
    found.answers = dict(Counter(r.answer for r in receipts).most_common())
    by_event: dict[str, list[Receipt]] = defaultdict(list)
    for r in receipts:
        event_id = str((r.event or {}).get("id", ""))
        if not r.verified:
            found.unverified.append(f"try #{r.seq} of {event_id or '?'} ({r.webhook_id})")
            continue
        if r.webhook_id != event_id:
            found.id_mismatches.append(f"event {event_id} came with webhook-id {r.webhook_id}")
        by_event[event_id].append(r)
    found.repeats = sum(len(rs) - 1 for rs in by_event.values())
    expected_ids: set[str] = set()
    for key, types in subscribed.items():
        wanted = [e for e in events.get(key, []) if e["type"] in types]
        expected_ids.update(e["id"] for e in wanted)
        found.expected += len(wanted)
        for e in wanted:
            if e["id"] not in by_event:
                found.lost.append(f"{key}: {e['type']} {e['id']}")
        final = status.get(key)
        if final in FINAL and f"message.{final}" in types:
            finals = [e for e in wanted if e["type"] == f"message.{final}"]
            if not finals:
                found.missing_final.append(f"{key}: {final}, no message.{final} in the outbox")
            elif not any(e["id"] in by_event for e in finals):
                found.missing_final.append(f"{key}: message.{final} {finals[0]['id']} not heard")
        found.order_violations += _order(key, wanted, by_event)
        found.timestamp_inversions += [
            f"{key}: {later['type']} {later['id']} timestamped before {earlier['type']}"
            f" {earlier['id']}"
            for earlier, later in zip(wanted, wanted[1:], strict=False)
            if earlier["created_at"] > later["created_at"]
        ]
    for event_id, rs in by_event.items():
        if event_id not in expected_ids:
            found.id_mismatches.append(
                f"event {event_id or '?'} ({rs[0].webhook_id}) is no subscribed outbox event"
            )
    found.received = len(expected_ids & set(by_event))
    return found


def _order(key: str, wanted: list[dict[str, Any]], by_event: dict[str, list[Receipt]]) -> list[str]:
    problems = []
    taken = {
        event_id: min((r.seq for r in rs if r.taken), default=None)
        for event_id, rs in by_event.items()
    }
    for k, event in enumerate(wanted):
        first = min((r.seq for r in by_event.get(event["id"], [])), default=None)
        if first is None:
            continue
        for before in wanted[:k]:
            at = taken.get(before["id"])
            if at is None or at > first:
                problems.append(
                    f"{key}: {event['type']} {event['id']} arrived before"
                    f" {before['type']} {before['id']} was taken"
                )
                break
    return problems


def replies_as_receipts(heard: list[tuple[float, dict[str, Any]]]) -> list[Receipt]:
    """The reply consumer's events as receipts: each taken, under its own id."""
    return [
        Receipt(n, at, str(event.get("id", "")), True, "200", event)
        for n, (at, event) in enumerate(heard)
    ]
