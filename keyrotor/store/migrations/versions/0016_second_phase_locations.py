"""A location for each second-phase DEK imported before imports recorded one

Revision ID: 0016_second_phase_locations
Revises: 0015_replica_lifecycle

``keyrotor legacy import-dek`` adopts the old backend's DEK as a decrypt-only version. The values
the old backend sealed with it carry no version and may be in a table nobody registered, so the
retirement proof could count none and let the DEK be retired, then destroyed. An import now
records the location ``(second phase: SCOPE vN)``, which only an operator's acknowledgement
covers. A DEK imported earlier gets it here: it is the one kind of DEK that went straight to
``grace`` without ever being active (``activated_at`` NULL). A version whose destruction is
pending is then kept too, until acknowledged.
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0016_second_phase_locations"
down_revision: str | Sequence[str] | None = "0015_replica_lifecycle"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

# keyrotor.census.locations.second_phase_location, spelled here: a migration keeps its meaning
# even if the code's spelling changes later.
_LOCATION = "'(second phase: ' || s.name || ' v' || d.version || ')'"


def upgrade() -> None:
    op.execute(
        "INSERT INTO key_locations (scope_id, dek_version, location, encryptions) "
        f"SELECT d.scope_id, d.version, {_LOCATION}, 0 FROM data_keys d "
        "JOIN key_scopes s ON s.id = d.scope_id "
        "WHERE d.activated_at IS NULL AND d.state IN ('grace', 'retired') "
        "ON CONFLICT (scope_id, dek_version, location) DO NOTHING"
    )


def downgrade() -> None:
    # The earlier code has no use for these rows; they only ever kept a DEK.
    op.execute(sa.text("DELETE FROM key_locations WHERE location LIKE '(second phase: %'"))
