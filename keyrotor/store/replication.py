"""Statements of multi-region replication: the primary's DEKs as replication reads them, the
check results it keeps (``kek_replicas``), and a region's copies (``replica_keys``) and its
promotion fence (a promotion's own statements: :mod:`keyrotor.store.promotion`).

Every function takes the session of a transaction the caller opened. The repair writes
(:func:`write_copies`) are one ``unnest`` statement a kind per batch, compare-and-swap for
updates and deletes: a copy changed since it was graded is left alone.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any, NamedTuple

from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncSession


class Lifecycle(NamedTuple):
    """A DEK's dates on the primary: a copy carries them, so a promoted region's DEKs go on
    from where the old primary's were (its grace ends, its destruction falls due, as there)."""

    activated_at: datetime | None = None
    grace_until: datetime | None = None
    retired_at: datetime | None = None
    destroy_after: datetime | None = None


NO_DATES = Lifecycle()


@dataclass(frozen=True, slots=True)
class ReplicaCopy:
    """One region's copy of one primary DEK, as read from ``replica_keys``."""

    id: int
    scope: str
    version: int
    state: str
    kek_version: int
    wrapped: bytes = field(repr=False)
    region_kek_id: str
    region_kek_version: int
    fingerprint: str
    dates: Lifecycle = NO_DATES
    imported: bool | None = None  # the DEK's mark when copied; None: copied before migration 0019


@dataclass(frozen=True, slots=True)
class PrimaryDek:
    """One DEK of the primary that still decrypts, as stored (wrapped under the primary's KEK)."""

    scope: str
    version: int
    state: str
    kek_id: str
    kek_version: int
    wrapped: bytes = field(repr=False)
    dates: Lifecycle = NO_DATES
    # Adopted from the old backend (``data_keys.imported``): the retirement proof scans for its values.
    imported: bool = True


@dataclass(frozen=True, slots=True)
class CopyWrite:
    """A verified copy to write into a region: new (``old`` None) or replacing ``old``."""

    scope: str
    version: int
    state: str
    kek_version: int
    source_kek_id: str
    source_region: str
    wrapped: bytes = field(repr=False)
    region_kek_id: str
    region_kek_version: int
    fingerprint: str
    dates: Lifecycle = NO_DATES
    imported: bool = True
    old: ReplicaCopy | None = None


@dataclass(frozen=True, slots=True)
class CheckRecord:
    """One region's check result as ``kek_replicas`` keeps it."""

    region: str
    status: str
    kek_version: int | None
    keys_total: int
    counts: str  # JSON text
    detail: str
    checked_at: datetime
    last_ok_at: datetime | None


# --- the primary -----------------------------------------------------------------------------


async def replicated_deks(session: AsyncSession, scope: str | None) -> list[PrimaryDek]:
    """The primary's DEKs that still decrypt (all, or one scope's): what every region copies."""
    sql = (
        "SELECT k.name, d.version, d.state, d.kek_id, d.kek_version, d.encrypted_dek, "
        "d.activated_at, d.grace_until, d.retired_at, d.destroy_after, d.imported "
        "FROM data_keys d JOIN key_scopes k ON k.id = d.scope_id "
        "WHERE d.state IN ('pending', 'active', 'grace', 'retired')"
    )
    params: dict[str, Any] = {}
    if scope is not None:
        sql += " AND k.name = :scope"
        params["scope"] = scope
    rows = (await session.execute(text(sql), params)).all()
    return [
        PrimaryDek(r[0], r[1], r[2], r[3], r[4], bytes(r[5]), Lifecycle(*r[6:10]), bool(r[10])) for r in rows
    ]


