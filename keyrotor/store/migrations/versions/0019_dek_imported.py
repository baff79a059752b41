"""data_keys.imported: a DEK adopted from the old backend, whose values carry no version

Revision ID: 0019_dek_imported
Revises: 0018_scoped_location_acks

The retirement proof tries a DEK on every value not yet ``kr1`` in every registered table,
under every scope, because the old backend's second phase sealed values directly with its DEK
(``keyrotor legacy import-dek``): they carry no version, and only that DEK finds them. A DEK
keyrotor made never sealed such a value, yet its proof paid the scan, with every registered
table locked in SHARE mode. The proof now scans only for a DEK marked imported.

The mark is a column of the DEK's row: a KEK rewrap only updates the wrapped key, so it keeps
it; replication copies it (``replica_keys.imported``) and a promotion carries it over. Neither
``activated_at`` (a promotion stamps one on a copy that has none, an imported DEK's too) nor
the ``(second phase: SCOPE vN)`` location (census data: not replicated, gone after a
promotion) can serve. The column defaults to ``true``: a row nobody says keyrotor made costs
its proof a scan, never a value.

Existing DEKs are marked imported unless they are surely keyrotor's own: ``pending`` (only a
rotation makes one), or made active here (an imported DEK never is), except a DEK a promotion
stamped active (``activated_at`` equal to a ``replica_promotions.promoted_at``: its copy had
no dates, an imported DEK's looks the same); and never one that has its import's location or
its import's audit event. Copies written before this revision have no mark (NULL): the next
check grades them ``stale`` and its repair writes them again with it; a promotion with the
primary down takes an unknown copy for imported.
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0019_dek_imported"
down_revision: str | Sequence[str] | None = "0018_scoped_location_acks"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

# keyrotor.census.locations.second_phase_location, spelled here as in 0016: a migration keeps its
# meaning even if the code's spelling changes later.
_LOCATION = "'(second phase: ' || s.name || ' v' || d.version || ')'"


def upgrade() -> None:
    op.add_column("data_keys", sa.Column("imported", sa.Boolean(), server_default=sa.true(), nullable=False))
    op.execute(
        "UPDATE data_keys d SET imported = false FROM key_scopes s WHERE s.id = d.scope_id "
        "AND (d.state = 'pending' OR (d.activated_at IS NOT NULL AND NOT EXISTS "
        "(SELECT 1 FROM replica_promotions p WHERE p.promoted_at = d.activated_at))) "
        "AND NOT EXISTS (SELECT 1 FROM key_locations k WHERE k.scope_id = d.scope_id "
        f"AND k.dek_version = d.version AND k.location = {_LOCATION}) "
        "AND NOT EXISTS (SELECT 1 FROM encryption_audit_log a WHERE a.event_type = 'config_change' "
        "AND a.scope = s.name AND a.key_version = d.version "
        "AND a.metadata->>'action' = 'import_legacy_dek')"
    )
    op.add_column("replica_keys", sa.Column("imported", sa.Boolean(), nullable=True))


def downgrade() -> None:
    op.drop_column("replica_keys", "imported")
    op.drop_column("data_keys", "imported")
