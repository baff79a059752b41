"""The scheduler's statements: the due scans, the dry run's counts, new DEKs, and the leader lock.

The due scans page through candidates in keyset order over partial indexes (``ix_key_scopes_due``
for rotations), ``batch`` rows a call, so a scan reads only due rows, never the whole table.
Locked, each page is ``FOR UPDATE ... SKIP LOCKED``: two scans share the work instead of both
seeing a row. What is due, and what a scan does about it, is :mod:`keyrotor.schedule.scan`'s.
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime
from typing import Any

import asyncpg
from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession

# Consecutive failures of a scope's runs of one kind: failed runs since its last completed one.
_FAILURES = (
    "LEFT JOIN LATERAL (SELECT count(*) AS failures, max(r.finished_at) AS last_failed_at "
    "FROM rotations r WHERE r.scope_id = {sid} AND r.kind = '{kind}' AND r.state = 'failed' "
    "AND r.id > coalesce((SELECT max(c.id) FROM rotations c "
    "WHERE c.scope_id = {sid} AND c.kind = '{kind}' AND c.state = 'completed'), 0)) f ON true"
)
# Spelled like uq_rotations_one_open so that the check is a lookup in that partial index.
_HAS_OPEN = (
    "EXISTS (SELECT 1 FROM rotations o WHERE o.kind = '{kind}' AND coalesce(o.scope_id, 0) = {sid} "
    "AND o.state IN ('pending', 'running'))"
)

# Row: scope id, name, active version, latest version, next_rotation_at, active DEK's
# encryptions, encryption limit, has an open run, failures, last failure.
DUE_SCOPES_SQL = (
    "SELECT s.id, s.name, s.active_version, s.latest_version, s.next_rotation_at, "
    "coalesce(d.encryptions, 0), coalesce(s.max_encryptions, :default_max), "
    f"{_HAS_OPEN.format(kind='dek', sid='s.id')}, f.failures, f.last_failed_at "
    "FROM key_scopes s "
    "LEFT JOIN data_keys d ON d.scope_id = s.id AND d.version = s.active_version "
    f"{_FAILURES.format(kind='dek', sid='s.id')} "
    "WHERE s.rotation_enabled AND s.next_rotation_at IS NOT NULL AND s.next_rotation_at <= :now "
    "AND (s.next_rotation_at, s.id) > (:after_at, :after_id) "
    "ORDER BY s.next_rotation_at, s.id LIMIT :batch"
)
# Row: DEK id, scope id, scope name, version, grace_until, has an open run, failures, last failure.
DUE_GRACE_SQL = (
    "SELECT d.id, d.scope_id, s.name, d.version, d.grace_until, "
    f"{_HAS_OPEN.format(kind='retire', sid='d.scope_id')}, f.failures, f.last_failed_at "
    "FROM data_keys d JOIN key_scopes s ON s.id = d.scope_id "
    f"{_FAILURES.format(kind='retire', sid='d.scope_id')} "
    "WHERE d.state = 'grace' AND d.grace_until <= :now AND (d.grace_until, d.id) > (:after_at, :after_id) "
    "ORDER BY d.grace_until, d.id LIMIT :batch"
)
# Retired DEKs whose destruction window has passed (a use since retired_at is the job's to find:
# it cancels the window in the same transaction that would erase the key). Row as DUE_GRACE_SQL,
# with destroy_after for grace_until.
DUE_DESTROY_SQL = (
    "SELECT d.id, d.scope_id, s.name, d.version, d.destroy_after, "
    f"{_HAS_OPEN.format(kind='retire', sid='d.scope_id')}, f.failures, f.last_failed_at "
    "FROM data_keys d JOIN key_scopes s ON s.id = d.scope_id "
    f"{_FAILURES.format(kind='retire', sid='d.scope_id')} "
    "WHERE d.state = 'retired' AND d.destroy_after <= :now "
    "AND (d.destroy_after, d.id) > (:after_at, :after_id) "
    "ORDER BY d.destroy_after, d.id LIMIT :batch"
)
_LOCK_SCOPES = " FOR UPDATE OF s SKIP LOCKED"
_LOCK_KEYS = " FOR UPDATE OF d SKIP LOCKED"


async def due_scopes(
    session: AsyncSession,
    now: datetime,
    after: tuple[datetime, int],
    *,
    batch: int,
    default_max: int,
    lock: bool,
) -> list[Any]:
    """One page of scopes due at ``now`` after the keyset position ``after`` (DUE_SCOPES_SQL rows);
    ``lock`` locks them, skipping those another transaction holds."""
    rows = await session.execute(
        text(DUE_SCOPES_SQL + _LOCK_SCOPES if lock else DUE_SCOPES_SQL),
        {
            "now": now,
            "after_at": after[0],
            "after_id": after[1],
            "batch": batch,
            "default_max": default_max,
        },
    )
    return list(rows.all())


async def due_keys(
    session: AsyncSession,
    now: datetime,
    after: tuple[datetime, int],
    *,
    batch: int,
    destroy: bool,
    lock: bool,
) -> list[Any]:
    """One page of DEKs whose grace (``destroy``: destruction window) ended by ``now`` after the
    keyset position ``after`` (DUE_GRACE_SQL rows); ``lock`` locks them, skipping held ones."""
    sql = DUE_DESTROY_SQL if destroy else DUE_GRACE_SQL
    rows = await session.execute(
        text(sql + _LOCK_KEYS if lock else sql),
        {"now": now, "after_at": after[0], "after_id": after[1], "batch": batch},
    )
    return list(rows.all())


async def rotation_facts(session: AsyncSession, scope: str, *, default_max: int) -> Any | None:
    """``(id, active version, latest version, rotation enabled, next_rotation_at, active DEK's
    encryptions, encryption limit, newest pending version)`` of a scope, or None."""
    return (
        await session.execute(
            text(
                "SELECT s.id, s.active_version, s.latest_version, s.rotation_enabled, "
                "s.next_rotation_at, "
                "coalesce(d.encryptions, 0), coalesce(s.max_encryptions, :default_max), "
                "(SELECT version FROM data_keys p WHERE p.scope_id = s.id AND p.state = 'pending' "
                "ORDER BY version DESC LIMIT 1) "
                "FROM key_scopes s "
                "LEFT JOIN data_keys d ON d.scope_id = s.id AND d.version = s.active_version "
                "WHERE s.name = :name"
            ),
            {"name": scope, "default_max": default_max},
        )
    ).first()


async def versions_in_states(
    session: AsyncSession, scope_ids: Sequence[int], states: Sequence[str]
) -> list[tuple[int, int]]:
    """``(scope id, version)`` of the scopes' DEKs in ``states``."""
    rows = await session.execute(
        text(
            "SELECT scope_id, version FROM data_keys WHERE scope_id = ANY(CAST(:ids AS bigint[])) "
            "AND state = ANY(CAST(:states AS text[]))"
        ),
        {"ids": list(scope_ids), "states": list(states)},
    )
    return [(sid, version) for sid, version in rows.all()]


