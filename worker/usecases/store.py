"""The hot path's storage: rows as small dataclasses, their changes collected while the
rules decide, and one statement (data-modifying CTEs) that writes them all.

No ORM unit of work here: SQL goes to the driver as written (`exec_driver_sql`), and
psycopg prepares what repeats. The ORM models stay for migrations and reads."""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from psycopg.types.json import Jsonb
from sqlalchemy import Connection

from worker import rules
from worker.usecases import outbox


def in_list(values: tuple[str, ...] | frozenset[str]) -> str:
    """A SQL list of status words, from the rules (never from input)."""
    return "(" + ", ".join(f"'{v}'" for v in sorted(values)) + ")"


@dataclass(slots=True)
class MessageRow:
    id: str
    recipient: str
    channels: list[str]
    status: str
    expires_at: datetime
    code_ciphertext: bytes | None
    source: str
    created_at: datetime


#: The columns of a MessageRow, in its order.
MESSAGE_COLUMNS = "id, recipient, channels, status, expires_at, code_ciphertext, source, created_at"
_M = len(MESSAGE_COLUMNS.split(","))


@dataclass(slots=True)
class AttemptRow:
    id: str
    message_id: str
    seq: int
    channel: str
    provider_id: int | None
    status: str
    tries: int
    next_try_at: datetime
    kodmobi_message_id: int | None


_PAIR_COLUMNS = (
    ", ".join(f"m.{c.strip()}" for c in MESSAGE_COLUMNS.split(",")) + ", "
    "a.id, a.message_id, a.seq, a.channel, a.provider_id, a.status, a.tries, "
    "a.next_try_at, a.kodmobi_message_id"
)
#: An attempt and its message, both rows locked for the transaction.
LOCK_PAIR = (
    f"SELECT {_PAIR_COLUMNS} FROM attempts a JOIN messages m ON m.id = a.message_id "
    "WHERE a.id = %(attempt_id)s FOR UPDATE"
)


def pair(row: Any) -> tuple[MessageRow, AttemptRow]:
    return MessageRow(*row[:_M]), AttemptRow(*row[_M:])


def lock_pair(conn: Connection, attempt_id: str) -> tuple[MessageRow, AttemptRow] | None:
    row = conn.exec_driver_sql(LOCK_PAIR, {"attempt_id": attempt_id}).first()
    return None if row is None else pair(row)


_LOCK_PAIRS = (
    f"SELECT {_PAIR_COLUMNS} FROM attempts a JOIN messages m ON m.id = a.message_id "
    "WHERE a.id = ANY(%(attempt_ids)s::text[]) ORDER BY a.id FOR UPDATE"
)


def lock_pairs(
    conn: Connection, attempt_ids: list[str]
) -> dict[str, tuple[MessageRow, AttemptRow]]:
    """Several attempts and their messages, locked in attempt-id order. Attempts of one
    message share one MessageRow, so a change through one is seen through the other."""
    if len(attempt_ids) == 1:
        one = lock_pair(conn, attempt_ids[0])
        return {} if one is None else {one[1].id: one}
    messages: dict[str, MessageRow] = {}
    found: dict[str, tuple[MessageRow, AttemptRow]] = {}
    for row in conn.exec_driver_sql(_LOCK_PAIRS, {"attempt_ids": attempt_ids}):
        message = messages.setdefault(row[0], MessageRow(*row[:_M]))
        attempt = AttemptRow(*row[_M:])
        found[attempt.id] = (message, attempt)
    return found


def select_pairs(where: str, *, limit: int, skip_locked: bool) -> str:
    """Pairs matching `where` (over `a` and `m`), locked, oldest first."""
    lock = "FOR UPDATE SKIP LOCKED" if skip_locked else "FOR UPDATE"
    return (
        f"SELECT {_PAIR_COLUMNS} FROM attempts a JOIN messages m ON m.id = a.message_id "
        f"WHERE {where} LIMIT {int(limit)} {lock}"
    )


