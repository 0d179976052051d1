"""What the operations console and the scrape-time gauges read (issue 11): delivery per
channel, the backlog, kod.mobi's errors, and one message's whole story.

The SQL lives here, named; each statement is read-only and bounded (a time window on an
indexed column, or a LIMIT). Nothing returned carries a code: not the ciphertext, not
kod.mobi's `aes256:` copy, and `code` fields in raw callback bodies are blanked."""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any

from pydantic_core import PydanticCustomError
from sqlalchemy import text
from sqlalchemy.orm import Session

from worker.logging import mask_recipient
from worker.schemas import is_ulid, normalise_recipient
from worker.usecases.context import Context, utcnow

#: The longest lookup query taken: an email address is at most 254, a key 255.
MAX_QUERY_CHARS = 320
#: Messages shown for one recipient, newest first.
LOOKUP_LIMIT = 20
#: Failed messages listed on the overview.
LATEST_FAILED = 15
#: The overview's windows.
WINDOWS: tuple[tuple[str, timedelta], ...] = (
    ("last hour", timedelta(hours=1)),
    ("last 24 h", timedelta(hours=24)),
)
CHART_MINUTES = 60

QUERIES: dict[str, Any] = {
    "channel_stats": text(
        """
        SELECT a.channel,
               count(*) AS attempts,
               count(*) FILTER (WHERE a.status = 'delivered') AS delivered,
               count(*) FILTER (WHERE a.status = 'failed') AS failed,
               count(*) FILTER (WHERE a.status = 'timed_out') AS timed_out,
               count(*) FILTER (WHERE a.status = 'error') AS error,
               count(*) FILTER (WHERE EXISTS (
                   SELECT 1 FROM attempts n
                   WHERE n.message_id = a.message_id AND n.seq = a.seq + 1)) AS fell_back,
               percentile_cont(0.5) WITHIN GROUP (
                   ORDER BY extract(epoch FROM a.finished_at - m.created_at))
                   FILTER (WHERE a.status = 'delivered') AS p50,
               percentile_cont(0.95) WITHIN GROUP (
                   ORDER BY extract(epoch FROM a.finished_at - m.created_at))
                   FILTER (WHERE a.status = 'delivered') AS p95
        FROM attempts a JOIN messages m ON m.id = a.message_id
        WHERE a.created_at >= :since
        GROUP BY a.channel
        ORDER BY a.channel
        """
    ),
    "per_minute": text(
        """
        SELECT date_trunc('minute', a.created_at) AS minute,
               count(*) FILTER (WHERE a.status = 'delivered') AS delivered,
               count(*) FILTER (WHERE a.status IN ('failed', 'timed_out', 'error')) AS failed
        FROM attempts a
        WHERE a.created_at >= :since
        GROUP BY 1
        """
    ),
    "errors": text(
        """
        SELECT a.error_code, count(*) AS n
        FROM attempts a
        WHERE a.created_at >= :since AND a.error_code IS NOT NULL
        GROUP BY 1 ORDER BY 2 DESC, 1 LIMIT 20
        """
    ),
    "latest_failed": text(
        """
        SELECT id, recipient, channels, failure_reason, updated_at
        FROM messages
        WHERE status = 'failed'
        ORDER BY updated_at DESC LIMIT :limit
        """
    ),
    "backlog": text(
        """
        SELECT count(*) AS depth,
               coalesce(extract(epoch FROM now() - min(next_try_at)), 0) AS oldest_s
        FROM attempts
        WHERE status = 'queued' AND next_try_at <= now()
        """
    ),
    "open_attempts": text(
        """
        SELECT status, count(*) AS n FROM attempts
        WHERE status IN ('queued', 'sending', 'accepted')
        GROUP BY status
        """
    ),
    "messages_by_id": text("SELECT * FROM messages WHERE id = :value"),
    "messages_by_key": text("SELECT * FROM messages WHERE idempotency_key = :value"),
    "messages_by_recipient": text(
        "SELECT * FROM messages WHERE recipient = :value ORDER BY created_at DESC LIMIT :limit"
    ),
    "attempts_of": text(
        "SELECT * FROM attempts WHERE message_id = ANY(:ids) ORDER BY message_id, seq"
    ),
    "callbacks_of": text(
        """
        SELECT c.* FROM callback_events c JOIN attempts a ON a.id = c.attempt_id
        WHERE a.message_id = ANY(:ids) ORDER BY c.received_at, c.id
        """
    ),
}


# -- the backlog (also the scrape-time gauges) ------------------------------------------


@dataclass
class Backlog:
    depth: int
    oldest_s: float
    open_attempts: dict[str, int]


