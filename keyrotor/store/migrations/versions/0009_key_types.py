"""key types: ranges over keys that are not integers

Revision ID: 0009_key_types
Revises: 0008_census

Registered columns may now be keyed by uuid, text or varchar as well as by integers. A fanned-out
run splits such a column into ranges whose bounds come from the data (the last key of each
bucket of rows), with the first and last ranges open-ended. ``rotation_ranges.lo``/``hi``/
``cursor`` stay bigint (integer keys use them as before; for other keys ``lo`` = ``hi`` = the
range's ordinal, which keeps job arguments and ids unchanged); the bounds and the cursor of
other keys are kept as text:

- ``after_key``: the exclusive lower bound (NULL: from the first key);
- ``hi_key``: the inclusive upper bound (NULL: to the last key);
- ``cursor_key``: the last key done in the current pass (NULL: none yet).
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0009_key_types"
down_revision: str | Sequence[str] | None = "0008_census"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.add_column("rotation_ranges", sa.Column("after_key", sa.Text(), nullable=True))
    op.add_column("rotation_ranges", sa.Column("hi_key", sa.Text(), nullable=True))
    op.add_column("rotation_ranges", sa.Column("cursor_key", sa.Text(), nullable=True))


def downgrade() -> None:
    op.drop_column("rotation_ranges", "cursor_key")
    op.drop_column("rotation_ranges", "hi_key")
    op.drop_column("rotation_ranges", "after_key")
