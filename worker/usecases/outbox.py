"""Writing outcome events (issue 10, DESIGN §11): the outbox rows, each in the statement
that makes the change it reports, and who hears of them (`notify`).

An event's `data` is the message's view as `GET /v1/messages/{id}` shows it at that
moment. Data-modifying CTEs do not see each other's writes, so the view is built in SQL
from what the changing CTEs return (their new rows) and, for rows the statement leaves
alone, from the table as the statement found it. No code ever enters it."""

from __future__ import annotations

from collections.abc import Callable
from datetime import datetime
from typing import Any

from psycopg.types.json import Jsonb
from pydantic import ValidationError
from ulid import ULID

from worker.schemas import FINAL_EVENTS, Notify
from worker.settings import Settings


class NotifyRefused(Exception):
    """`notify` is well-formed but cannot be served here (webhooks not configured)."""

    def __init__(self, field: str, reason: str) -> None:
        super().__init__(f"{field}: {reason}")
        self.field = field
        self.reason = reason


def message_view(t: str) -> str:
    """The message's view (worker.schemas.MessageView, attempts aside) of row `t`."""
    return (
        f"jsonb_build_object('id', {t}.id, 'idempotency_key', {t}.idempotency_key, "
        f"'status', {t}.status, 'to', {t}.recipient, 'channels', to_jsonb({t}.channels), "
        f"'failure_reason', {t}.failure_reason, 'expires_at', {t}.expires_at, "
        f"'created_at', {t}.created_at, 'updated_at', {t}.updated_at, "
        f"'delivered_at', {t}.delivered_at, 'metadata', {t}.metadata)"
    )


def attempt_view(t: str) -> str:
    """An attempt's view (worker.schemas.AttemptView) of row `t`."""
    return (
        f"jsonb_build_object('id', {t}.id, 'seq', {t}.seq, 'channel', {t}.channel, "
        f"'status', {t}.status, 'reason', {t}.reason, 'error_code', {t}.error_code, "
        f"'http_status', {t}.http_status, 'kodmobi_message_id', {t}.kodmobi_message_id, "
        f"'tries', {t}.tries, 'created_at', {t}.created_at, 'sent_at', {t}.sent_at, "
        f"'accepted_at', {t}.accepted_at, 'finished_at', {t}.finished_at, "
        f"'deadline', {t}.deadline)"
    )


#: What a CTE changing attempts returns for the events' views.
ATTEMPT_RETURNING = f"RETURNING message_id, id, seq, {attempt_view('attempts')} AS v"
#: What a CTE changing messages returns for the events' views.
MESSAGE_RETURNING = f"RETURNING id, {message_view('messages')} AS v"

_INSERT = "INSERT INTO events (id, message_id, type, created_at, data, detail)"


def with_attempts(message: str, message_id: str, fresh: str | None) -> str:
    """`message` (a view without attempts) with every attempt of `message_id`: those in
    `fresh` (rows `message_id, id, seq, v` a CTE returned) as changed, the rest as found."""
    others = (
        f"SELECT t.seq, {attempt_view('t')} AS v FROM attempts t WHERE t.message_id = {message_id}"
    )
    if fresh is not None:
        others += f" AND t.id NOT IN (SELECT id FROM {fresh})"
        others = (
            f"SELECT f.seq, f.v FROM {fresh} f WHERE f.message_id = {message_id} UNION ALL {others}"
        )
    return (
        f"{message} || jsonb_build_object('attempts', COALESCE("
        f"(SELECT jsonb_agg(x.v ORDER BY x.seq) FROM ({others}) x), '[]'::jsonb))"
    )


def insert_one(
    *, id_param: str, type_sql: str, at_param: str, source: str, attempts: str | None
) -> str:
    """An INSERT of one event per row of `source` (rows `id, v`: a CTE that moved the
    message, so nothing is written when it moved nothing)."""
    data = with_attempts("s.v", "s.id", attempts)
    return (
        f"{_INSERT} SELECT {id_param}, s.id, {type_sql}, {at_param}, {data}, NULL::jsonb "
        f"FROM {source} s"
    )


def new_event(message_id: str, type_: str, at: datetime, detail: Any = None) -> dict[str, Any]:
    return {
        "id": str(ULID()),
        "message_id": message_id,
        "type": type_,
        "created_at": at.isoformat(),
        "detail": detail,
    }


def insert_recorded(
    events: list[dict[str, Any]],
    attempt_ctes: list[str],
    message_ctes: list[str],
    bind: Callable[[str, Any], str],
) -> list[str]:
    """CTEs writing `events` (recorded by the transitions) within a Changes statement whose
    attempt and message CTEs return ATTEMPT_RETURNING / MESSAGE_RETURNING rows."""
    parts: list[str] = []
    fresh = None
    if attempt_ctes:
        parts.append(
            "ea AS (" + " UNION ALL ".join(f"SELECT * FROM {c}" for c in attempt_ctes) + ")"
        )
        fresh = "ea"
    moved = ""
    if message_ctes:
        parts.append(
            "em AS (" + " UNION ALL ".join(f"SELECT * FROM {c}" for c in message_ctes) + ")"
        )
        moved = "SELECT id, v FROM em UNION ALL "
    rows = bind("ev_rows", Jsonb(events))
    ids = bind("ev_mids", sorted({e["message_id"] for e in events}))
    found = (
        f"SELECT t.id, {message_view('t')} AS v FROM messages t WHERE t.id = ANY({ids}::text[])"
        + (" AND t.id NOT IN (SELECT id FROM em)" if message_ctes else "")
    )
    data = with_attempts("m.v", "e.message_id", fresh)
    parts.append(
        f"ev AS ({_INSERT} SELECT e.id, e.message_id, e.type, e.created_at, {data}, e.detail "
        f"FROM jsonb_to_recordset({rows}) AS e(id text, message_id text, type text, "
        f"created_at timestamptz, detail jsonb) "
        f"JOIN ({moved}{found}) m ON m.id = e.message_id)"
    )
    return parts


# -- who hears of a message's events ---------------------------------------------------------


def subscription(settings: Settings, notify: Notify | None) -> dict[str, Any] | None:
    """What is stored as the message's `notify`: the request's, completed with NOTIFY_URL
    and the default events; None when nobody is to be told (the feed still has it all)."""
    if notify is None:
        if settings.notify_url is None:
            return None
        return {
            "url": settings.notify_url,
            "queue_name": None,
            "actor_name": None,
            "events": list(FINAL_EVENTS),
        }
    url = notify.url or settings.notify_url
    if notify.url and settings.webhook_secret is None:
        raise NotifyRefused("notify.url", "webhooks are not configured here (no WEBHOOK_SECRET)")
    if url is None and notify.queue_name is None:
        return None
    return {
        "url": url,
        "queue_name": notify.queue_name,
        "actor_name": notify.actor_name,
        "events": list(notify.events or FINAL_EVENTS),
    }


def subscription_of_raw(settings: Settings, raw: Any) -> dict[str, Any] | None:
    """The subscription of input being rejected for another reason: its own `notify` if
    that much is valid, else the default. Never raises."""
    notify = None
    if raw is not None:
        try:
            notify = Notify.model_validate(raw)
        except ValidationError:
            notify = None
    try:
        return subscription(settings, notify)
    except NotifyRefused:
        return subscription(settings, None)
