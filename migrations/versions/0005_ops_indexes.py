"""Indexes for the operations console and retention (issue 11).

- messages.created_at: retention deletes the oldest first, in small batches;
- attempts.created_at: the console's per-channel windows (last hour, last 24 h);
- attempts.message_id: a message's attempts (lookup, retention), which the unique
  (message_id, seq) key already serves, so none is added for it;
- messages.updated_at where failed: the latest failed messages;
- messages.expires_at where a code is still kept: erasing codes whose window is over.

Revision ID: 0005
Revises: 0004
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0005"
down_revision: str | Sequence[str] | None = "0004"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_index("ix_messages_created_at", "messages", ["created_at"])
    op.create_index("ix_attempts_created_at", "attempts", ["created_at"])
    op.create_index("ix_callback_events_attempt_id", "callback_events", ["attempt_id"])
    op.create_index(
        "ix_messages_failed_updated",
        "messages",
        ["updated_at"],
        postgresql_where=sa.text("status = 'failed'"),
    )
    op.create_index(
        "ix_messages_code_kept",
        "messages",
        ["expires_at"],
        postgresql_where=sa.text("code_ciphertext IS NOT NULL"),
    )


def downgrade() -> None:
    op.drop_index("ix_messages_code_kept", "messages")
    op.drop_index("ix_messages_failed_updated", "messages")
    op.drop_index("ix_callback_events_attempt_id", "callback_events")
    op.drop_index("ix_attempts_created_at", "attempts")
    op.drop_index("ix_messages_created_at", "messages")
