"""The tables (SQLAlchemy 2, typed). Alembic migrations in ``migrations/`` create them.

See DESIGN.md "The data". A scope's DEK versions are rows of ``data_keys``; values in
``secrets`` carry their DEK version in a column (indexed with the scope) and in their
``kr1:<version>:`` prefix, so "which rows still use version N" is one index range scan.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any

from sqlalchemy import (
    BigInteger,
    Boolean,
    CheckConstraint,
    DateTime,
    ForeignKey,
    Identity,
    Index,
    Integer,
    LargeBinary,
    MetaData,
    SmallInteger,
    Text,
    UniqueConstraint,
    func,
    text,
)
from sqlalchemy.dialects.postgresql import JSON, JSONB
from sqlalchemy.orm import DeclarativeBase, Mapped, mapped_column

NAMING = {
    "ix": "ix_%(table_name)s_%(column_0_N_name)s",
    "uq": "uq_%(table_name)s_%(column_0_N_name)s",
    "ck": "ck_%(table_name)s_%(constraint_name)s",
    "fk": "fk_%(table_name)s_%(column_0_name)s_%(referred_table_name)s",
    "pk": "pk_%(table_name)s",
}

KEY_STATES = ("pending", "active", "grace", "retired", "destroyed")
RUN_STATES = ("pending", "running", "completed", "failed", "cancelled")
RUN_KINDS = ("dek", "kek", "retire", "legacy", "kek_migrate")


class Base(DeclarativeBase):
    metadata = MetaData(naming_convention=NAMING)


def _now() -> Any:
    return mapped_column(DateTime(timezone=True), nullable=False, server_default=func.now())


class KeyScope(Base):
    """One row a scope (``anthropic``, ``tenant-42/openai``) and its rotation policy."""

    __tablename__ = "key_scopes"

    id: Mapped[int] = mapped_column(BigInteger, primary_key=True, autoincrement=True)
    name: Mapped[str] = mapped_column(Text, unique=True)
    active_version: Mapped[int] = mapped_column(Integer)
    latest_version: Mapped[int] = mapped_column(Integer)
    rotation_enabled: Mapped[bool] = mapped_column(Boolean, server_default=text("true"))
    interval_days: Mapped[int] = mapped_column(Integer, server_default=text("90"))
    grace_period_days: Mapped[int] = mapped_column(Integer, server_default=text("7"))
    # Rotate early once the active DEK has encrypted this many values (None: no limit).
    max_encryptions: Mapped[int | None] = mapped_column(BigInteger)
    next_rotation_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True), index=True)
    last_rotation_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    dek_rotation_count: Mapped[int] = mapped_column(Integer, server_default=text("0"))
    created_at: Mapped[datetime] = _now()
    updated_at: Mapped[datetime] = _now()

    __table_args__ = (
        CheckConstraint("interval_days BETWEEN 1 AND 365", name="interval_days"),
        CheckConstraint("grace_period_days >= 0 AND grace_period_days <= interval_days", name="grace"),
        CheckConstraint("active_version >= 1 AND latest_version >= active_version", name="versions"),
        # The scheduler's due scan (keyrotor.schedule.scan): one index range scan.
        Index(
            "ix_key_scopes_due",
            "next_rotation_at",
            "id",
            postgresql_where=text("rotation_enabled AND next_rotation_at IS NOT NULL"),
        ),
    )


class DataKey(Base):
    """One row a DEK version of a scope, wrapped by the KEK."""

    __tablename__ = "data_keys"

    id: Mapped[int] = mapped_column(BigInteger, primary_key=True, autoincrement=True)
    scope_id: Mapped[int] = mapped_column(ForeignKey("key_scopes.id", ondelete="CASCADE"))
    version: Mapped[int] = mapped_column(Integer)
    state: Mapped[str] = mapped_column(Text)
    # NULL once destroyed: the wrapped key is erased, not just flagged.
    encrypted_dek: Mapped[bytes | None] = mapped_column(LargeBinary)
    kek_id: Mapped[str] = mapped_column(Text)
    kek_version: Mapped[int] = mapped_column(Integer)
    encryptions: Mapped[int] = mapped_column(BigInteger, server_default=text("0"))
    created_at: Mapped[datetime] = _now()
    activated_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    grace_until: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    retired_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    destroyed_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    # A retired version's wrapped key may be erased after this (NULL: no destruction pending).
    destroy_after: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    # Adopted from the old backend (``legacy import-dek``, migration 0019): it sealed values that
    # carry no version, so the retirement proof looks for them in every table. True unless the
    # statement that makes the row says keyrotor made it: a row that does not say costs a scan.
    imported: Mapped[bool] = mapped_column(Boolean, server_default=text("true"))

    __table_args__ = (
        UniqueConstraint("scope_id", "version"),
        CheckConstraint(f"state IN {KEY_STATES!r}", name="state"),
        CheckConstraint("(state = 'destroyed') = (encrypted_dek IS NULL)", name="destroyed_has_no_key"),
        # At most one active DEK a scope, enforced by the database, not only by the code.
        Index("uq_data_keys_one_active", "scope_id", unique=True, postgresql_where=text("state = 'active'")),
        Index("ix_data_keys_grace_until", "grace_until", postgresql_where=text("state = 'grace'")),
        Index("ix_data_keys_kek_version", "kek_version"),
    )


class Secret(Base):
    """An encrypted value owned by keyrotor (applications may also register their own columns)."""

    __tablename__ = "secrets"

    id: Mapped[int] = mapped_column(BigInteger, primary_key=True, autoincrement=True)
    scope_id: Mapped[int] = mapped_column(ForeignKey("key_scopes.id", ondelete="RESTRICT"))
    name: Mapped[str] = mapped_column(Text)
    ciphertext: Mapped[str] = mapped_column(Text)
    dek_version: Mapped[int] = mapped_column(Integer)
    created_at: Mapped[datetime] = _now()
    updated_at: Mapped[datetime] = _now()

    __table_args__ = (
        UniqueConstraint("scope_id", "name"),
        # Not dek_version: a rotation's update then changes no indexed column and, with room left on
        # the page (fillfactor 50, migration 0013), stays on its page (HOT) with no index entries.
        Index("ix_secrets_scope_id", "scope_id", "id"),
    )


class Rotation(Base):
    """One row a rotation run: what makes it resumable and observable."""

    __tablename__ = "rotations"

    id: Mapped[int] = mapped_column(BigInteger, primary_key=True, autoincrement=True)
    kind: Mapped[str] = mapped_column(Text)
    scope_id: Mapped[int | None] = mapped_column(ForeignKey("key_scopes.id", ondelete="CASCADE"))
    from_version: Mapped[int | None] = mapped_column(Integer)
    to_version: Mapped[int | None] = mapped_column(Integer)
    state: Mapped[str] = mapped_column(Text, server_default=text("'pending'"))
    cursor: Mapped[int] = mapped_column(BigInteger, server_default=text("0"))
    rows_done: Mapped[int] = mapped_column(BigInteger, server_default=text("0"))
    rows_total: Mapped[int | None] = mapped_column(BigInteger)
    attempts: Mapped[int] = mapped_column(Integer, server_default=text("0"))
    error: Mapped[str | None] = mapped_column(Text)
    trigger: Mapped[str] = mapped_column(Text, server_default=text("'api'"))
    job_id: Mapped[str | None] = mapped_column(Text)
    detail: Mapped[dict[str, Any]] = mapped_column(JSONB, server_default=text("'{}'::jsonb"))
    created_at: Mapped[datetime] = _now()
    started_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    finished_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    updated_at: Mapped[datetime] = _now()

    __table_args__ = (
        CheckConstraint(f"state IN {RUN_STATES!r}", name="state"),
        CheckConstraint(f"kind IN {RUN_KINDS!r}", name="kind"),
        # The database guard behind "at most one rotation a scope at a time".
        Index(
            "uq_rotations_one_open",
            "kind",
            text("coalesce(scope_id, 0)"),
            unique=True,
            postgresql_where=text("state IN ('pending', 'running')"),
        ),
        Index("ix_rotations_created_at", "created_at"),
        Index("ix_rotations_scope_id_created_at", "scope_id", "created_at"),
    )


class RotationRange(Base):
    """One id range of a fanned-out run's target, re-encrypted by one worker (migration 0003)."""

    __tablename__ = "rotation_ranges"

    id: Mapped[int] = mapped_column(BigInteger, Identity(), primary_key=True)
    run_id: Mapped[int] = mapped_column(ForeignKey("rotations.id", ondelete="CASCADE"))
    target: Mapped[str] = mapped_column(Text)
    # Integer keys: rows with lo <= id <= hi belong to the range. Other keys (migration 0009):
    # lo = hi = the range's ordinal, and rows with after_key < id <= hi_key (NULL: unbounded).
    lo: Mapped[int] = mapped_column(BigInteger)
    hi: Mapped[int] = mapped_column(BigInteger)
    # The older DEK version being re-encrypted now; cursor (cursor_key for keys that are not
    # integers; NULL: none done yet) is the last key done of it. An integer range's pass starts
    # at cursor = lo - 1, or NULL where lo is the least bigint (migration 0014).
    version: Mapped[int] = mapped_column(Integer)
    cursor: Mapped[int | None] = mapped_column(BigInteger)
    after_key: Mapped[str | None] = mapped_column(Text)
    hi_key: Mapped[str | None] = mapped_column(Text)
    cursor_key: Mapped[str | None] = mapped_column(Text)
    rows_done: Mapped[int] = mapped_column(BigInteger, server_default=text("0"))
    state: Mapped[str] = mapped_column(Text, server_default=text("'pending'"))
    updated_at: Mapped[datetime] = _now()

    __table_args__ = (
        CheckConstraint("state IN ('pending', 'done')", name="state"),
        CheckConstraint("lo <= hi", name="bounds"),
        UniqueConstraint("run_id", "target", "lo"),
        Index("ix_rotation_ranges_open", "run_id", postgresql_where=text("state = 'pending'")),
    )


