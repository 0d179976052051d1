"""Outcome events (issue 10): the outbox `events`, their deliveries and delivery tries;
`notify` on messages.

Revision ID: 0006
Revises: 0005
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

revision: str = "0006"
down_revision: str | Sequence[str] | None = "0005"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.execute("CREATE SEQUENCE events_feed_seq")
    op.create_table(
        "events",
        sa.Column("id", sa.String(length=26), nullable=False),
        sa.Column("position", sa.BigInteger(), sa.Identity(always=False), nullable=False),
        sa.Column("feed_seq", sa.BigInteger(), nullable=True),
        sa.Column("message_id", sa.String(length=26), nullable=False),
        sa.Column("type", sa.String(length=32), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("data", postgresql.JSONB(astext_type=sa.Text()), nullable=False),
        sa.Column("detail", postgresql.JSONB(astext_type=sa.Text()), nullable=True),
        sa.ForeignKeyConstraint(
            ["message_id"],
            ["messages.id"],
            name=op.f("fk_events_message_id_messages"),
            ondelete="CASCADE",
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_events")),
        sa.UniqueConstraint("feed_seq", name=op.f("uq_events_feed_seq")),
        sa.UniqueConstraint("position", name=op.f("uq_events_position")),
    )
    op.create_index(
        "ix_events_message_position", "events", ["message_id", "position"], unique=False
    )
    op.create_index(
        "ix_events_unsequenced",
        "events",
        ["position"],
        unique=False,
        postgresql_where=sa.text("feed_seq IS NULL"),
    )
    op.create_table(
        "event_deliveries",
        sa.Column("id", sa.BigInteger(), autoincrement=True, nullable=False),
        sa.Column("event_id", sa.String(length=26), nullable=False),
        sa.Column("message_id", sa.String(length=26), nullable=False),
        sa.Column("position", sa.BigInteger(), nullable=False),
        sa.Column("target", sa.String(length=8), nullable=False),
        sa.Column("url", sa.Text(), nullable=True),
        sa.Column("queue_name", sa.Text(), nullable=True),
        sa.Column("actor_name", sa.Text(), nullable=True),
        sa.Column("state", sa.String(length=12), nullable=False),
        sa.Column("tries", sa.Integer(), server_default="0", nullable=False),
        sa.Column("next_try_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("retry_until", sa.DateTime(timezone=True), nullable=False),
        sa.Column("last_error", sa.Text(), nullable=True),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("delivered_at", sa.DateTime(timezone=True), nullable=True),
        sa.CheckConstraint(
            "state IN ('pending', 'delivered', 'dead')", name=op.f("ck_event_deliveries_state")
        ),
        sa.CheckConstraint(
            "target IN ('webhook', 'dramatiq')", name=op.f("ck_event_deliveries_target")
        ),
        sa.ForeignKeyConstraint(
            ["event_id"],
            ["events.id"],
            name=op.f("fk_event_deliveries_event_id_events"),
            ondelete="CASCADE",
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_event_deliveries")),
        sa.UniqueConstraint("event_id", "target", name="uq_event_deliveries_event_target"),
    )
    op.create_index(
        "ix_event_deliveries_due",
        "event_deliveries",
        ["next_try_at"],
        unique=False,
        postgresql_where=sa.text("state = 'pending'"),
    )
    op.create_index(
        "ix_event_deliveries_pending_order",
        "event_deliveries",
        ["message_id", "target", "position"],
        unique=False,
        postgresql_where=sa.text("state = 'pending'"),
    )
    op.create_table(
        "delivery_tries",
        sa.Column("id", sa.BigInteger(), autoincrement=True, nullable=False),
        sa.Column("delivery_id", sa.BigInteger(), nullable=False),
        sa.Column("at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("http_status", sa.Integer(), nullable=True),
        sa.Column("error", sa.Text(), nullable=True),
        sa.Column("duration_ms", sa.Integer(), nullable=False),
        sa.ForeignKeyConstraint(
            ["delivery_id"],
            ["event_deliveries.id"],
            name=op.f("fk_delivery_tries_delivery_id_event_deliveries"),
            ondelete="CASCADE",
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_delivery_tries")),
    )
    op.create_index("ix_delivery_tries_delivery", "delivery_tries", ["delivery_id"], unique=False)
    op.add_column(
        "messages", sa.Column("notify", postgresql.JSONB(astext_type=sa.Text()), nullable=True)
    )


def downgrade() -> None:
    op.drop_column("messages", "notify")
    op.drop_index("ix_delivery_tries_delivery", table_name="delivery_tries")
    op.drop_table("delivery_tries")
    op.drop_index(
        "ix_event_deliveries_pending_order",
        table_name="event_deliveries",
        postgresql_where=sa.text("state = 'pending'"),
    )
    op.drop_index(
        "ix_event_deliveries_due",
        table_name="event_deliveries",
        postgresql_where=sa.text("state = 'pending'"),
    )
    op.drop_table("event_deliveries")
    op.drop_index(
        "ix_events_unsequenced", table_name="events", postgresql_where=sa.text("feed_seq IS NULL")
    )
    op.drop_index("ix_events_message_position", table_name="events")
    op.drop_table("events")
    op.execute("DROP SEQUENCE events_feed_seq")
