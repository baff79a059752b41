"""census: where each DEK version's values live, and a reversible destruction window

Revision ID: 0008_census
Revises: 0007_usage_guards

A retirement may destroy a DEK version only with proof that no stored value still needs it. The
proof used to count only ``secrets`` and the registered columns, so a value the application kept
in a table it never registered was destroyed with its key. Three tables close that:

- ``key_locations``: every location (the encrypt ``context`` up to its last ``:``, ``''`` for
  none) that ever received values of a scope's DEK version, with a count and when it was last
  seen. A process writes a row the first time it encrypts to a (scope, version, location), and
  adds its counts in batches; retirement refuses while a location it cannot count is listed.
- ``location_acks``: locations an operator acknowledged by name (``keyrotor columns ignore``):
  the values there may be lost, and the operator said so.
- ``retired_key_uses``: decrypts that needed a retired version. Any use cancels the pending
  destruction of that version. The application role only appends to it.

``data_keys.destroy_after`` is when a retired version's wrapped key may be erased (NULL: no
destruction is pending). A retired version keeps decrypting, so its regional copies stay
(``replica_keys`` accepts ``retired``), and each use is audited as ``retired_key_use``.

Versions that exist when this migration runs were written before locations were recorded, so
each gets a ``(unrecorded)`` location: retiring them needs an operator's ``columns ignore
'(unrecorded)'`` once every table holding their values is registered."""

from __future__ import annotations

from collections.abc import Sequence

import sqlalchemy as sa
from alembic import op

revision: str = "0008_census"
down_revision: str | Sequence[str] | None = "0007_usage_guards"
branch_labels: str | Sequence[str] | None = None
depends_on: str | Sequence[str] | None = None

UNRECORDED = "(unrecorded)"

# The audit event types as of this revision (0002 read them from keyrotor.audit.log; spelled out
# here so that this revision means the same thing whatever the code says later).
_EVENTS_BEFORE = (
    "encrypt", "decrypt", "failed_decrypt", "rotate", "rewrap", "retire", "unauthorized",
    "config_change", "replica_check", "failover", "anchor",
)  # fmt: skip
_EVENTS = (*_EVENTS_BEFORE, "retired_key_use")


def _drop_checks_on(table: str, column: str) -> None:
    # Earlier revisions named these constraints through the naming convention (which doubled the
    # prefix in some), so they are found by what they check rather than by name.
    op.execute(
        f"""
        DO $$
        DECLARE c text;
        BEGIN
            FOR c IN SELECT conname FROM pg_constraint
                     WHERE conrelid = '{table}'::regclass AND contype = 'c'
                       AND pg_get_constraintdef(oid) LIKE '%({column} %'
            LOOP
                EXECUTE format('ALTER TABLE {table} DROP CONSTRAINT %I', c);
            END LOOP;
        END
        $$;
        """
    )


def _event_check(events: Sequence[str]) -> None:
    _drop_checks_on("encryption_audit_log", "event_type")
    op.execute(
        "ALTER TABLE encryption_audit_log ADD CONSTRAINT ck_encryption_audit_log_event_type "
        "CHECK (event_type IN (" + ", ".join(f"'{e}'" for e in events) + "))"
    )


def _replica_states(states: str) -> None:
    _drop_checks_on("replica_keys", "state")
    op.execute(f"ALTER TABLE replica_keys ADD CONSTRAINT ck_replica_keys_state CHECK (state IN ({states}))")


def upgrade() -> None:
    op.create_table(
        "key_locations",
        sa.Column("scope_id", sa.BigInteger(), nullable=False),
        sa.Column("dek_version", sa.Integer(), nullable=False),
        sa.Column("location", sa.Text(), nullable=False),
        sa.Column("encryptions", sa.BigInteger(), server_default=sa.text("0"), nullable=False),
        sa.Column("first_seen", sa.DateTime(timezone=True), server_default=sa.text("now()"), nullable=False),
        sa.Column("last_seen", sa.DateTime(timezone=True), server_default=sa.text("now()"), nullable=False),
        sa.ForeignKeyConstraint(
            ["scope_id"], ["key_scopes.id"], name="fk_key_locations_scope_id_key_scopes", ondelete="CASCADE"
        ),
        sa.PrimaryKeyConstraint("scope_id", "dek_version", "location", name="pk_key_locations"),
    )
    op.create_table(
        "location_acks",
        sa.Column("location", sa.Text(), nullable=False),
        sa.Column("reason", sa.Text(), nullable=False),
        sa.Column("actor", sa.Text(), nullable=False),
        sa.Column(
            "acknowledged_at", sa.DateTime(timezone=True), server_default=sa.text("now()"), nullable=False
        ),
        sa.PrimaryKeyConstraint("location", name="pk_location_acks"),
        sa.CheckConstraint("length(reason) > 0", name="ck_location_acks_reason_given"),
    )
    op.create_table(
        "retired_key_uses",
        sa.Column("id", sa.BigInteger(), sa.Identity(), nullable=False),
        sa.Column("scope_id", sa.BigInteger(), nullable=False),
        sa.Column("dek_version", sa.Integer(), nullable=False),
        sa.Column("location", sa.Text(), nullable=False),
        sa.Column("actor", sa.Text(), nullable=True),
        sa.Column("used_at", sa.DateTime(timezone=True), server_default=sa.text("now()"), nullable=False),
        sa.ForeignKeyConstraint(
            ["scope_id"],
            ["key_scopes.id"],
            name="fk_retired_key_uses_scope_id_key_scopes",
            ondelete="CASCADE",
        ),
        sa.PrimaryKeyConstraint("id", name="pk_retired_key_uses"),
    )
    op.create_index(
        "ix_retired_key_uses_scope_version", "retired_key_uses", ["scope_id", "dek_version", "used_at"]
    )
    op.add_column("data_keys", sa.Column("destroy_after", sa.DateTime(timezone=True), nullable=True))
    op.execute(
        sa.text(
            "INSERT INTO key_locations (scope_id, dek_version, location, encryptions) "
            "SELECT scope_id, version, :loc, encryptions FROM data_keys WHERE state <> 'destroyed'"
        ).bindparams(loc=UNRECORDED)
    )
    _event_check(_EVENTS)
    _replica_states("'pending', 'active', 'grace', 'retired'")


def downgrade() -> None:
    op.execute("DELETE FROM replica_keys WHERE state = 'retired'")  # copies the old code would not keep
    _replica_states("'pending', 'active', 'grace'")
    _event_check(_EVENTS_BEFORE)  # fails if retired_key_use events exist: the log is append-only
    op.drop_column("data_keys", "destroy_after")
    op.drop_index("ix_retired_key_uses_scope_version", table_name="retired_key_uses")
    op.drop_table("retired_key_uses")
    op.drop_table("location_acks")
    op.drop_table("key_locations")