async def secrets_by_version(session: AsyncSession, scope_ids: Sequence[int]) -> list[tuple[int, int, int]]:
    """``(scope id, DEK version, rows)`` of keyrotor's ``secrets`` table for the scopes."""
    rows = await session.execute(
        text(
            "SELECT scope_id, dek_version, count(*) FROM secrets "
            "WHERE scope_id = ANY(CAST(:ids AS bigint[])) "
            "GROUP BY scope_id, dek_version"
        ),
        {"ids": list(scope_ids)},
    )
    return [(sid, version, int(n)) for sid, version, n in rows.all()]


# --- DEKs the regions have not been told about ------------------------------------------------


async def newest_dek_id(session: AsyncSession) -> int:
    """The highest ``data_keys.id`` (0 when there is none)."""
    return int((await session.execute(text("SELECT max(id) FROM data_keys"))).scalar_one() or 0)


async def deks_after(session: AsyncSession, dek_id: int, *, limit: int) -> list[tuple[int, str]]:
    """``(DEK id, scope name)`` of up to ``limit`` DEKs with an id above ``dek_id``, by id."""
    rows = await session.execute(
        text(
            "SELECT d.id, k.name FROM data_keys d JOIN key_scopes k ON k.id = d.scope_id "
            "WHERE d.id > :w ORDER BY d.id LIMIT :n"
        ),
        {"w": dek_id, "n": limit},
    )
    return [(int(i), name) for i, name in rows.all()]


# --- the leader lock: a session-level advisory lock on a connection of its own -------------------


async def try_leader_lock(conn: asyncpg.Connection, key: int) -> bool:
    """Take the session-level advisory lock ``key`` if it is free."""
    return bool(await conn.fetchval("SELECT pg_try_advisory_lock($1)", key))


async def release_leader_lock(conn: asyncpg.Connection, key: int, channel: str, *, timeout_s: float) -> None:
    """Give the session-level advisory lock ``key`` up and NOTIFY ``channel`` (delivered once the
    statement commits, so after the lock is free): standbys listening there try it at once."""
    await conn.fetchval("SELECT pg_advisory_unlock($1), pg_notify($2, '')", key, channel, timeout=timeout_s)


async def ping(conn: asyncpg.Connection, *, timeout_s: float) -> None:
    """A round trip on the connection (raises if it is gone)."""
    await conn.fetchval("SELECT 1", timeout=timeout_s)


async def end_session_when_idle(conn: asyncpg.Connection, timeout_ms: int) -> None:
    """Have Postgres close this session after ``timeout_ms`` without a statement (Postgres 14+).

    Raises:
        asyncpg.UndefinedObjectError: an older server.
    """
    await conn.execute(f"SET idle_session_timeout = {int(timeout_ms)}")


async def ping_engine(engine: AsyncEngine) -> None:
    """A round trip on one of the engine's connections (raises if Postgres is unreachable)."""
    async with engine.connect() as conn:
        await conn.execute(text("SELECT 1"))
