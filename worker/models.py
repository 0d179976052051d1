"""SQLAlchemy 2.0 models of messages, attempts and callback events (DESIGN §4)."""

from __future__ import annotations

from datetime import datetime
from typing import Any

from sqlalchemy import (
    BigInteger,
    Boolean,
    CheckConstraint,
    DateTime,
    ForeignKey,
    Identity,
    Index,
    Integer,
    LargeBinary,
    MetaData,
    Sequence,
    String,
    Text,
    UniqueConstraint,
    func,
    text,
)
from sqlalchemy.dialects.postgresql import ARRAY, JSONB
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column, relationship

from worker.rules import ATTEMPT_STATUSES, MESSAGE_STATUSES

NAMING = {
    "ix": "ix_%(column_0_label)s",
    "uq": "uq_%(table_name)s_%(column_0_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}


class Base(DeclarativeBase):
    metadata = MetaData(naming_convention=NAMING)


def _in(column: str, values: tuple[str, ...]) -> str:
    return f"{column} IN ({', '.join(repr(v) for v in values)})"


Timestamp = DateTime(timezone=True)


class Message(Base):
    """One code to deliver to one recipient, over a chain of channels."""

    __tablename__ = "messages"
    __table_args__ = (
        CheckConstraint(_in("status", MESSAGE_STATUSES), name="status"),
        # Limits count by the canonical recipient (issue 13).
        Index("ix_messages_recipient_key_created", "recipient_key", "created_at"),
        # Idempotency keys are unique per producer (issue 13).
        UniqueConstraint("producer", "idempotency_key", name="uq_messages_producer_key"),
        Index(
            "ix_messages_open_expires",
            "expires_at",
            postgresql_where=text("status IN ('queued', 'sending', 'sent')"),
        ),
        # The console and retention (migration 0003).
        Index("ix_messages_created_at", "created_at"),
        Index(
            "ix_messages_failed_updated",
            "updated_at",
            postgresql_where=text("status = 'failed'"),
        ),
        Index(
            "ix_messages_code_kept",
            "expires_at",
            postgresql_where=text("code_ciphertext IS NOT NULL"),
        ),
    )

    id: Mapped[str] = mapped_column(String(26), primary_key=True)
    #: The API_TOKENS producer that sent it; it alone reads, checks and finds it.
    producer: Mapped[str] = mapped_column(String(64), server_default="default")
    idempotency_key: Mapped[str] = mapped_column(String(255))
    #: HMAC of the normalised request: the same key with another body is a conflict.
    fingerprint: Mapped[str] = mapped_column(String(64))
    source: Mapped[str] = mapped_column(String(16))
    #: As given (domain lower-cased): what is sent.
    recipient: Mapped[str] = mapped_column(Text)
    #: Canonical (emails lower-cased): what limits and lookups compare.
    recipient_key: Mapped[str] = mapped_column(Text)
    recipient_kind: Mapped[str] = mapped_column(String(8))
    channels: Mapped[list[str]] = mapped_column(ARRAY(String(16)))
    provider_id: Mapped[int | None] = mapped_column(Integer)
    #: AES-GCM ciphertext under CODE_KEY; NULL only for rejected input.
    code_ciphertext: Mapped[bytes | None] = mapped_column(LargeBinary)
    status: Mapped[str] = mapped_column(String(16))
    failure_reason: Mapped[str | None] = mapped_column(Text)
    check_count: Mapped[int] = mapped_column(Integer, default=0, server_default="0")
    verified_at: Mapped[datetime | None] = mapped_column(Timestamp)
    meta: Mapped[dict[str, Any]] = mapped_column(
        "metadata", JSONB, default=dict, server_default=text("'{}'::jsonb")
    )
    created_at: Mapped[datetime] = mapped_column(Timestamp, server_default=func.now())
    updated_at: Mapped[datetime] = mapped_column(
        Timestamp, server_default=func.now(), onupdate=func.now()
    )
    expires_at: Mapped[datetime] = mapped_column(Timestamp)
    delivered_at: Mapped[datetime | None] = mapped_column(Timestamp)
    #: Who hears of this message's events (issue 10): url, queue_name, actor_name, events.
    notify: Mapped[dict[str, Any] | None] = mapped_column(JSONB)

    attempts: Mapped[list[Attempt]] = relationship(
        back_populates="message", order_by="Attempt.seq", lazy="select"
    )


class Attempt(Base):
    """One try of one channel for a message; kod.mobi's `message_id` once accepted."""

    __tablename__ = "attempts"
    __table_args__ = (
        UniqueConstraint("message_id", "seq", name="uq_attempts_message_seq"),
        CheckConstraint(_in("status", ATTEMPT_STATUSES), name="status"),
        Index("ix_attempts_queued_due", "next_try_at", postgresql_where=text("status = 'queued'")),
        Index(
            "ix_attempts_open_deadline",
            "deadline",
            postgresql_where=text("status IN ('sending', 'accepted')"),
        ),
        Index("ix_attempts_created_at", "created_at"),
    )

    id: Mapped[str] = mapped_column(String(26), primary_key=True)
    message_id: Mapped[str] = mapped_column(ForeignKey("messages.id", ondelete="CASCADE"))
    seq: Mapped[int] = mapped_column(Integer)
    channel: Mapped[str] = mapped_column(String(16))
    provider_id: Mapped[int | None] = mapped_column(Integer)
    status: Mapped[str] = mapped_column(String(16))
    #: Why this attempt ended the way it did (and why the next one exists).
    reason: Mapped[str | None] = mapped_column(Text)
    kodmobi_message_id: Mapped[int | None] = mapped_column(BigInteger)
    kodmobi_code: Mapped[str | None] = mapped_column(Text)
    error_code: Mapped[str | None] = mapped_column(String(64))
    http_status: Mapped[int | None] = mapped_column(Integer)
    tries: Mapped[int] = mapped_column(Integer, default=0, server_default="0")
    next_try_at: Mapped[datetime] = mapped_column(Timestamp, server_default=func.now())
    #: When the attempt was last handed to the broker; the sweeper re-dispatches stale ones.
    dispatched_at: Mapped[datetime | None] = mapped_column(Timestamp)
    #: Past this, an attempt in `sending`/`accepted` has timed out.
    deadline: Mapped[datetime | None] = mapped_column(Timestamp)
    created_at: Mapped[datetime] = mapped_column(Timestamp, server_default=func.now())
    updated_at: Mapped[datetime] = mapped_column(
        Timestamp, server_default=func.now(), onupdate=func.now()
    )
    sent_at: Mapped[datetime | None] = mapped_column(Timestamp)
    accepted_at: Mapped[datetime | None] = mapped_column(Timestamp)
    finished_at: Mapped[datetime | None] = mapped_column(Timestamp)

    message: Mapped[Message] = relationship(back_populates="attempts", lazy="raise")


class CallbackEvent(Base):
    """A callback as kod.mobi sent it; one row per (attempt, status word, kod.mobi message
    id), repeats counted."""

    __tablename__ = "callback_events"
    __table_args__ = (
        # A repeat is the same status about the same kod.mobi message; a callback about
        # another message_id must not shadow the genuine one that follows it.
        UniqueConstraint(
            "attempt_id",
            "status_word",
            "kodmobi_message_id",
            name="uq_callback_events_attempt_status",
            postgresql_nulls_not_distinct=True,
        ),
        Index("ix_callback_events_attempt_id", "attempt_id"),
    )

    id: Mapped[int] = mapped_column(BigInteger, primary_key=True, autoincrement=True)
    attempt_id: Mapped[str] = mapped_column(ForeignKey("attempts.id", ondelete="CASCADE"))
    received_at: Mapped[datetime] = mapped_column(Timestamp, server_default=func.now())
    method: Mapped[str] = mapped_column(String(8))
    content_type: Mapped[str | None] = mapped_column(Text)
    raw_body: Mapped[str] = mapped_column(Text)
    headers: Mapped[dict[str, Any]] = mapped_column(JSONB, default=dict)
    #: The status word as sent (lower-cased), `""` when there was none.
    status_word: Mapped[str] = mapped_column(String(64))
    #: delivered | failed | progress | unknown
    parsed_status: Mapped[str] = mapped_column(String(16))
    kodmobi_message_id: Mapped[int | None] = mapped_column(BigInteger)
    applied: Mapped[bool] = mapped_column(Boolean, default=False)
    #: Why it was or was not applied.
    outcome: Mapped[str] = mapped_column(Text)
    duplicates: Mapped[int] = mapped_column(Integer, default=0, server_default="0")


# -- Outcome events (issue 10, DESIGN §11) ------------------------------------------------

#: Feed order: given to events after they commit, by the one sequencer (worker.usecases.events).
events_feed_seq = Sequence("events_feed_seq", metadata=Base.metadata)


class Event(Base):
    """A message's status change or fallback, written in the transaction of the change
    (the outbox). `data` is the message's view at that moment, as the API shows it."""

    __tablename__ = "events"
    __table_args__ = (
        Index("ix_events_message_position", "message_id", "position"),
        Index("ix_events_unsequenced", "position", postgresql_where=text("feed_seq IS NULL")),
    )

    id: Mapped[str] = mapped_column(String(26), primary_key=True)
    #: Insert order; per message it is the order of the changes (the row lock orders them).
    position: Mapped[int] = mapped_column(BigInteger, Identity(always=False), unique=True)
    #: Commit order, for the feed; NULL until the sequencer has seen the event.
    feed_seq: Mapped[int | None] = mapped_column(BigInteger, unique=True)
    message_id: Mapped[str] = mapped_column(ForeignKey("messages.id", ondelete="CASCADE"))
    type: Mapped[str] = mapped_column(String(32))
    created_at: Mapped[datetime] = mapped_column(Timestamp)
    data: Mapped[dict[str, Any]] = mapped_column(JSONB)
    #: For `message.fallback`: from_channel, to_channel, reason.
    detail: Mapped[dict[str, Any] | None] = mapped_column(JSONB)


class EventDelivery(Base):
    """One event on its way to one subscriber: a webhook URL or a Dramatiq queue."""

    __tablename__ = "event_deliveries"
    __table_args__ = (
        UniqueConstraint("event_id", "target", name="uq_event_deliveries_event_target"),
        CheckConstraint("target IN ('webhook', 'dramatiq')", name="target"),
        CheckConstraint("state IN ('pending', 'delivered', 'dead')", name="state"),
        Index("ix_event_deliveries_due", "next_try_at", postgresql_where=text("state = 'pending'")),
        Index(
            "ix_event_deliveries_pending_order",
            "message_id",
            "target",
            "position",
            postgresql_where=text("state = 'pending'"),
        ),
    )

    id: Mapped[int] = mapped_column(BigInteger, primary_key=True, autoincrement=True)
    event_id: Mapped[str] = mapped_column(ForeignKey("events.id", ondelete="CASCADE"))
    message_id: Mapped[str] = mapped_column(String(26))
    #: The event's position: a later one waits until this one is delivered or dead.
    position: Mapped[int] = mapped_column(BigInteger)
    target: Mapped[str] = mapped_column(String(8))
    url: Mapped[str | None] = mapped_column(Text)
    queue_name: Mapped[str | None] = mapped_column(Text)
    actor_name: Mapped[str | None] = mapped_column(Text)
    state: Mapped[str] = mapped_column(String(12))
    tries: Mapped[int] = mapped_column(Integer, default=0, server_default="0")
    #: Due time; while a try is under way, the end of its lease.
    next_try_at: Mapped[datetime] = mapped_column(Timestamp)
    #: Past this a failed try makes the delivery `dead` (WEBHOOK_RETRY_HORIZON_S).
    retry_until: Mapped[datetime] = mapped_column(Timestamp)
    last_error: Mapped[str | None] = mapped_column(Text)
    created_at: Mapped[datetime] = mapped_column(Timestamp)
    updated_at: Mapped[datetime] = mapped_column(Timestamp)
    delivered_at: Mapped[datetime | None] = mapped_column(Timestamp)


class DeliveryTry(Base):
    """One try of a delivery: when, and the HTTP status or the error."""

    __tablename__ = "delivery_tries"
    __table_args__ = (Index("ix_delivery_tries_delivery", "delivery_id"),)

    id: Mapped[int] = mapped_column(BigInteger, primary_key=True, autoincrement=True)
    delivery_id: Mapped[int] = mapped_column(
        ForeignKey("event_deliveries.id", ondelete="CASCADE")
    )
    at: Mapped[datetime] = mapped_column(Timestamp)
    http_status: Mapped[int | None] = mapped_column(Integer)
    error: Mapped[str | None] = mapped_column(Text)
    duration_ms: Mapped[int] = mapped_column(Integer)