class ManagedColumn(Base):
    """An application-owned ciphertext column registered with ``keyrotor columns register``."""

    __tablename__ = "managed_columns"

    id: Mapped[int] = mapped_column(BigInteger, primary_key=True, autoincrement=True)
    table_name: Mapped[str] = mapped_column(Text)
    column_name: Mapped[str] = mapped_column(Text)
    pk_column: Mapped[str] = mapped_column(Text)
    scope_column: Mapped[str | None] = mapped_column(Text)
    scope: Mapped[str | None] = mapped_column(Text)
    context_template: Mapped[str] = mapped_column(Text)
    registered_at: Mapped[datetime] = _now()

    __table_args__ = (
        UniqueConstraint("table_name", "column_name"),
        CheckConstraint("(scope_column IS NULL) <> (scope IS NULL)", name="one_scope_source"),
    )


class KeyLocation(Base):
    """A location (context up to its last ``:``) that received values of a DEK version (0008_census)."""

    __tablename__ = "key_locations"

    scope_id: Mapped[int] = mapped_column(
        BigInteger, ForeignKey("key_scopes.id", ondelete="CASCADE"), primary_key=True
    )
    dek_version: Mapped[int] = mapped_column(Integer, primary_key=True)
    location: Mapped[str] = mapped_column(Text, primary_key=True)
    encryptions: Mapped[int] = mapped_column(BigInteger, server_default=text("0"))
    first_seen: Mapped[datetime] = _now()
    last_seen: Mapped[datetime] = _now()


