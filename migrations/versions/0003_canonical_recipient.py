"""Canonical recipients: limits compare `recipient_key` (emails lower-cased).

`Victim@example.com` and `victim@example.com` are one mailbox: limits counted them
apart (issue 13). The address as given stays in `recipient`; it is what is sent.

Revision ID: 0003
Revises: 0002
"""

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0003"
down_revision: str | Sequence[str] | None = "0002"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.add_column("messages", sa.Column("recipient_key", sa.Text(), nullable=True))
    op.execute(
        "UPDATE messages SET recipient_key = "
        "CASE WHEN position('@' in recipient) > 0 THEN lower(recipient) ELSE recipient END"
    )
    op.alter_column("messages", "recipient_key", nullable=False)
    op.create_index(
        "ix_messages_recipient_key_created", "messages", ["recipient_key", "created_at"]
    )
    op.drop_index("ix_messages_recipient_created", table_name="messages")


def downgrade() -> None:
    op.create_index("ix_messages_recipient_created", "messages", ["recipient", "created_at"])
    op.drop_index("ix_messages_recipient_key_created", table_name="messages")
    op.drop_column("messages", "recipient_key")
