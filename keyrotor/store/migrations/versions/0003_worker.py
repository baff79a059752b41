"""rotation worker: id ranges of fanned-out re-encryption runs

Revision ID: 0003_worker
Revises: 0002_audit

A large scope's DEK rotation splits into id ranges that many workers re-encrypt in parallel.
Each range is a row, so "is the run finished?" is a count in the database (not in any worker's
memory) and a range resumes from its own cursor after a crash.
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0003_worker"
down_revision: str | Sequence[str] | None = "0002_audit"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table(
        "rotation_ranges",
        sa.Column("id", sa.BigInteger(), sa.Identity(), primary_key=True),
        sa.Column(
            "run_id",
            sa.BigInteger(),
            sa.ForeignKey("rotations.id", ondelete="CASCADE", name="fk_rotation_ranges_run_id_rotations"),
            nullable=False,
        ),
        sa.Column("target", sa.Text(), nullable=False),
        # Rows with lo <= id <= hi belong to the range.
        sa.Column("lo", sa.BigInteger(), nullable=False),
        sa.Column("hi", sa.BigInteger(), nullable=False),
        # The older DEK version being re-encrypted now (one version at a time keeps every batch
        # an exact range scan of ix_secrets_scope_version); cursor is the last id done of it.
        sa.Column("version", sa.Integer(), nullable=False),
        sa.Column("cursor", sa.BigInteger(), nullable=False),
        sa.Column("rows_done", sa.BigInteger(), server_default=sa.text("0"), nullable=False),
        sa.Column("state", sa.Text(), server_default=sa.text("'pending'"), nullable=False),
        sa.Column("updated_at", sa.DateTime(timezone=True), server_default=sa.text("now()"), nullable=False),
        sa.CheckConstraint("state IN ('pending', 'done')", name="ck_rotation_ranges_state"),
        sa.CheckConstraint("lo <= hi", name="ck_rotation_ranges_bounds"),
        sa.UniqueConstraint("run_id", "target", "lo", name="uq_rotation_ranges_run_id_target_lo"),
    )
    op.create_index(
        "ix_rotation_ranges_open",
        "rotation_ranges",
        ["run_id"],
        postgresql_where=sa.text("state = 'pending'"),
    )
    # `keyrotor status` and `keyrotor runs` look up runs by scope.
    op.create_index("ix_rotations_scope_id_created_at", "rotations", ["scope_id", "created_at"])


def downgrade() -> None:
    op.drop_index("ix_rotations_scope_id_created_at", table_name="rotations")
    op.drop_index("ix_rotation_ranges_open", table_name="rotation_ranges")
    op.drop_table("rotation_ranges")