def backlog(ctx: Context) -> Backlog:
    with ctx.tx() as s:
        s.execute(text("SET LOCAL statement_timeout = 2000"))
        depth, oldest = s.execute(QUERIES["backlog"]).one()
        opened = {row.status: int(row.n) for row in s.execute(QUERIES["open_attempts"])}
    return Backlog(int(depth), max(0.0, float(oldest)), opened)


# -- the overview ------------------------------------------------------------------------


@dataclass
class ChannelStats:
    channel: str
    attempts: int
    delivered: int
    failed: int
    timed_out: int
    error: int
    fell_back: int
    p50_s: float | None
    p95_s: float | None

    @property
    def fallback_rate(self) -> float:
        return self.fell_back / self.attempts if self.attempts else 0.0


@dataclass
class Window:
    title: str
    channels: list[ChannelStats]


@dataclass
class Minute:
    at: datetime
    delivered: int
    failed: int


@dataclass
class FailedMessage:
    id: str
    recipient: str  # masked
    channels: list[str]
    reason: str
    at: datetime


@dataclass
class Overview:
    at: datetime
    windows: list[Window]
    minutes: list[Minute]
    errors: list[tuple[str, int]]
    backlog: Backlog
    latest_failed: list[FailedMessage]


def overview(ctx: Context) -> Overview:
    now = utcnow()
    with ctx.tx() as s:
        s.execute(text("SET LOCAL statement_timeout = 5000"))
        windows = [
            Window(title, _channel_stats(s, now - span)) for title, span in WINDOWS
        ]
        start = (now - timedelta(minutes=CHART_MINUTES - 1)).replace(second=0, microsecond=0)
        counted = {
            row.minute: (int(row.delivered), int(row.failed))
            for row in s.execute(QUERIES["per_minute"], {"since": start})
        }
        minutes = []
        for i in range(CHART_MINUTES):
            at = start + timedelta(minutes=i)
            delivered, failed = counted.get(at, (0, 0))
            minutes.append(Minute(at, delivered, failed))
        errors = [
            (row.error_code, int(row.n))
            for row in s.execute(QUERIES["errors"], {"since": now - timedelta(hours=24)})
        ]
        latest = [
            FailedMessage(
                row.id, mask_recipient(row.recipient), list(row.channels),
                row.failure_reason or "", row.updated_at,
            )
            for row in s.execute(QUERIES["latest_failed"], {"limit": LATEST_FAILED})
        ]
    return Overview(now, windows, minutes, errors, backlog(ctx), latest)


def _channel_stats(s: Session, since: datetime) -> list[ChannelStats]:
    return [
        ChannelStats(
            channel=row.channel,
            attempts=int(row.attempts),
            delivered=int(row.delivered),
            failed=int(row.failed),
            timed_out=int(row.timed_out),
            error=int(row.error),
            fell_back=int(row.fell_back),
            p50_s=None if row.p50 is None else float(row.p50),
            p95_s=None if row.p95 is None else float(row.p95),
        )
        for row in s.execute(QUERIES["channel_stats"], {"since": since})
    ]


# -- lookup: one message's story ---------------------------------------------------------


class BadQuery(ValueError):
    """The lookup query cannot be used (empty, too long); the message says why."""


@dataclass
class CallbackView:
    received_at: datetime
    method: str
    status_word: str
    outcome: str
    applied: bool
    duplicates: int
    raw_body: str  # recipient masked, codes blanked; escaped by the template


@dataclass
class AttemptView:
    seq: int
    channel: str
    status: str
    reason: str
    kodmobi_message_id: int | None
    error_code: str | None
    http_status: int | None
    tries: int
    created_at: datetime
    sent_at: datetime | None
    accepted_at: datetime | None
    finished_at: datetime | None
    callbacks: list[CallbackView] = field(default_factory=list)


@dataclass
class MessageStory:
    id: str
    idempotency_key: str
    source: str
    recipient: str  # masked
    recipient_kind: str
    channels: list[str]
    status: str
    failure_reason: str | None
    created_at: datetime
    expires_at: datetime
    delivered_at: datetime | None
    check_count: int
    attempts: list[AttemptView]

    @property
    def fallbacks(self) -> list[tuple[str, str, str]]:
        """`(from, to, why)` for each fallback, in order."""
        return [
            (a.channel, b.channel, a.reason)
            for a, b in zip(self.attempts, self.attempts[1:], strict=False)
        ]


@dataclass
class Lookup:
    query: str
    #: what the query was taken as: "message id", "idempotency key", "recipient"
    matched_as: list[str]
    messages: list[MessageStory]


