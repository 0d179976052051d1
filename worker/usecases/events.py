"""Outcome events on their way out (issue 10): the feed order, webhook and Dramatiq
deliveries with retries, the feed's reads and redelivery.

The transitions write events into the outbox (worker.usecases.outbox). From there:

1. **Sequence** (one runner at a time, under an advisory lock): events that have
   committed get their feed position, in insert order, and a delivery row per subscriber.
   Numbering after commit is what makes `GET /v1/events?after=` lose nothing: an event
   cannot appear later behind a cursor already handed out.
2. **Deliver**: due deliveries are claimed with SKIP LOCKED (several dispatchers may run)
   and leased; a later event of a message waits while an earlier one is pending. A try
   that fails is retried with exponential backoff and jitter until the delivery's horizon
   (WEBHOOK_RETRY_HORIZON_S), then the delivery is `dead` with its last error.

The dispatcher runs in the clock process (`kodmobi sweep --forever`), in a thread of its
own: slow or dead receivers never hold up the sweep, and webhook calls never take a
worker thread that a code delivery is waiting for, nor touch the claim/answer statements.
"""

from __future__ import annotations

import json
import random
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

import dramatiq

from worker.logging import get_logger
from worker.schemas import (
    DeliveryTryView,
    DeliveryView,
    EventDetailView,
    EventPage,
    EventView,
    FallbackDetail,
    MessageView,
)
from worker.usecases.context import Context, utcnow
from worker.webhooks import HostPolicy, WebhookError, WebhookSender

log = get_logger("worker.events")

#: The first retry comes about this long after a failed try; each next one twice as late.
BASE_BACKOFF_S = 1.0
#: No two tries of one delivery are further apart than this (WEBHOOK_MAX_BACKOFF_S).
MAX_BACKOFF_S = 3600.0
#: A claimed delivery is tried again after this (plus the webhook timeout) if its
#: dispatcher died mid-try: the receiver may see that try twice, with the same webhook-id.
LEASE_MARGIN_S = 30.0
#: Deliveries tried at once by one dispatcher.
CONCURRENCY = 16
#: At most this many events per page of the feed.
MAX_PAGE = 500
#: The advisory lock that makes one sequencer run at a time.
_SEQUENCER_LOCK = 0x6B6F_6465_7673  # "kodevs"

_SEQUENCE = """
WITH next AS (
  SELECT id, message_id, type, position FROM events
   WHERE feed_seq IS NULL ORDER BY position LIMIT %(batch)s
), numbered AS (
  SELECT n.*, nextval('events_feed_seq') AS seq FROM (SELECT * FROM next ORDER BY position) n
), numbering AS (
  UPDATE events e SET feed_seq = numbered.seq FROM numbered WHERE e.id = numbered.id
), added AS (
  INSERT INTO event_deliveries (event_id, message_id, position, target, url, queue_name,
      actor_name, state, tries, next_try_at, retry_until, created_at, updated_at)
  SELECT n.id, n.message_id, n.position, t.target, t.url, t.queue_name, t.actor_name,
         'pending', 0, %(now)s, %(until)s, %(now)s, %(now)s
    FROM numbered n JOIN messages m ON m.id = n.message_id
   CROSS JOIN LATERAL (VALUES
       ('webhook', m.notify->>'url', NULL, NULL),
       ('dramatiq', NULL, m.notify->>'queue_name', m.notify->>'actor_name')
   ) AS t(target, url, queue_name, actor_name)
   WHERE m.notify IS NOT NULL AND (m.notify->'events') ? n.type
     AND (t.url IS NOT NULL OR t.queue_name IS NOT NULL)
  ON CONFLICT (event_id, target) DO NOTHING
  RETURNING 1
)
SELECT (SELECT count(*) FROM numbered), (SELECT count(*) FROM added)
"""

