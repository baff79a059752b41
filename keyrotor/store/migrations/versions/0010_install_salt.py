"""install salt: 32 random bytes that make this install's local KEK derivation its own

Revision ID: 0010_install_salt
Revises: 0009_key_types

The local KEK provider derives its KEK from ``ENCRYPTION_KEY`` with this salt (see
``keyrotor.kek.local``), so two installs with the same passphrase get different KEKs and a guess
tested against one database dump says nothing about another. One row, written once here; it is
not secret, only unique, and never changes (changing it would orphan every DEK wrapped since).
"""

from __future__ import annotations

import os
from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0010_install_salt"
down_revision: str | Sequence[str] | None = "0009_key_types"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    table = op.create_table(
        "install_salt",
        sa.Column("id", sa.SmallInteger(), server_default=sa.text("1"), nullable=False),
        sa.Column("salt", sa.LargeBinary(), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), server_default=sa.text("now()"), nullable=False),
        sa.PrimaryKeyConstraint("id", name="pk_install_salt"),
        sa.CheckConstraint("id = 1", name="ck_install_salt_one_row"),
        sa.CheckConstraint("length(salt) = 32", name="ck_install_salt_length"),
    )
    # Every role that opens the KEK provider reads it (deploy/postgres/roles.sql grants SELECT);
    # only the owner may change it.
    op.bulk_insert(table, [{"id": 1, "salt": os.urandom(32)}])


def downgrade() -> None:
    op.drop_table("install_salt")
