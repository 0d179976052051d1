"""Producers scoped by their token: `messages.producer`, keys unique per producer.

A message belongs to the API_TOKENS producer that sent it; idempotency keys are unique
per producer, not globally (issue 13). Existing rows belong to `default`, the producer
of a bare token, so today's single-token deployments see what they saw before.

Revision ID: 0004
Revises: 0003
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0004"
down_revision: str | Sequence[str] | None = "0003"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.add_column(
        "messages",
        sa.Column("producer", sa.String(length=64), server_default="default", nullable=False),
    )
    op.create_unique_constraint(
        "uq_messages_producer_key", "messages", ["producer", "idempotency_key"]
    )
    op.drop_constraint("uq_messages_idempotency_key", "messages", type_="unique")


def downgrade() -> None:
    # Fails if two producers used the same key: that data cannot go back to one scope.
    op.create_unique_constraint("uq_messages_idempotency_key", "messages", ["idempotency_key"])
    op.drop_constraint("uq_messages_producer_key", "messages", type_="unique")
    op.drop_column("messages", "producer")