# Due deliveries whose message has no earlier event still pending for the same target.
_CLAIM = """
WITH due AS (
  SELECT d.id FROM event_deliveries d
   WHERE d.state = 'pending' AND d.next_try_at <= %(now)s
     AND NOT EXISTS (
       SELECT 1 FROM event_deliveries p
        WHERE p.message_id = d.message_id AND p.target = d.target
          AND p.state = 'pending' AND p.position < d.position)
   ORDER BY d.next_try_at, d.position LIMIT %(batch)s
   FOR UPDATE OF d SKIP LOCKED
)
UPDATE event_deliveries d
   SET next_try_at = %(lease)s, tries = d.tries + 1, updated_at = %(now)s
  FROM due, events e
 WHERE d.id = due.id AND e.id = d.event_id
RETURNING d.id, d.target, d.url, d.queue_name, d.actor_name, d.tries,
          e.id, e.type, e.created_at, e.data, e.detail
"""

_RECORD = """
WITH d AS (
  UPDATE event_deliveries
     SET state = CASE WHEN %(ok)s THEN 'delivered'
                      WHEN %(now)s >= retry_until THEN 'dead' ELSE 'pending' END,
         next_try_at = CASE WHEN %(ok)s THEN next_try_at
                            ELSE LEAST(%(next)s, retry_until) END,
         delivered_at = CASE WHEN %(ok)s THEN %(now)s ELSE delivered_at END,
         last_error = CASE WHEN %(ok)s THEN NULL ELSE %(error)s END,
         updated_at = %(now)s
   WHERE id = %(id)s
  RETURNING state
), t AS (
  INSERT INTO delivery_tries (delivery_id, at, http_status, error, duration_ms)
  VALUES (%(id)s, %(now)s, %(http_status)s, %(error)s, %(ms)s)
)
SELECT state FROM d
"""


def render(event_id: str, type_: str, at: datetime, data: Any, detail: Any) -> EventView:
    """The event as it goes out; `data` exactly as `GET /v1/messages/{id}` shows it."""
    return EventView(
        id=event_id,
        type=type_,
        timestamp=at,
        data=MessageView.model_validate(data),
        fallback=None if detail is None else FallbackDetail.model_validate(detail),
    )


def body(event: EventView) -> bytes:
    return json.dumps(event.model_dump(mode="json"), separators=(",", ":")).encode()


def backoff_s(tries: int, max_s: float = MAX_BACKOFF_S) -> float:
    """Exponential backoff with jitter (half to all of the step), steps capped at `max_s`."""
    step: float = min(max_s, BASE_BACKOFF_S * 2.0 ** min(max(tries - 1, 0), 30))
    return step * random.uniform(0.5, 1.0)


def sequence(ctx: Context, *, batch: int = 1000) -> tuple[int, int]:
    """Give committed events their feed positions and deliveries; `(events, deliveries)`."""
    now = utcnow()
    until = now + timedelta(seconds=ctx.settings.webhook_retry_horizon_s)
    with ctx.conn() as conn:
        # The lock is taken first, so this statement's snapshot (read committed) sees
        # everything the previous sequencer numbered.
        conn.exec_driver_sql("SELECT pg_advisory_xact_lock(%(key)s)", {"key": _SEQUENCER_LOCK})
        row = conn.exec_driver_sql(_SEQUENCE, {"batch": batch, "now": now, "until": until}).one()
    return int(row[0]), int(row[1])


@dataclass
class _Claimed:
    id: int
    target: str
    url: str | None
    queue_name: str | None
    actor_name: str | None
    tries: int
    event: EventView


Reply = Callable[[str, str, dict[str, Any]], None]


def broker_reply(broker: dramatiq.Broker) -> Reply:
    """Dramatiq replies: the event as the single keyword argument `event`."""

    def reply(queue_name: str, actor_name: str, event: dict[str, Any]) -> None:
        message: dramatiq.Message[Any] = dramatiq.Message(
            queue_name=queue_name,
            actor_name=actor_name,
            args=(),
            kwargs={"event": event},
            options={},
        )
        broker.enqueue(message)

    return reply