class LocationAck(Base):
    """A location an operator acknowledged by name for one scope, or every scope (``*``)
    (``keyrotor columns ignore``)."""

    __tablename__ = "location_acks"

    location: Mapped[str] = mapped_column(Text, primary_key=True)
    scope: Mapped[str] = mapped_column(Text, primary_key=True, server_default=text("'*'"))
    reason: Mapped[str] = mapped_column(Text)
    actor: Mapped[str] = mapped_column(Text)
    acknowledged_at: Mapped[datetime] = _now()

    __table_args__ = (CheckConstraint("length(reason) > 0", name="reason_given"),)


class RetiredKeyUse(Base):
    """A decrypt that needed a retired DEK version: it cancels that version's destruction."""

    __tablename__ = "retired_key_uses"

    id: Mapped[int] = mapped_column(BigInteger, Identity(), primary_key=True)
    scope_id: Mapped[int] = mapped_column(BigInteger, ForeignKey("key_scopes.id", ondelete="CASCADE"))
    dek_version: Mapped[int] = mapped_column(Integer)
    location: Mapped[str] = mapped_column(Text)
    actor: Mapped[str | None] = mapped_column(Text)
    used_at: Mapped[datetime] = _now()

    __table_args__ = (Index("ix_retired_key_uses_scope_version", "scope_id", "dek_version", "used_at"),)