async def usable_keys(session: AsyncSession, keys: Sequence[tuple[str, int]]) -> set[tuple[str, int]]:
    """Which of ``keys`` (scope, version) are DEKs of the primary that still decrypt now."""
    rows = await session.execute(
        text(
            "SELECT k.name, d.version FROM data_keys d JOIN key_scopes k ON k.id = d.scope_id "
            "JOIN unnest(CAST(:s AS text[]), CAST(:v AS int[])) AS u(s, v) "
            "ON u.s = k.name AND u.v = d.version "
            "WHERE d.state IN ('pending', 'active', 'grace', 'retired')"
        ),
        {"s": [k[0] for k in keys], "v": [k[1] for k in keys]},
    )
    return {(r[0], r[1]) for r in rows.all()}


async def last_ok_times(session: AsyncSession) -> dict[str, datetime | None]:
    """When each region was last found in sync."""
    rows = (await session.execute(text("SELECT region, last_ok_at FROM kek_replicas"))).all()
    return {r[0]: r[1] for r in rows}


async def record_check(session: AsyncSession, rec: CheckRecord) -> None:
    """Keep a region's check result (``last_ok_at`` None keeps the one recorded before)."""
    await session.execute(
        text(
            "INSERT INTO kek_replicas (region, status, kek_version, keys_total, counts, detail, "
            "checked_at, last_ok_at) VALUES (:r, :st, :kv, :n, CAST(:c AS jsonb), :d, :at, :ok) "
            "ON CONFLICT (region) DO UPDATE SET status = EXCLUDED.status, "
            "kek_version = EXCLUDED.kek_version, keys_total = EXCLUDED.keys_total, "
            "counts = EXCLUDED.counts, detail = EXCLUDED.detail, "
            "checked_at = EXCLUDED.checked_at, "
            "last_ok_at = COALESCE(EXCLUDED.last_ok_at, kek_replicas.last_ok_at)"
        ),
        {
            "r": rec.region,
            "st": rec.status,
            "kv": rec.kek_version,
            "n": rec.keys_total,
            "c": rec.counts,
            "d": rec.detail,
            "at": rec.checked_at,
            "ok": rec.last_ok_at,
        },
    )


async def stored_checks(session: AsyncSession) -> list[dict[str, Any]]:
    """Every region's last recorded check, by region name (times in ISO form)."""
    rows = (
        await session.execute(
            text(
                "SELECT region, status, kek_version, keys_total, counts, detail, checked_at, last_ok_at "
                "FROM kek_replicas ORDER BY region"
            )
        )
    ).all()
    return [
        {
            "region": r[0],
            "status": r[1],
            "kek_version": r[2],
            "keys_total": r[3],
            "counts": r[4],
            "detail": r[5],
            "checked_at": r[6].isoformat(),
            "last_ok_at": r[7].isoformat() if r[7] else None,
        }
        for r in rows
    ]


# --- a region's copies -----------------------------------------------------------------------


async def region_copies(session: AsyncSession, scope: str | None) -> dict[tuple[str, int], ReplicaCopy]:
    """Every copy a region holds (or one scope's), by ``(scope, version)``."""
    sql = (
        "SELECT id, scope, dek_version, state, kek_version, wrapped_dek, region_kek_id, "
        "region_kek_version, fingerprint, activated_at, grace_until, retired_at, destroy_after, imported "
        "FROM replica_keys"
    )
    params: dict[str, Any] = {}
    if scope is not None:
        sql += " WHERE scope = :scope"
        params["scope"] = scope
    rows = (await session.execute(text(sql), params)).all()
    return {
        (r[1], r[2]): ReplicaCopy(
            r[0], r[1], r[2], r[3], r[4], r[5], r[6], r[7], r[8], Lifecycle(*r[9:13]), r[13]
        )
        for r in rows
    }


class CopyBlob(NamedTuple):
    """What a failover read needs of a region's copy."""

    wrapped: bytes
    region_kek_id: str
    region_kek_version: int
    fingerprint: str
    state: str
    proven_age_s: float  # since the copy was last written or its region last proven in sync


