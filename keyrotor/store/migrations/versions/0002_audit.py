"""audit log and access grants

Revision ID: 0002_audit
Revises: 0001_initial

``encryption_audit_log``: the hash-chained audit log (``keyrotor.audit.log``). ``id`` is the row's
position in the chain, assigned by the writer under the chain's advisory lock (1, 2, 3, ...;
a gap is a deleted row). A statement trigger refuses UPDATE and TRUNCATE, and DELETE unless
the transaction set ``keyrotor.audit_prune`` (``keyrotor audit prune`` does): a guard against
accidents; tampering by someone who can bypass it is what the hash chain detects.

``encryption_grants``: who may encrypt/decrypt in which scopes (``keyrotor.audit.grants``). A new
install starts with one wildcard grant (every actor, every scope) so the first run works.
"""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op
from sqlalchemy.dialects import postgresql

revision: str = "0002_audit"
down_revision: str | Sequence[str] | None = "0001_initial"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

EVENT_TYPES = (
    "encrypt",
    "decrypt",
    "failed_decrypt",
    "rotate",
    "rewrap",
    "retire",
    "unauthorized",
    "config_change",
    "replica_check",
    "failover",
    "anchor",
)


def upgrade() -> None:
    op.create_table(
        "encryption_audit_log",
        sa.Column("id", sa.BigInteger(), primary_key=True, autoincrement=False),
        sa.Column("event_type", sa.Text(), nullable=False),
        sa.Column("scope", sa.Text()),
        sa.Column("key_version", sa.BigInteger()),
        sa.Column("success", sa.Boolean(), nullable=False),
        sa.Column("actor", sa.Text()),
        sa.Column("ip_address", sa.Text()),
        sa.Column("user_agent", sa.Text()),
        sa.Column("error_message", sa.Text()),
        # json, not jsonb: stored as the exact text that was hashed (verify re-hashes that text),
        # and cheaper to insert; nothing indexes into it.
        sa.Column("metadata", postgresql.JSON(), nullable=False, server_default=sa.text("'{}'::json")),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False),
        sa.Column("prev_hash", sa.LargeBinary(), nullable=False),
        sa.Column("row_hash", sa.LargeBinary(), nullable=False),
        sa.CheckConstraint("id > 0", name="ck_encryption_audit_log_id"),
        sa.CheckConstraint(
            "event_type IN (" + ", ".join(f"'{t}'" for t in EVENT_TYPES) + ")",
            name="ck_encryption_audit_log_event_type",
        ),
        sa.CheckConstraint(
            "octet_length(prev_hash) = 32 AND octet_length(row_hash) = 32",
            name="ck_encryption_audit_log_hashes",
        ),
    )
    # Few indexes: every encrypt and decrypt is a row, and each B-tree costs about a third of a
    # row's insert time (bench/bench_audit.py). ids follow time, so a BRIN index on created_at
    # (almost free to maintain) bounds time-range queries; the rare events (failures, denials,
    # configuration, rotation) get a partial index; scope/actor filters scan the id range.
    op.create_index(
        "ix_encryption_audit_log_created_at", "encryption_audit_log", ["created_at"], postgresql_using="brin"
    )
    op.create_index(
        "ix_encryption_audit_log_rare_events",
        "encryption_audit_log",
        ["event_type", "id"],
        postgresql_where=sa.text("event_type NOT IN ('encrypt', 'decrypt')"),
    )
    op.execute(
        """
        CREATE FUNCTION keyrotor_audit_log_guard() RETURNS trigger LANGUAGE plpgsql AS $$
        BEGIN
            IF TG_OP = 'DELETE' AND current_setting('keyrotor.audit_prune', true) = 'on' THEN
                RETURN NULL;
            END IF;
            RAISE EXCEPTION 'encryption_audit_log is append-only (% refused; use keyrotor audit prune)', TG_OP
                USING ERRCODE = 'insufficient_privilege';
        END
        $$
        """
    )
    op.execute(
        "CREATE TRIGGER encryption_audit_log_append_only BEFORE UPDATE OR DELETE OR TRUNCATE "
        "ON encryption_audit_log FOR EACH STATEMENT EXECUTE FUNCTION keyrotor_audit_log_guard()"
    )

    op.create_table(
        "encryption_grants",
        sa.Column("id", sa.BigInteger(), sa.Identity(), primary_key=True),
        sa.Column("actor", sa.Text(), nullable=False),
        sa.Column("scope_pattern", sa.Text(), nullable=False),
        sa.Column("can_encrypt", sa.Boolean(), nullable=False, server_default=sa.text("false")),
        sa.Column("can_decrypt", sa.Boolean(), nullable=False, server_default=sa.text("false")),
        sa.Column("created_at", sa.DateTime(timezone=True), nullable=False, server_default=sa.text("now()")),
        sa.Column("updated_at", sa.DateTime(timezone=True), nullable=False, server_default=sa.text("now()")),
        sa.UniqueConstraint("actor", "scope_pattern", name="uq_encryption_grants_actor_scope_pattern"),
        sa.CheckConstraint("can_encrypt OR can_decrypt", name="ck_encryption_grants_some_permission"),
    )
    # The first run must work: everyone may do everything until an operator tightens it
    # (docs/audit.md, "Access control").
    op.execute(
        "INSERT INTO encryption_grants (actor, scope_pattern, can_encrypt, can_decrypt) "
        "VALUES ('*', '*', true, true)"
    )


def downgrade() -> None:
    op.drop_table("encryption_grants")
    op.execute("DROP TRIGGER IF EXISTS encryption_audit_log_append_only ON encryption_audit_log")
    op.execute("DROP FUNCTION IF EXISTS keyrotor_audit_log_guard()")
    op.drop_table("encryption_audit_log")