class EventDispatcher:
    """Sequences events and delivers them; `run(stop)` loops until `stop` is set."""

    def __init__(self, ctx: Context, reply: Reply, *, poll_s: float = 0.2) -> None:
        self.ctx = ctx
        self.reply = reply
        self.poll_s = poll_s
        settings = ctx.settings
        secret = settings.webhook_secret
        self.sender = (
            WebhookSender(
                secret.get_secret_value(),
                HostPolicy.from_setting(settings.webhook_allowed_hosts),
                settings.webhook_timeout_s,
            )
            if secret is not None
            else None
        )
        self.lease_s = settings.webhook_timeout_s + LEASE_MARGIN_S
        self._pool = ThreadPoolExecutor(CONCURRENCY, thread_name_prefix="events")

    def run_once(self, *, batch: int = 200) -> int:
        """One round: sequence, claim what is due, try it all; the number tried."""
        sequence(self.ctx)
        claimed = self._claim(batch)
        for _ in self._pool.map(self._try, claimed):
            pass
        return len(claimed)

    def run(self, stop: threading.Event) -> None:
        log.info("events.dispatcher_started")
        while not stop.is_set():
            try:
                busy = self.run_once()
            except Exception as exc:  # database or Redis away: say so, keep going
                log.warning(
                    "events.dispatch_failed", error=type(exc).__name__, detail=str(exc)[:300]
                )
                busy = 0
            if not busy:
                stop.wait(self.poll_s)

    def close(self) -> None:
        self._pool.shutdown(wait=True)
        if self.sender is not None:
            self.sender.close()

    def _claim(self, batch: int) -> list[_Claimed]:
        now = utcnow()
        with self.ctx.conn() as conn:
            rows = conn.exec_driver_sql(
                _CLAIM,
                {"now": now, "lease": now + timedelta(seconds=self.lease_s), "batch": batch},
            ).all()
        return [
            _Claimed(r[0], r[1], r[2], r[3], r[4], r[5], render(r[6], r[7], r[8], r[9], r[10]))
            for r in rows
        ]

    def _try(self, claimed: _Claimed) -> None:
        started = utcnow()
        status: int | None = None
        error: str | None = None
        try:
            if claimed.target == "webhook":
                if self.sender is None or claimed.url is None:
                    raise WebhookError("webhooks are not configured here (no WEBHOOK_SECRET)")
                status = self.sender.send(claimed.url, claimed.event.id, body(claimed.event))
            else:
                assert claimed.queue_name is not None and claimed.actor_name is not None
                self.reply(
                    claimed.queue_name, claimed.actor_name, claimed.event.model_dump(mode="json")
                )
        except WebhookError as exc:
            status, error = exc.http_status, str(exc)
        except Exception as exc:  # the broker away, mostly: retried like a webhook
            error = f"{type(exc).__name__}: {str(exc)[:200]}"
        now = utcnow()
        ms = int((now - started).total_seconds() * 1000)
        params = {
            "id": claimed.id,
            "ok": error is None,
            "now": now,
            "next": now
            + timedelta(seconds=backoff_s(claimed.tries, self.ctx.settings.webhook_max_backoff_s)),
            "error": error,
            "http_status": status,
            "ms": ms,
        }
        with self.ctx.conn() as conn:
            state = conn.exec_driver_sql(_RECORD, params).scalar()
        fields = {
            "event_id": claimed.event.id,
            "event_type": claimed.event.type,
            "message_id": claimed.event.data.id,
            "target": claimed.target,
            "tries": claimed.tries,
        }
        if error is None:
            log.info("event.delivered", **fields)
        elif state == "dead":
            log.error("event.dead", error=error, **fields)
        else:
            log.warning("event.retry_scheduled", error=error, **fields)


# -- the feed ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Scope:
    """Which events a caller may see: its producer's (issue 13). Every feed query
    filters through `_visible`, the one place that says so."""

    producer: str


def _visible(scope: Scope) -> tuple[str, dict[str, Any]]:
    """A condition on `m` (the event's message) for `scope`, and its parameters."""
    return "m.producer = %(scope_producer)s", {"scope_producer": scope.producer}


_COLUMNS = "e.id, e.type, e.created_at, e.data, e.detail"


class UnknownCursor(LookupError):
    """`after` names no event the feed has listed."""