def lookup(ctx: Context, query: str) -> Lookup:
    """Messages matching `query` as a message id, an idempotency key or a full recipient."""
    query = query.strip()
    if not query:
        raise BadQuery("enter a message id, an idempotency key or a full recipient")
    if len(query) > MAX_QUERY_CHARS:
        raise BadQuery(f"the query is {len(query)} characters long; at most {MAX_QUERY_CHARS}")
    if "\x00" in query:
        raise BadQuery("the query holds a NUL character")
    found: dict[str, Any] = {}
    matched: list[str] = []
    with ctx.tx() as s:
        s.execute(text("SET LOCAL statement_timeout = 5000"))
        if is_ulid(query.upper()):
            rows = s.execute(QUERIES["messages_by_id"], {"value": query.upper()}).all()
            if rows:
                matched.append("message id")
            found.update((r.id, r) for r in rows)
        rows = s.execute(QUERIES["messages_by_key"], {"value": query}).all()
        if rows:
            matched.append("idempotency key")
        found.update((r.id, r) for r in rows)
        try:
            recipient, _kind = normalise_recipient(query)
        except PydanticCustomError:
            recipient = None
        if recipient is not None:
            rows = s.execute(
                QUERIES["messages_by_recipient"], {"value": recipient, "limit": LOOKUP_LIMIT}
            ).all()
            if rows:
                matched.append("recipient")
            found.update((r.id, r) for r in rows)
        stories = _stories(s, list(found.values()))
    stories.sort(key=lambda m: m.created_at, reverse=True)
    return Lookup(query, matched, stories)


def message_story(ctx: Context, message_id: str) -> MessageStory | None:
    if not is_ulid(message_id):
        return None
    with ctx.tx() as s:
        rows = s.execute(QUERIES["messages_by_id"], {"value": message_id}).all()
        stories = _stories(s, list(rows))
    return stories[0] if stories else None


def _stories(s: Session, messages: list[Any]) -> list[MessageStory]:
    if not messages:
        return []
    ids = [m.id for m in messages]
    by_attempt: dict[str, list[CallbackView]] = {}
    recipients = {m.id: m.recipient for m in messages}
    attempts: dict[str, list[AttemptView]] = {i: [] for i in ids}
    attempt_message: dict[str, str] = {}
    for a in s.execute(QUERIES["attempts_of"], {"ids": ids}):
        attempt_message[a.id] = a.message_id
        by_attempt[a.id] = []
        attempts[a.message_id].append(
            AttemptView(
                seq=a.seq, channel=a.channel, status=a.status, reason=a.reason or "",
                kodmobi_message_id=a.kodmobi_message_id, error_code=a.error_code,
                http_status=a.http_status, tries=a.tries, created_at=a.created_at,
                sent_at=a.sent_at, accepted_at=a.accepted_at, finished_at=a.finished_at,
                callbacks=by_attempt[a.id],
            )
        )
    for c in s.execute(QUERIES["callbacks_of"], {"ids": ids}):
        recipient = recipients[attempt_message[c.attempt_id]]
        by_attempt[c.attempt_id].append(
            CallbackView(
                received_at=c.received_at, method=c.method, status_word=c.status_word,
                outcome=c.outcome, applied=c.applied, duplicates=c.duplicates,
                raw_body=shown_body(c.raw_body, recipient),
            )
        )
    return [
        MessageStory(
            id=m.id, idempotency_key=m.idempotency_key, source=m.source,
            recipient=mask_recipient(m.recipient), recipient_kind=m.recipient_kind,
            channels=list(m.channels), status=m.status, failure_reason=m.failure_reason,
            created_at=m.created_at, expires_at=m.expires_at, delivered_at=m.delivered_at,
            check_count=m.check_count, attempts=attempts[m.id],
        )
        for m in messages
    ]


_JSON_CODE = re.compile(r'("code"\s*:\s*)("(?:[^"\\]|\\.)*"|-?[0-9]+)', re.IGNORECASE)
_FORM_CODE = re.compile(r"((?:^|[&?])code=)[^&]*", re.IGNORECASE)
_BLANK = "•••"


def shown_body(raw: str, recipient: str) -> str:
    """A callback body as the console shows it: the recipient masked, any `code` blanked
    (kod.mobi's callback is undocumented: it might carry one). Escaping is the template's."""
    if recipient:
        raw = raw.replace(recipient, mask_recipient(recipient))
        if recipient.startswith("+"):
            raw = raw.replace("%2B" + recipient[1:], mask_recipient(recipient))
    raw = _JSON_CODE.sub(lambda m: m.group(1) + json.dumps(_BLANK), raw)
    return _FORM_CODE.sub(lambda m: m.group(1) + _BLANK, raw)