async def region_copy(session: AsyncSession, region: str, scope: str, version: int) -> CopyBlob | None:
    """A region's copy of one DEK version, or None.

    ``proven_age_s`` counts from the later of the copy's ``replicated_at`` and the region's own
    ``kek_replicas.last_ok_at`` (:func:`mark_verified`), on the region database's clock.
    """
    row = (
        await session.execute(
            text(
                "SELECT r.wrapped_dek, r.region_kek_id, r.region_kek_version, r.fingerprint, r.state, "
                "EXTRACT(EPOCH FROM now() - GREATEST(r.replicated_at, "
                "(SELECT k.last_ok_at FROM kek_replicas k WHERE k.region = :r))) "
                "FROM replica_keys r WHERE r.scope = :s AND r.dek_version = :v"
            ),
            {"r": region, "s": scope, "v": version},
        )
    ).first()
    if row is None:
        return None
    return CopyBlob(bytes(row[0]), row[1], row[2], row[3], row[4], float(row[5]))


async def mark_verified(session: AsyncSession, region: str, *, primary: str, keys: int) -> None:
    """Record, in a region's own ``kek_replicas``, that a full check just proved every copy of
    the region in sync with ``primary`` (times on the region database's clock)."""
    await session.execute(
        text(
            "INSERT INTO kek_replicas (region, status, keys_total, detail, checked_at, last_ok_at) "
            "VALUES (:r, 'in_sync', :n, :d, now(), now()) ON CONFLICT (region) DO UPDATE SET "
            "status = 'in_sync', keys_total = EXCLUDED.keys_total, detail = EXCLUDED.detail, "
            "checked_at = now(), last_ok_at = now()"
        ),
        {"r": region, "n": keys, "d": f"every copy proven in sync with primary {primary}"},
    )


async def delete_copy(session: AsyncSession, scope: str, version: int) -> int:
    """Delete a region's copy of one DEK version; returns the rows deleted (0 or 1)."""
    res = await session.execute(
        text("DELETE FROM replica_keys WHERE scope = :s AND dek_version = :v"),
        {"s": scope, "v": version},
    )
    return int(getattr(res, "rowcount", 0) or 0)


_WRITE_COLUMNS = ("state", "kv", "skid", "src", "blob", "rkid", "rkv", "fp", "act", "gu", "ra", "da", "imp")


def _write_params(w: CopyWrite) -> dict[str, Any]:
    return {
        "s": w.scope,
        "v": w.version,
        "state": w.state,
        "kv": w.kek_version,
        "skid": w.source_kek_id,
        "src": w.source_region,
        "blob": w.wrapped,
        "rkid": w.region_kek_id,
        "rkv": w.region_kek_version,
        "fp": w.fingerprint,
        "act": w.dates.activated_at,
        "gu": w.dates.grace_until,
        "ra": w.dates.retired_at,
        "da": w.dates.destroy_after,
        "imp": w.imported,
        "old_id": w.old.id if w.old else None,
        "old_blob": w.old.wrapped if w.old else None,
        "old_fp": w.old.fingerprint if w.old else None,
    }


def _columns(rows: Sequence[dict[str, Any]], names: Sequence[str]) -> dict[str, list[Any]]:
    return {c: [r[c] for r in rows] for c in names}


async def _insert_copies(session: AsyncSession, rows: Sequence[dict[str, Any]]) -> int:
    res = await session.execute(
        text(
            "INSERT INTO replica_keys (scope, dek_version, state, "
            "kek_version, source_kek_id, "
            "source_region, wrapped_dek, region_kek_id, region_kek_version, fingerprint, "
            "activated_at, grace_until, retired_at, destroy_after, imported) "
            "SELECT * FROM unnest(CAST(:s AS text[]), CAST(:v AS int[]), "
            "CAST(:state AS text[]), "
            "CAST(:kv AS int[]), CAST(:skid AS text[]), CAST(:src AS "
            "text[]), CAST(:blob AS bytea[]), "
            "CAST(:rkid AS text[]), CAST(:rkv AS int[]), CAST(:fp AS text[]), "
            "CAST(:act AS timestamptz[]), CAST(:gu AS timestamptz[]), "
            "CAST(:ra AS timestamptz[]), CAST(:da AS timestamptz[]), CAST(:imp AS boolean[])) "
            "ON CONFLICT (scope, dek_version) DO NOTHING"
        ),
        _columns(rows, ("s", "v", *_WRITE_COLUMNS)),
    )
    return int(getattr(res, "rowcount", 0) or 0)


