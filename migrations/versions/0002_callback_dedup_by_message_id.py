"""Deduplicate callbacks by (attempt, status word, kod.mobi message id).

A callback naming another kod.mobi message is recorded and not applied; it must not
make the genuine callback with the same status word look like a repeat.

Revision ID: 0002
Revises: 0001
"""

from collections.abc import Sequence

from alembic import op

revision: str = "0002"
down_revision: str | Sequence[str] | None = "0001"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.drop_constraint("uq_callback_events_attempt_status", "callback_events", type_="unique")
    op.create_unique_constraint(
        "uq_callback_events_attempt_status",
        "callback_events",
        ["attempt_id", "status_word", "kodmobi_message_id"],
        postgresql_nulls_not_distinct=True,
    )


def downgrade() -> None:
    op.drop_constraint("uq_callback_events_attempt_status", "callback_events", type_="unique")
    op.create_unique_constraint(
        "uq_callback_events_attempt_status", "callback_events", ["attempt_id", "status_word"]
    )
