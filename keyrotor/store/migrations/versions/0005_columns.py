"""columns: application-owned ciphertext columns that rotation, retirement and verify cover

Revision ID: 0005_columns
Revises: 0004_scheduler

One row a registered column (``keyrotor columns register TABLE.COLUMN``): the table (``schema.table``
allowed), the value column, an integer primary key column, and where a row's scope comes from:
a column of the row holding the scope's name, or one fixed scope for every row. The context a
value is sealed with comes from ``context_template`` (``{pk}`` is replaced by the row's key).
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0005_columns"
down_revision: str | Sequence[str] | None = "0004_scheduler"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_table(
        "managed_columns",
        sa.Column("id", sa.BigInteger(), sa.Identity(), nullable=False),
        sa.Column("table_name", sa.Text(), nullable=False),
        sa.Column("column_name", sa.Text(), nullable=False),
        sa.Column("pk_column", sa.Text(), nullable=False),
        sa.Column("scope_column", sa.Text(), nullable=True),
        sa.Column("scope", sa.Text(), nullable=True),
        sa.Column("context_template", sa.Text(), nullable=False),
        sa.Column(
            "registered_at", sa.DateTime(timezone=True), server_default=sa.text("now()"), nullable=False
        ),
        sa.PrimaryKeyConstraint("id", name="pk_managed_columns"),
        sa.UniqueConstraint("table_name", "column_name", name="uq_managed_columns_table_name_column_name"),
        sa.CheckConstraint(
            "(scope_column IS NULL) <> (scope IS NULL)", name="ck_managed_columns_one_scope_source"
        ),
    )


def downgrade() -> None:
    op.drop_table("managed_columns")
