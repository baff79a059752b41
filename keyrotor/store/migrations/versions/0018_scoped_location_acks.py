"""An operator's acknowledgement of a location names the scopes it covers

Revision ID: 0018_scoped_location_acks
Revises: 0017_replica_repair_record

``keyrotor columns ignore LOCATION`` said "the values there may be lost" for every scope, now and
later: a scope that began writing there afterwards (a new feature reusing a context, a new
tenant) had its DEK versions destroyed with its values unread, on an acknowledgement given for
other values. An acknowledgement is now one row per (location, scope); ``*`` stands for every
scope, which is what the acknowledgements given before this migration said, so they keep it.
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0018_scoped_location_acks"
down_revision: str | Sequence[str] | None = "0017_replica_repair_record"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None


def upgrade() -> None:
    op.add_column(
        "location_acks", sa.Column("scope", sa.Text(), server_default=sa.text("'*'"), nullable=False)
    )
    op.drop_constraint("pk_location_acks", "location_acks", type_="primary")
    op.create_primary_key("pk_location_acks", "location_acks", ["location", "scope"])


def downgrade() -> None:
    # The old table cannot say "this scope only": an acknowledgement for some scopes is dropped
    # rather than widened to every scope (an operator acknowledges again after the downgrade).
    op.execute("DELETE FROM location_acks WHERE scope <> '*'")
    op.drop_constraint("pk_location_acks", "location_acks", type_="primary")
    op.drop_column("location_acks", "scope")
    op.create_primary_key("pk_location_acks", "location_acks", ["location"])
