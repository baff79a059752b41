"""The record of a replica repair survives a crash between the repair and its audit event

Revision ID: 0017_replica_repair_record
Revises: 0016_second_phase_locations

A replica check repairs a region's copies (in the region's database) before it writes its
``replica_check`` audit event (in the primary's), and the two cannot share a transaction. A
check now commits a ``replica_repair_intents`` row in the primary before it repairs, and each
repair batch counts what it wrote in the region's ``replica_repair_log`` in the batch's own
transaction. The event deletes the intent in its transaction; an intent left by a check that
died is found by the next check, which records the repair from the region's count, once.
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0017_replica_repair_record"
down_revision: str | Sequence[str] | None = "0016_second_phase_locations"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table(
        "replica_repair_intents",
        sa.Column("id", sa.Text(), nullable=False),
        sa.Column("region", sa.Text(), nullable=False),
        sa.Column("scope", sa.Text(), nullable=True),
        sa.Column("actor", sa.Text(), nullable=False),
        sa.Column("started_at", sa.DateTime(timezone=True), server_default=sa.func.now(), nullable=False),
        sa.PrimaryKeyConstraint("id", "region", name="pk_replica_repair_intents"),
    )
    op.create_table(
        "replica_repair_log",
        sa.Column("repair_id", sa.Text(), nullable=False),
        sa.Column("written", sa.Integer(), nullable=False),
        sa.Column("at", sa.DateTime(timezone=True), server_default=sa.func.now(), nullable=False),
        sa.PrimaryKeyConstraint("repair_id", name="pk_replica_repair_log"),
    )


def downgrade() -> None:
    op.drop_table("replica_repair_log")
    op.drop_table("replica_repair_intents")
