"""api tokens: the bearer tokens of the HTTP API, as SHA-256 hashes only

Revision ID: 0012_api_tokens
Revises: 0011_audit_keyed

``keyrotor tokens create ACTOR`` prints a token once and stores its SHA-256 here; ``keyrotor
serve`` looks a presented token up by its hash. A token names exactly one actor (never the
grants' wildcard ``*``), expires when ``expires_at`` passes and stops working when revoked.
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0012_api_tokens"
down_revision: str | Sequence[str] | None = "0011_audit_keyed"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table(
        "api_tokens",
        sa.Column("id", sa.BigInteger(), sa.Identity(always=False), nullable=False),
        sa.Column("actor", sa.Text(), nullable=False),
        sa.Column("token_hash", sa.LargeBinary(), nullable=False),
        sa.Column("created_by", sa.Text(), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), server_default=sa.text("now()"), nullable=False),
        sa.Column("expires_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("revoked_at", sa.DateTime(timezone=True), nullable=True),
        sa.PrimaryKeyConstraint("id", name="pk_api_tokens"),
        sa.UniqueConstraint("token_hash", name="uq_api_tokens_token_hash"),
        sa.CheckConstraint("length(token_hash) = 32", name="ck_api_tokens_hash_length"),
        sa.CheckConstraint("actor <> '*'", name="ck_api_tokens_no_wildcard"),
    )


def downgrade() -> None:
    op.drop_table("api_tokens")