class AuditLogRow(Base):
    """One event of the hash-chained audit log (``keyrotor.audit.log``; migration 0002_audit).

    Written only by :mod:`keyrotor.audit.writer` and :func:`keyrotor.audit.log.write_event` (COPY
    under the chain's advisory lock); the append-only trigger and the event-type check live in
    the migration. Declared here so that autogenerate sees the table and never drops it.
    """

    __tablename__ = "encryption_audit_log"

    id: Mapped[int] = mapped_column(BigInteger, primary_key=True, autoincrement=False)
    event_type: Mapped[str] = mapped_column(Text)
    scope: Mapped[str | None] = mapped_column(Text)
    key_version: Mapped[int | None] = mapped_column(BigInteger)
    success: Mapped[bool] = mapped_column(Boolean)
    actor: Mapped[str | None] = mapped_column(Text)
    ip_address: Mapped[str | None] = mapped_column(Text)
    user_agent: Mapped[str | None] = mapped_column(Text)
    error_message: Mapped[str | None] = mapped_column(Text)
    # json, not jsonb: the exact text that was hashed.
    metadata_: Mapped[dict[str, Any]] = mapped_column("metadata", JSON, server_default=text("'{}'::json"))
    created_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))
    prev_hash: Mapped[bytes] = mapped_column(LargeBinary)
    row_hash: Mapped[bytes] = mapped_column(LargeBinary)
    # The audit key the row's hash is keyed with (migration 0011); NULL: the old unkeyed format.
    audit_key_id: Mapped[int | None] = mapped_column(Integer)

    __table_args__ = (
        CheckConstraint("id > 0", name="id"),
        CheckConstraint("octet_length(prev_hash) = 32 AND octet_length(row_hash) = 32", name="hashes"),
        Index("ix_encryption_audit_log_created_at", "created_at", postgresql_using="brin"),
        Index(
            "ix_encryption_audit_log_rare_events",
            "event_type",
            "id",
            postgresql_where=text("event_type NOT IN ('encrypt', 'decrypt')"),
        ),
    )


class Grant(Base):
    """Who may encrypt/decrypt in which scopes (``keyrotor.audit.grants``; migration 0002_audit)."""

    __tablename__ = "encryption_grants"

    id: Mapped[int] = mapped_column(BigInteger, Identity(), primary_key=True)
    actor: Mapped[str] = mapped_column(Text)
    scope_pattern: Mapped[str] = mapped_column(Text)
    can_encrypt: Mapped[bool] = mapped_column(Boolean, server_default=text("false"))
    can_decrypt: Mapped[bool] = mapped_column(Boolean, server_default=text("false"))
    created_at: Mapped[datetime] = _now()
    updated_at: Mapped[datetime] = _now()

    __table_args__ = (
        UniqueConstraint("actor", "scope_pattern"),
        CheckConstraint("can_encrypt OR can_decrypt", name="some_permission"),
    )


REPLICA_STATUSES = ("in_sync", "stale", "drifted", "corrupt", "missing", "unreachable")


class KekReplica(Base):
    """The primary's record of one secondary region's last replica check (migration 0006_replicas)."""

    __tablename__ = "kek_replicas"

    region: Mapped[str] = mapped_column(Text, primary_key=True)
    status: Mapped[str] = mapped_column(Text)
    kek_version: Mapped[int | None] = mapped_column(Integer)
    keys_total: Mapped[int] = mapped_column(Integer, server_default=text("0"))
    counts: Mapped[dict[str, Any]] = mapped_column(JSONB, server_default=text("'{}'::jsonb"))
    detail: Mapped[str] = mapped_column(Text, server_default=text("''"))
    checked_at: Mapped[datetime] = mapped_column(DateTime(timezone=True))
    last_ok_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))

    __table_args__ = (CheckConstraint(f"status IN {REPLICA_STATUSES!r}", name="status"),)


