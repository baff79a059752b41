"""replica_keys: a copy carries its DEK's lifecycle dates (activated, grace until, retired,
destroy after)

Revision ID: 0015_replica_lifecycle
Revises: 0014_range_cursor_open

A region promoted to primary makes its copies its own ``data_keys``. It needs the old primary's
dates to carry on the same lifecycle (a retired DEK destroyed when the old primary would have,
a grace ending when it would have), and, with the primary down, to tell a retired DEK whose
destruction may have run (not adopted) from one whose destruction is not due yet (adopted).

Copies written before this revision have no dates (NULL). The next check grades them ``stale``
(their dates differ from the primary's) and its repair writes them again with their dates;
until then, a promotion with the primary down refuses a ``retired`` copy without ``retired_at``
(its destruction date is unknown). With ``KEYROTOR_REPLICA_REPAIR=false`` run ``keyrotor
replicas check --repair`` once after upgrading: a region graded stale is not proven in sync, and
failover reads stop serving its copies six days after its last proof.
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0015_replica_lifecycle"
down_revision: str | Sequence[str] | None = "0014_range_cursor_open"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

COLUMNS = ("activated_at", "grace_until", "retired_at", "destroy_after")


def upgrade() -> None:
    for name in COLUMNS:
        op.add_column("replica_keys", sa.Column(name, sa.DateTime(timezone=True), nullable=True))


def downgrade() -> None:
    for name in reversed(COLUMNS):
        op.drop_column("replica_keys", name)
