"""rotation_ranges.cursor may be NULL: a range that starts at the least bigint

Revision ID: 0014_range_cursor_open
Revises: 0013_secrets_hot_updates

An integer range's pass starts with ``cursor = lo - 1``, the exclusive bound its first batch
reads after. For a registered column holding the key ``-2**63`` the first range starts there and
``lo - 1`` is no bigint: planning the range failed the run. ``cursor`` NULL now means, as
``cursor_key`` NULL already did for other keys, that the pass has done no key yet; such a pass
has no lower bound (``> -2**63`` would skip the key ``-2**63``). Other ranges still store
``lo - 1``.
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0014_range_cursor_open"
down_revision: str | Sequence[str] | None = "0013_secrets_hot_updates"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.alter_column("rotation_ranges", "cursor", existing_type=sa.BigInteger(), nullable=True)


def downgrade() -> None:
    # A done range's cursor is read no more. A pending one at the least bigint has no cursor the
    # earlier schema can hold (its code cannot run such a range at all): refuse rather than guess.
    op.execute("UPDATE rotation_ranges SET cursor = lo WHERE cursor IS NULL AND state = 'done'")
    left = op.get_bind().execute(sa.text("SELECT count(*) FROM rotation_ranges WHERE cursor IS NULL"))
    if left.scalar_one():
        raise RuntimeError("a pending range starts at -2**63: let its run end before downgrading")
    op.alter_column("rotation_ranges", "cursor", existing_type=sa.BigInteger(), nullable=False)