@dataclass
class Changes:
    """What the rules decided for rows held under lock; `write` sends it in one statement.

    Setting a value also sets it on the row, so later decisions in the same transaction
    see it."""

    attempts: dict[str, dict[str, Any]] = field(default_factory=dict)
    messages: dict[str, dict[str, Any]] = field(default_factory=dict)
    inserted: list[dict[str, Any]] = field(default_factory=list)
    #: (message id, note, now): close every other open attempt of the message.
    close_open: list[tuple[str, str, datetime]] = field(default_factory=list)
    #: Outcome events to write with the changes (worker.usecases.outbox).
    events: list[dict[str, Any]] = field(default_factory=list)

    def attempt(self, row: AttemptRow, **values: Any) -> None:
        for key, value in values.items():
            if key in AttemptRow.__slots__:
                setattr(row, key, value)
        self.attempts.setdefault(row.id, {}).update(values)

    def message(self, row: MessageRow, **values: Any) -> None:
        for key, value in values.items():
            if key in MessageRow.__slots__:
                setattr(row, key, value)
        self.messages.setdefault(row.id, {}).update(values)

    def insert_attempt(self, **values: Any) -> None:
        self.inserted.append(values)

    def close_open_attempts(self, message_id: str, note: str, now: datetime) -> None:
        self.close_open.append((message_id, note, now))

    def event(self, message_id: str, type_: str, at: datetime, detail: Any = None) -> None:
        """Record outcome event `type_` of a message changed here (the outbox, issue 10)."""
        self.events.append(outbox.new_event(message_id, type_, at, detail))

    def __bool__(self) -> bool:
        return bool(
            self.attempts or self.messages or self.inserted or self.close_open or self.events
        )

    def statement(self, tail: str | None = None) -> tuple[str, dict[str, Any]]:
        """One SQL statement writing every change (each a CTE), ending in `tail` (a final
        statement, e.g. an INSERT … RETURNING) or `SELECT 1`."""
        parts: list[str] = []
        params: dict[str, Any] = {}

        def bind(name: str, value: Any) -> str:
            params[name] = Jsonb(value) if isinstance(value, dict) else value
            return f"%({name})s"

        # With events to write, the changing CTEs return their new rows for the views.
        attempt_ctes: list[str] = []
        message_ctes: list[str] = []

        def returning(names: list[str], clause: str) -> str:
            if not self.events:
                return ""
            names.append(f"w{len(parts)}")
            return " " + clause

        for table, rows in (("attempts", self.attempts), ("messages", self.messages)):
            names, clause = (
                (attempt_ctes, outbox.ATTEMPT_RETURNING)
                if table == "attempts"
                else (message_ctes, outbox.MESSAGE_RETURNING)
            )
            for i, (row_id, values) in enumerate(rows.items()):
                p = f"{table[0]}{i}_"
                sets = ", ".join(f"{col} = {bind(p + col, v)}" for col, v in values.items())
                parts.append(
                    f"UPDATE {table} SET {sets} WHERE id = {bind(p + 'id', row_id)}"
                    + returning(names, clause)
                )
        for i, values in enumerate(self.inserted):
            p = f"n{i}_"
            cols = ", ".join(values)
            vals = ", ".join(bind(p + col, v) for col, v in values.items())
            parts.append(
                f"INSERT INTO attempts ({cols}) VALUES ({vals})"
                + returning(attempt_ctes, outbox.ATTEMPT_RETURNING)
            )
        for i, (message_id, note, now) in enumerate(self.close_open):
            p = f"c{i}_"
            # An attempt updated above is not "open" any more (one statement: CTEs see
            # none of each other's writes, so it is left out here by id).
            parts.append(
                f"UPDATE attempts SET status = '{rules.ERROR}', "
                f"reason = concat_ws('; ', reason, {bind(p + 'note', note)}::text), "
                f"finished_at = {bind(p + 'now', now)}, updated_at = {bind(p + 'now', now)} "
                f"WHERE message_id = {bind(p + 'mid', message_id)} "
                f"AND status IN {in_list(rules.ATTEMPT_OPEN)} "
                f"AND NOT (id = ANY({bind(p + 'done', list(self.attempts))}::text[]))"
                + returning(attempt_ctes, outbox.ATTEMPT_RETURNING)
            )
        final = tail or "SELECT 1"
        if not parts and not self.events:
            return final, params
        ctes = [f"w{i} AS ({sql})" for i, sql in enumerate(parts)]
        if self.events:
            ctes += outbox.insert_recorded(self.events, attempt_ctes, message_ctes, bind)
        return f"WITH {', '.join(ctes)} {final}", params

    def write(self, conn: Connection) -> None:
        if self:
            sql, params = self.statement()
            conn.exec_driver_sql(sql, params)
