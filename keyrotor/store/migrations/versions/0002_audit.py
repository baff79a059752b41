"""audit log

Revision ID: 0002_audit
Revises: 0001_initial
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

revision: str = "0002_audit"
down_revision: str | Sequence[str] | None = "0001_initial"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table(
        "encryption_audit_log",
        sa.Column("id", sa.BigInteger(), sa.Identity(), primary_key=True),
        sa.Column("seq", sa.BigInteger(), nullable=False, unique=True),
        sa.Column("event_type", sa.Text(), nullable=False),
        sa.Column("scope", sa.Text()),
        sa.Column("key_version", sa.Integer()),
        sa.Column("success", sa.Boolean(), nullable=False),
        sa.Column("actor", sa.Text()),
        sa.Column("ip_address", sa.Text()),
        sa.Column("user_agent", sa.Text()),
        sa.Column("error_message", sa.Text()),
        sa.Column("metadata", postgresql.JSONB(), nullable=False, server_default=sa.text("'{}'::jsonb")),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("prev_hash", sa.LargeBinary(), nullable=False),
        sa.Column("row_hash", sa.LargeBinary(), nullable=False),
        sa.CheckConstraint(
            "event_type IN ('encrypt', 'decrypt', 'failed_decrypt', 'rotate', 'rewrap', 'retire', "
            "'unauthorized', 'config_change', 'replica_check', 'failover', 'anchor')",
            name="ck_encryption_audit_log_event_type",
        ),
    )
    op.create_index("ix_encryption_audit_log_created_at", "encryption_audit_log", ["created_at"])
    op.create_index("ix_encryption_audit_log_scope_created", "encryption_audit_log", ["scope", "created_at"])
    op.create_index(
        "ix_encryption_audit_log_event_created", "encryption_audit_log", ["event_type", "created_at"]
    )


def downgrade() -> None:
    op.drop_table("encryption_audit_log")