class ReplicaKey(Base):
    """A secondary region's copy of one primary DEK, wrapped under the region's key (0006_replicas)."""

    __tablename__ = "replica_keys"

    id: Mapped[int] = mapped_column(BigInteger, Identity(), primary_key=True)
    scope: Mapped[str] = mapped_column(Text)
    dek_version: Mapped[int] = mapped_column(Integer)
    state: Mapped[str] = mapped_column(Text)
    # The primary's KEK version when copied: a KEK rotation makes the copy stale until re-replicated.
    kek_version: Mapped[int] = mapped_column(Integer)
    source_kek_id: Mapped[str] = mapped_column(Text)
    source_region: Mapped[str] = mapped_column(Text)
    wrapped_dek: Mapped[bytes] = mapped_column(LargeBinary)
    region_kek_id: Mapped[str] = mapped_column(Text)
    region_kek_version: Mapped[int] = mapped_column(Integer)
    fingerprint: Mapped[str] = mapped_column(Text)
    replicated_at: Mapped[datetime] = _now()
    # The DEK's dates on the primary when copied (0015): a promoted region carries them over.
    activated_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    grace_until: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    retired_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    destroy_after: Mapped[datetime | None] = mapped_column(DateTime(timezone=True))
    # The DEK's ``imported`` mark (0019): a promotion carries it over. NULL: copied before 0019.
    imported: Mapped[bool | None] = mapped_column(Boolean)

    __table_args__ = (
        UniqueConstraint("scope", "dek_version"),
        CheckConstraint("state IN ('pending', 'active', 'grace', 'retired')", name="state"),
    )


class ReplicaPromotion(Base):
    """Marks a secondary that was promoted to primary; replication never writes to it again."""

    __tablename__ = "replica_promotions"

    region: Mapped[str] = mapped_column(Text, primary_key=True)
    promoted_at: Mapped[datetime] = _now()
    previous_primary: Mapped[str] = mapped_column(Text)
    promoted_by: Mapped[str] = mapped_column(Text)
    keys: Mapped[int] = mapped_column(Integer)


class ReplicaRepairIntent(Base):
    """In the primary: a check about to repair a region; deleted with its audit event (0017)."""

    __tablename__ = "replica_repair_intents"

    id: Mapped[str] = mapped_column(Text, primary_key=True)
    region: Mapped[str] = mapped_column(Text, primary_key=True)
    scope: Mapped[str | None] = mapped_column(Text)
    actor: Mapped[str] = mapped_column(Text)
    started_at: Mapped[datetime] = _now()


class ReplicaRepairLog(Base):
    """In a region: the copies one repair wrote, counted in its batches' transactions (0017)."""

    __tablename__ = "replica_repair_log"

    repair_id: Mapped[str] = mapped_column(Text, primary_key=True)
    written: Mapped[int] = mapped_column(Integer)
    at: Mapped[datetime] = _now()


class InstallSalt(Base):
    """This install's salt for the local KEK derivation (one row, written by migration 0010)."""

    __tablename__ = "install_salt"

    id: Mapped[int] = mapped_column(SmallInteger, primary_key=True, server_default=text("1"))
    salt: Mapped[bytes] = mapped_column(LargeBinary)
    created_at: Mapped[datetime] = _now()

    __table_args__ = (
        CheckConstraint("id = 1", name="one_row"),
        CheckConstraint("length(salt) = 32", name="length"),
    )


class AuditKeyRow(Base):
    """An audit key, wrapped by the KEK (``keyrotor.audit.key``; migration 0011_audit_keyed)."""

    __tablename__ = "audit_keys"

    id: Mapped[int] = mapped_column(Integer, primary_key=True, autoincrement=False)
    switch_after: Mapped[int] = mapped_column(BigInteger)
    kek_id: Mapped[str] = mapped_column(Text)
    kek_version: Mapped[int] = mapped_column(Integer)
    wrapped: Mapped[bytes] = mapped_column(LargeBinary)
    created_at: Mapped[datetime] = _now()

    __table_args__ = (CheckConstraint("id > 0 AND switch_after >= 0", name="ids"),)


class ApiToken(Base):
    """A bearer token of the HTTP API, stored as its SHA-256 only (``keyrotor.store.tokens``;
    migration 0012_api_tokens)."""

    __tablename__ = "api_tokens"

    id: Mapped[int] = mapped_column(BigInteger, Identity(always=False), primary_key=True)
    actor: Mapped[str] = mapped_column(Text)
    token_hash: Mapped[bytes] = mapped_column(LargeBinary, unique=True)
    created_by: Mapped[str] = mapped_column(Text)
    created_at: Mapped[datetime] = _now()
    expires_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True), nullable=True)
    revoked_at: Mapped[datetime | None] = mapped_column(DateTime(timezone=True), nullable=True)

    __table_args__ = (
        CheckConstraint("length(token_hash) = 32", name="hash_length"),
        CheckConstraint("actor <> '*'", name="no_wildcard"),
    )