async def _swap_copies(session: AsyncSession, rows: Sequence[dict[str, Any]]) -> int:
    res = await session.execute(
        text(
            "UPDATE replica_keys r SET state = u.state, kek_version = u.kv, "
            "source_kek_id = u.skid, "
            "source_region = u.src, wrapped_dek = u.blob, region_kek_id = u.rkid, "
            "region_kek_version = u.rkv, fingerprint = u.fp, activated_at = u.act, "
            "grace_until = u.gu, retired_at = u.ra, destroy_after = u.da, imported = u.imp, "
            "replicated_at = now() "
            "FROM unnest(CAST(:id AS bigint[]), CAST(:state AS text[]), CAST(:kv AS int[]), "
            "CAST(:skid AS text[]), CAST(:src AS text[]), CAST(:blob AS bytea[]), "
            "CAST(:rkid AS text[]), CAST(:rkv AS int[]), CAST(:fp AS text[]), "
            "CAST(:act AS timestamptz[]), CAST(:gu AS timestamptz[]), "
            "CAST(:ra AS timestamptz[]), CAST(:da AS timestamptz[]), CAST(:imp AS boolean[]), "
            "CAST(:old_blob AS bytea[]), CAST(:old_fp AS text[])) "
            "AS u(id, state, kv, skid, src, blob, rkid, rkv, fp, act, gu, ra, da, imp, old_blob, old_fp) "
            "WHERE r.id = u.id AND r.wrapped_dek = u.old_blob AND r.fingerprint = u.old_fp"
        ),
        {"id": [r["old_id"] for r in rows], **_columns(rows, (*_WRITE_COLUMNS, "old_blob", "old_fp"))},
    )
    return int(getattr(res, "rowcount", 0) or 0)


async def _drop_copies(session: AsyncSession, copies: Sequence[ReplicaCopy]) -> int:
    res = await session.execute(
        text(
            "DELETE FROM replica_keys r USING unnest(CAST(:id AS bigint[]), "
            "CAST(:blob AS bytea[])) "
            "AS d(id, blob) WHERE r.id = d.id AND r.wrapped_dek = d.blob"
        ),
        {"id": [c.id for c in copies], "blob": [c.wrapped for c in copies]},
    )
    return int(getattr(res, "rowcount", 0) or 0)


async def write_copies(
    session: AsyncSession, writes: Sequence[CopyWrite], drops: Sequence[ReplicaCopy]
) -> int:
    """Insert new copies, replace old ones and delete dropped ones, each unchanged since it was
    read (compare-and-swap). Returns the rows written or deleted."""
    rows = [_write_params(w) for w in writes]
    inserts = [r for r in rows if r["old_id"] is None]
    updates = [r for r in rows if r["old_id"] is not None]
    written = 0
    if inserts:
        written += await _insert_copies(session, inserts)
    if updates:
        written += await _swap_copies(session, updates)
    if drops:
        written += await _drop_copies(session, drops)
    return written


# --- promotion ------------------------------------------------------------------------------


async def lock_copies_for_write(session: AsyncSession) -> None:
    """Take ``replica_keys``' write lock before anything else in a repair's transaction: a
    promotion (:func:`keyrotor.store.promotion.lock_copies_for_promotion`) then either waits for
    the repair to commit, or has committed before the repair's next statement, which sees its
    fence."""
    await session.execute(text("LOCK TABLE replica_keys IN ROW EXCLUSIVE MODE"))


async def promotion_record(session: AsyncSession) -> dict[str, Any] | None:
    """The region's promotion record, if it was promoted to primary."""
    row = (
        await session.execute(
            text("SELECT region, promoted_at, previous_primary FROM replica_promotions LIMIT 1")
        )
    ).first()
    return None if row is None else {"region": row[0], "promoted_at": row[1], "previous_primary": row[2]}