def page(ctx: Context, scope: Scope, *, after: str | None, limit: int) -> EventPage:
    """Events in feed order after the event `after` (from the start when None)."""
    limit = max(1, min(limit, MAX_PAGE))
    with ctx.conn() as conn:
        cursor = 0
        if after is not None:
            visible, params = _visible(scope)
            found = conn.exec_driver_sql(
                "SELECT e.feed_seq FROM events e JOIN messages m ON m.id = e.message_id "
                f"WHERE e.id = %(id)s AND {visible}",
                {"id": after, **params},
            ).first()
            if found is None or found[0] is None:
                raise UnknownCursor(after)
            cursor = found[0]
        visible, params = _visible(scope)
        rows = conn.exec_driver_sql(
            f"SELECT {_COLUMNS} FROM events e JOIN messages m ON m.id = e.message_id "
            f"WHERE e.feed_seq > %(cursor)s AND {visible} "
            "ORDER BY e.feed_seq LIMIT %(limit)s",
            {"cursor": cursor, "limit": limit, **params},
        ).all()
    events = [render(*r) for r in rows]
    return EventPage(events=events, next_after=events[-1].id if events else after)


_DELIVERIES = """
SELECT d.id, d.target, d.url, d.queue_name, d.actor_name, d.state, d.tries,
       d.next_try_at, d.last_error, d.delivered_at
  FROM event_deliveries d WHERE d.event_id = %(id)s ORDER BY d.target
"""
_TRIES = """
SELECT t.delivery_id, t.at, t.http_status, t.error, t.duration_ms
  FROM delivery_tries t JOIN event_deliveries d ON d.id = t.delivery_id
 WHERE d.event_id = %(id)s ORDER BY t.id
"""


def detail(ctx: Context, scope: Scope, event_id: str) -> EventDetailView | None:
    """One event with each delivery and every try of it."""
    visible, params = _visible(scope)
    with ctx.conn() as conn:
        row = conn.exec_driver_sql(
            f"SELECT {_COLUMNS} FROM events e JOIN messages m ON m.id = e.message_id "
            f"WHERE e.id = %(id)s AND {visible}",
            {"id": event_id, **params},
        ).first()
        if row is None:
            return None
        deliveries = conn.exec_driver_sql(_DELIVERIES, {"id": event_id}).all()
        tries = conn.exec_driver_sql(_TRIES, {"id": event_id}).all()
    history: dict[int, list[DeliveryTryView]] = {}
    for t in tries:
        history.setdefault(t[0], []).append(
            DeliveryTryView(at=t[1], http_status=t[2], error=t[3], duration_ms=t[4])
        )
    event = render(*row)
    return EventDetailView(
        **event.model_dump(),
        deliveries=[
            DeliveryView(
                target=d[1],
                url=d[2],
                queue_name=d[3],
                actor_name=d[4],
                state=d[5],
                tries=d[6],
                next_try_at=d[7] if d[5] == "pending" else None,
                last_error=d[8],
                delivered_at=d[9],
                history=history.get(d[0], []),
            )
            for d in deliveries
        ],
    )


def redeliver(ctx: Context, scope: Scope, event_id: str) -> int | None:
    """Send an event's dead deliveries again, with a fresh horizon: how many; None when
    there is no such event."""
    now = utcnow()
    until = now + timedelta(seconds=ctx.settings.webhook_retry_horizon_s)
    visible, params = _visible(scope)
    with ctx.conn() as conn:
        found = conn.exec_driver_sql(
            f"SELECT e.id FROM events e JOIN messages m ON m.id = e.message_id "
            f"WHERE e.id = %(id)s AND {visible}",
            {"id": event_id, **params},
        ).first()
        if found is None:
            return None
        revived = conn.exec_driver_sql(
            "UPDATE event_deliveries SET state = 'pending', next_try_at = %(now)s, "
            "retry_until = %(until)s, updated_at = %(now)s "
            "WHERE event_id = %(id)s AND state = 'dead' RETURNING id",
            {"id": event_id, "now": now, "until": until},
        ).all()
    if revived:
        log.info("event.redelivery", event_id=event_id, deliveries=len(revived))
    return len(revived)
