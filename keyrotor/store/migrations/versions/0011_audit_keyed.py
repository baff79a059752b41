"""audit keyed: the audit key table, the key id of each row, and pruning for the owner only

Revision ID: 0011_audit_keyed
Revises: 0010_install_salt

``audit_keys``: the audit key(s) that make the chain keyed (HMAC-SHA256, ``keyrotor.audit.key``),
each wrapped by the KEK and bound to its id and its switch point (the last row written before
it). Created by the first process that opens the KEK provider, not here: a migration has no KEK.

``encryption_audit_log.audit_key_id``: the key a row's hash is keyed with; NULL for rows of the
old, unkeyed format (allowed only up to the switch point).

The append-only trigger let any session that set ``keyrotor.audit_prune`` delete rows, and every
role can set a custom setting. Now a DELETE also needs the deleting role to be a member of the
table's owner: ``keyrotor audit prune`` run as the owner works; the application and worker roles
are refused even with a DELETE privilege granted by mistake.
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0011_audit_keyed"
down_revision: str | Sequence[str] | None = "0010_install_salt"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

_GUARD = """
CREATE OR REPLACE FUNCTION keyrotor_audit_log_guard() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    IF TG_OP = 'DELETE' AND current_setting('keyrotor.audit_prune', true) = 'on'
       AND {owner_check} THEN
        RETURN NULL;
    END IF;
    RAISE EXCEPTION 'encryption_audit_log is append-only (% refused; prune as the owner)', TG_OP
        USING ERRCODE = 'insufficient_privilege';
END
$$
"""
_OWNER_CHECK = "pg_has_role(current_user, (SELECT relowner FROM pg_class WHERE oid = TG_RELID), 'MEMBER')"


def upgrade() -> None:
    op.create_table(
        "audit_keys",
        sa.Column("id", sa.Integer(), autoincrement=False, nullable=False),
        sa.Column("switch_after", sa.BigInteger(), nullable=False),
        sa.Column("kek_id", sa.Text(), nullable=False),
        sa.Column("kek_version", sa.Integer(), nullable=False),
        sa.Column("wrapped", sa.LargeBinary(), nullable=False),
        sa.Column("created_at", sa.DateTime(timezone=True), server_default=sa.text("now()"), nullable=False),
        sa.PrimaryKeyConstraint("id", name="pk_audit_keys"),
        sa.CheckConstraint("id > 0 AND switch_after >= 0", name="ck_audit_keys_ids"),
    )
    op.add_column("encryption_audit_log", sa.Column("audit_key_id", sa.Integer(), nullable=True))
    op.execute(_GUARD.format(owner_check=_OWNER_CHECK))


def downgrade() -> None:
    op.execute(_GUARD.format(owner_check="true"))
    op.drop_column("encryption_audit_log", "audit_key_id")
    op.drop_table("audit_keys")
