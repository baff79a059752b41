"""initial schema

Revision ID: 0001_initial
Revises:
Create Date: 2026-11-28 18:53:47.585579
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

revision: str = "0001_initial"
down_revision: str | Sequence[str] | None = None
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table(
        "key_scopes",
        sa.Column("id", sa.BigInteger(), autoincrement=True, nullable=False),
        sa.Column("name", sa.Text(), nullable=False),
        sa.Column("active_version", sa.Integer(), nullable=False),
        sa.Column("latest_version", sa.Integer(), nullable=False),
        sa.Column("rotation_enabled", sa.Boolean(), server_default=sa.text("true"), nullable=False),
        sa.Column("interval_days", sa.Integer(), server_default=sa.text("90"), nullable=False),
        sa.Column("grace_period_days", sa.Integer(), server_default=sa.text("7"), nullable=False),
        sa.Column("max_encryptions", sa.BigInteger(), nullable=True),
        sa.Column("next_rotation_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("last_rotation_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("dek_rotation_count", sa.Integer(), server_default=sa.text("0"), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), server_default=sa.text("now()"), nullable=False),
        sa.Column("updated_at", sa.DateTime(timezone=True), server_default=sa.text("now()"), nullable=False),
        sa.CheckConstraint(
            "active_version >= 1 AND latest_version >= active_version", name=op.f("ck_key_scopes_versions")
        ),
        sa.CheckConstraint(
            "grace_period_days >= 0 AND grace_period_days <= interval_days", name=op.f("ck_key_scopes_grace")
        ),
        sa.CheckConstraint("interval_days BETWEEN 1 AND 365", name=op.f("ck_key_scopes_interval_days")),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_key_scopes")),
        sa.UniqueConstraint("name", name=op.f("uq_key_scopes_name")),
    )
    op.create_index(op.f("ix_key_scopes_next_rotation_at"), "key_scopes", ["next_rotation_at"], unique=False)
    op.create_table(
        "data_keys",
        sa.Column("id", sa.BigInteger(), autoincrement=True, nullable=False),
        sa.Column("scope_id", sa.BigInteger(), nullable=False),
        sa.Column("version", sa.Integer(), nullable=False),
        sa.Column("state", sa.Text(), nullable=False),
        sa.Column("encrypted_dek", sa.LargeBinary(), nullable=True),
        sa.Column("kek_id", sa.Text(), nullable=False),
        sa.Column("kek_version", sa.Integer(), nullable=False),
        sa.Column("encryptions", sa.BigInteger(), server_default=sa.text("0"), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), server_default=sa.text("now()"), nullable=False),
        sa.Column("activated_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("grace_until", sa.DateTime(timezone=True), nullable=True),
        sa.Column("retired_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("destroyed_at", sa.DateTime(timezone=True), nullable=True),
        sa.CheckConstraint(
            "(state = 'destroyed') = (encrypted_dek IS NULL)", name=op.f("ck_data_keys_destroyed_has_no_key")
        ),
        sa.CheckConstraint(
            "state IN ('pending', 'active', 'grace', 'retired', 'destroyed')", name=op.f("ck_data_keys_state")
        ),
        sa.ForeignKeyConstraint(
            ["scope_id"], ["key_scopes.id"], name=op.f("fk_data_keys_scope_id_key_scopes"), ondelete="CASCADE"
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_data_keys")),
        sa.UniqueConstraint("scope_id", "version", name=op.f("uq_data_keys_scope_id_version")),
    )
    op.create_index(
        "ix_data_keys_grace_until",
        "data_keys",
        ["grace_until"],
        unique=False,
        postgresql_where=sa.text("state = 'grace'"),
    )
    op.create_index("ix_data_keys_kek_version", "data_keys", ["kek_version"], unique=False)
    op.create_index(
        "uq_data_keys_one_active",
        "data_keys",
        ["scope_id"],
        unique=True,
        postgresql_where=sa.text("state = 'active'"),
    )
    op.create_table(
        "rotations",
        sa.Column("id", sa.BigInteger(), autoincrement=True, nullable=False),
        sa.Column("kind", sa.Text(), nullable=False),
        sa.Column("scope_id", sa.BigInteger(), nullable=True),
        sa.Column("from_version", sa.Integer(), nullable=True),
        sa.Column("to_version", sa.Integer(), nullable=True),
        sa.Column("state", sa.Text(), server_default=sa.text("'pending'"), nullable=False),
        sa.Column("cursor", sa.BigInteger(), server_default=sa.text("0"), nullable=False),
        sa.Column("rows_done", sa.BigInteger(), server_default=sa.text("0"), nullable=False),
        sa.Column("rows_total", sa.BigInteger(), nullable=True),
        sa.Column("attempts", sa.Integer(), server_default=sa.text("0"), nullable=False),
        sa.Column("error", sa.Text(), nullable=True),
        sa.Column("trigger", sa.Text(), server_default=sa.text("'api'"), nullable=False),
        sa.Column("job_id", sa.Text(), nullable=True),
        sa.Column(
            "detail",
            postgresql.JSONB(astext_type=sa.Text()),
            server_default=sa.text("'{}'::jsonb"),
            nullable=False,
        ),
        sa.Column("created_at", sa.DateTime(timezone=True), server_default=sa.text("now()"), nullable=False),
        sa.Column("started_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("finished_at", sa.DateTime(timezone=True), nullable=True),
        sa.Column("updated_at", sa.DateTime(timezone=True), server_default=sa.text("now()"), nullable=False),
        sa.CheckConstraint(
            "kind IN ('dek', 'kek', 'retire', 'legacy', 'kek_migrate')", name=op.f("ck_rotations_kind")
        ),
        sa.CheckConstraint(
            "state IN ('pending', 'running', 'completed', 'failed', 'cancelled')",
            name=op.f("ck_rotations_state"),
        ),
        sa.ForeignKeyConstraint(
            ["scope_id"], ["key_scopes.id"], name=op.f("fk_rotations_scope_id_key_scopes"), ondelete="CASCADE"
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_rotations")),
    )
    op.create_index("ix_rotations_created_at", "rotations", ["created_at"], unique=False)
    op.create_index(
        "uq_rotations_one_open",
        "rotations",
        ["kind", sa.literal_column("coalesce(scope_id, 0)")],
        unique=True,
        postgresql_where=sa.text("state IN ('pending', 'running')"),
    )
    op.create_table(
        "secrets",
        sa.Column("id", sa.BigInteger(), autoincrement=True, nullable=False),
        sa.Column("scope_id", sa.BigInteger(), nullable=False),
        sa.Column("name", sa.Text(), nullable=False),
        sa.Column("ciphertext", sa.Text(), nullable=False),
        sa.Column("dek_version", sa.Integer(), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), server_default=sa.text("now()"), nullable=False),
        sa.Column("updated_at", sa.DateTime(timezone=True), server_default=sa.text("now()"), nullable=False),
        sa.ForeignKeyConstraint(
            ["scope_id"], ["key_scopes.id"], name=op.f("fk_secrets_scope_id_key_scopes"), ondelete="RESTRICT"
        ),
        sa.PrimaryKeyConstraint("id", name=op.f("pk_secrets")),
        sa.UniqueConstraint("scope_id", "name", name=op.f("uq_secrets_scope_id_name")),
    )
    op.create_index("ix_secrets_scope_version", "secrets", ["scope_id", "dek_version", "id"], unique=False)


def downgrade() -> None:
    op.drop_index("ix_secrets_scope_version", table_name="secrets")
    op.drop_table("secrets")
    op.drop_index(
        "uq_rotations_one_open",
        table_name="rotations",
        postgresql_where=sa.text("state IN ('pending', 'running')"),
    )
    op.drop_index("ix_rotations_created_at", table_name="rotations")
    op.drop_table("rotations")
    op.drop_index(
        "uq_data_keys_one_active", table_name="data_keys", postgresql_where=sa.text("state = 'active'")
    )
    op.drop_index("ix_data_keys_kek_version", table_name="data_keys")
    op.drop_index(
        "ix_data_keys_grace_until", table_name="data_keys", postgresql_where=sa.text("state = 'grace'")
    )
    op.drop_table("data_keys")
    op.drop_index(op.f("ix_key_scopes_next_rotation_at"), table_name="key_scopes")
    op.drop_table("key_scopes")
