"""scheduler: the index its scans page through

Revision ID: 0004_scheduler
Revises: 0003_worker

The scheduler pages through due scopes in ``(next_rotation_at, id)`` order, ``batch`` rows at a
time (keyset pagination). A composite index lets every page be one ordered index range scan
that stops after ``batch`` rows; the single-column ``ix_key_scopes_next_rotation_at`` would
make each page read and sort every due row left. Partial: disabled scopes (whose
``next_rotation_at`` is NULL) are never scanned, so they are not indexed.
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0004_scheduler"
down_revision: str | Sequence[str] | None = "0003_worker"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.create_index(
        "ix_key_scopes_due",
        "key_scopes",
        ["next_rotation_at", "id"],
        postgresql_where=sa.text("rotation_enabled AND next_rotation_at IS NOT NULL"),
    )


def downgrade() -> None:
    op.drop_index("ix_key_scopes_due", table_name="key_scopes")
