"""replicas: multi-region KEK replication (docs/replication.md)

Revision ID: 0006_replicas
Revises: 0005_columns

Every keyrotor database gets all three tables; which ones a database uses depends on its role:

- ``kek_replicas`` (the primary): one row a secondary region, the result of its last check:
  status, the KEK version its copies follow, last check and last good check, counts, detail.
- ``replica_keys`` (a secondary): one row a DEK version of the primary that is still usable
  (pending, active, grace), wrapped under the region's own key, with the KEK version of the
  primary's copy it follows and a key check value (HMAC of a fixed label under the DEK).
- ``replica_promotions`` (a secondary promoted to primary): fences it, so a recovered old
  primary can never overwrite its keys again.
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

revision: str = "0006_replicas"
down_revision: str | Sequence[str] | None = "0005_columns"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

STATUSES = "('in_sync', 'stale', 'drifted', 'corrupt', 'missing', 'unreachable')"


def upgrade() -> None:
    op.create_table(
        "kek_replicas",
        sa.Column("region", sa.Text(), nullable=False),
        sa.Column("status", sa.Text(), nullable=False),
        sa.Column("kek_version", sa.Integer(), nullable=True),
        sa.Column("keys_total", sa.Integer(), server_default=sa.text("0"), nullable=False),
        sa.Column("counts", postgresql.JSONB(), server_default=sa.text("'{}'::jsonb"), nullable=False),
        sa.Column("detail", sa.Text(), server_default=sa.text("''"), nullable=False),
        sa.Column("checked_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("last_ok_at", sa.DateTime(timezone=True), nullable=True),
        sa.PrimaryKeyConstraint("region", name="pk_kek_replicas"),
        sa.CheckConstraint(f"status IN {STATUSES}", name="ck_kek_replicas_status"),
    )
    op.create_table(
        "replica_keys",
        sa.Column("id", sa.BigInteger(), sa.Identity(), nullable=False),
        sa.Column("scope", sa.Text(), nullable=False),
        sa.Column("dek_version", sa.Integer(), nullable=False),
        sa.Column("state", sa.Text(), nullable=False),
        sa.Column("kek_version", sa.Integer(), nullable=False),
        sa.Column("source_kek_id", sa.Text(), nullable=False),
        sa.Column("source_region", sa.Text(), nullable=False),
        sa.Column("wrapped_dek", sa.LargeBinary(), nullable=False),
        sa.Column("region_kek_id", sa.Text(), nullable=False),
        sa.Column("region_kek_version", sa.Integer(), nullable=False),
        sa.Column("fingerprint", sa.Text(), nullable=False),
        sa.Column(
            "replicated_at", sa.DateTime(timezone=True), server_default=sa.text("now()"), nullable=False
        ),
        sa.PrimaryKeyConstraint("id", name="pk_replica_keys"),
        sa.UniqueConstraint("scope", "dek_version", name="uq_replica_keys_scope_dek_version"),
        sa.CheckConstraint("state IN ('pending', 'active', 'grace')", name="ck_replica_keys_state"),
    )
    op.create_table(
        "replica_promotions",
        sa.Column("region", sa.Text(), nullable=False),
        sa.Column("promoted_at", sa.DateTime(timezone=True), server_default=sa.text("now()"), nullable=False),
        sa.Column("previous_primary", sa.Text(), nullable=False),
        sa.Column("promoted_by", sa.Text(), nullable=False),
        sa.Column("keys", sa.Integer(), nullable=False),
        sa.PrimaryKeyConstraint("region", name="pk_replica_promotions"),
    )


def downgrade() -> None:
    op.drop_table("replica_promotions")
    op.drop_table("replica_keys")
    op.drop_table("kek_replicas")
