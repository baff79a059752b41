"""The census tables: ``key_locations`` (where values of each DEK version were sealed),
``location_acks`` (locations an operator accepted to lose), the encryptions reserved per DEK
(``data_keys.encryptions``), and the counts of ``secrets`` rows per DEK version.
"""

from __future__ import annotations

from collections.abc import Sequence
from datetime import datetime
from typing import Any

from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncSession

# --- where values live ------------------------------------------------------------------------

# First sighting of a (scope, version, location) in a process: one row, committed with the
# encryptions that made it before the ciphertext is returned (a process that dies before its
# next flush leaves no location holding values at 0). Later encrypts add to the in-memory count.
_RECORD = text(
    "INSERT INTO key_locations AS k (scope_id, dek_version, location, encryptions) "
    "VALUES (:s, :v, :l, :n) ON CONFLICT (scope_id, dek_version, location) DO UPDATE "
    "SET encryptions = k.encryptions + excluded.encryptions, last_seen = now()"
)
# keyrotor's own writers of new ciphertexts (rotation, retirement sweeps): one statement per batch,
# in the batch's own transaction, so the locations commit with the values (asyncpg parameters).
_RECORD_BATCH = (
    "INSERT INTO key_locations AS k (scope_id, dek_version, location, encryptions) "
    "SELECT $1::bigint, $2::int, u.loc, u.n FROM unnest($3::text[], $4::bigint[]) AS u(loc, n) "
    "ORDER BY u.loc ON CONFLICT (scope_id, dek_version, location) DO UPDATE "
    "SET encryptions = k.encryptions + excluded.encryptions, last_seen = now()"
)
# Per-location counts, batched. An upsert, so a row that was evicted from (or never entered) the
# seen set still lands; rows are taken in key order so concurrent flushes never deadlock, and a
# scope deleted meanwhile drops its counts instead of failing every flush.
_ADD_COUNTS = text(
    "INSERT INTO key_locations AS k (scope_id, dek_version, location, encryptions) "
    "SELECT u.sid, u.ver, u.loc, u.n FROM unnest(CAST(:sids AS bigint[]), CAST(:vers AS int[]), "
    "CAST(:locs AS text[]), CAST(:ns AS bigint[])) AS u(sid, ver, loc, n) "
    "JOIN key_scopes s ON s.id = u.sid ORDER BY u.sid, u.ver, u.loc "
    "ON CONFLICT (scope_id, dek_version, location) DO UPDATE "
    "SET encryptions = k.encryptions + excluded.encryptions, last_seen = now()"
)
_LOCATIONS = text(
    "SELECT s.name, k.location, k.dek_version, d.state, k.encryptions, k.first_seen, k.last_seen "
    "FROM key_locations k JOIN key_scopes s ON s.id = k.scope_id "
    "LEFT JOIN data_keys d ON d.scope_id = k.scope_id AND d.version = k.dek_version "
    "ORDER BY s.name, k.location, k.dek_version"
)


async def record_location(session: AsyncSession, scope_id: int, version: int, location: str, n: int) -> None:
    """Record that ``n`` values of ``scope_id`` v``version`` were sealed for ``location``."""
    await session.execute(_RECORD, {"s": scope_id, "v": version, "l": location, "n": n})


async def record_location_counts(
    apg: Any, scope_id: int, version: int, locations: Sequence[str], counts: Sequence[int]
) -> None:
    """Add ``counts[i]`` values sealed for ``locations[i]`` (sorted) under ``scope_id`` v``version``,
    inside the transaction of ``apg`` (an asyncpg connection)."""
    await apg.execute(_RECORD_BATCH, scope_id, version, locations, counts)


async def add_location_counts(
    session: AsyncSession, keys: Sequence[tuple[int, int, str]], counts: Sequence[int]
) -> None:
    """Add ``counts[i]`` encryptions to the location ``keys[i]`` = (scope id, version, location);
    ``keys`` sorted. Counts of scopes that no longer exist are dropped."""
    await session.execute(
        _ADD_COUNTS,
        {
            "sids": [k[0] for k in keys],
            "vers": [k[1] for k in keys],
            "locs": [k[2] for k in keys],
            "ns": list(counts),
        },
    )


async def recorded_locations(session: AsyncSession, scope_id: int, version: int) -> list[str]:
    """The locations values of ``scope_id`` v``version`` were sealed for, sorted."""
    stmt = text(
        "SELECT location FROM key_locations WHERE scope_id = :s AND dek_version = :v ORDER BY location"
    )
    return list((await session.execute(stmt, {"s": scope_id, "v": version})).scalars())


async def location_versions(session: AsyncSession) -> Sequence[Sequence[Any]]:
    """Every recorded location as ``(scope, location, version, DEK state, encryptions, first_seen,
    last_seen)``, by scope, location and version (state None: the DEK row is not visible)."""
    return (await session.execute(_LOCATIONS)).all()


async def covers(session: AsyncSession) -> Sequence[Sequence[Any]]:
    """``(table, column, scope, context_template, pk_column)`` of every registered column."""
    stmt = text("SELECT table_name, column_name, scope, context_template, pk_column FROM managed_columns")
    return (await session.execute(stmt)).all()


# --- acknowledgements -------------------------------------------------------------------------


async def acknowledged_locations(session: AsyncSession) -> set[tuple[str, str]]:
    """``(location, scope)`` of every acknowledgement (scope ``*``: every scope)."""
    rows = (await session.execute(text("SELECT location, scope FROM location_acks"))).all()
    return {(r[0], r[1]) for r in rows}


async def acknowledgements(session: AsyncSession, location: str) -> list[tuple[str, str, str, datetime]]:
    """``(scope, reason, actor, acknowledged_at)`` of each acknowledgement of ``location``, by
    scope, locked (none: an empty list)."""
    stmt = text(
        "SELECT scope, reason, actor, acknowledged_at FROM location_acks WHERE location = :l "
        "ORDER BY scope FOR UPDATE"
    )
    return [(r[0], r[1], r[2], r[3]) for r in (await session.execute(stmt, {"l": location})).all()]


async def recorded_scopes(session: AsyncSession, location: str) -> list[str]:
    """The scopes any value was ever recorded at ``location`` for, by name."""
    stmt = text(
        "SELECT DISTINCT s.name FROM key_locations l JOIN key_scopes s ON s.id = l.scope_id "
        "WHERE l.location = :l ORDER BY s.name"
    )
    return list((await session.execute(stmt, {"l": location})).scalars())


async def acknowledge(
    session: AsyncSession, location: str, scopes: Sequence[str], reason: str, actor: str
) -> None:
    """Acknowledge ``location`` for each of ``scopes`` (``*``: every scope), replacing the
    acknowledgements of those scopes given before."""
    await session.execute(
        text(
            "INSERT INTO location_acks (location, scope, reason, actor) "
            "SELECT :l, s, :r, :a FROM unnest(CAST(:scopes AS text[])) AS s "
            "ON CONFLICT (location, scope) DO UPDATE SET reason = excluded.reason, "
            "actor = excluded.actor, acknowledged_at = now()"
        ),
        {"l": location, "scopes": list(scopes), "r": reason, "a": actor},
    )


async def drop_acknowledgements(session: AsyncSession, location: str, scopes: Sequence[str] | None) -> None:
    """Take back ``location``'s acknowledgements of ``scopes`` (None: all of them)."""
    if scopes is None:
        await session.execute(text("DELETE FROM location_acks WHERE location = :l"), {"l": location})
        return
    await session.execute(
        text("DELETE FROM location_acks WHERE location = :l AND scope = ANY(CAST(:scopes AS text[]))"),
        {"l": location, "scopes": list(scopes)},
    )


# --- encryptions per DEK ------------------------------------------------------------------------

# One round trip: lock the key row, compute the hard stop, reserve what is asked for (at least
# :need, all or nothing; at most :want and a quarter of what is left), return what was reserved.
# The scope row is only read (not locked), so this never deadlocks with a rotation. A retired or
# destroyed DEK reserves nothing: a process whose cache still names it as active then reads the
# active version again (KeyRing.reserve) instead of sealing new values a destruction would lose.
_RESERVE = text(
    "WITH c AS (SELECT d.id, d.encryptions AS used, "
    "LEAST(coalesce(s.max_encryptions, :default_max), :ceiling) AS lim, "
    "s.rotation_enabled AND s.active_version = d.version AS rotates "
    "FROM data_keys d JOIN key_scopes s ON s.id = d.scope_id "
    "WHERE d.scope_id = :sid AND d.version = :ver AND d.state NOT IN ('retired', 'destroyed') "
    "FOR UPDATE OF d), "
    "h AS (SELECT c.*, CASE WHEN rotates THEN LEAST(2 * lim, :ceiling) ELSE lim END AS hard FROM c), "
    "g AS (SELECT h.*, CASE WHEN hard - used < :need THEN 0 "
    "ELSE LEAST(hard - used, GREATEST(:need, LEAST(:want, (hard - used) / 4))) END AS n FROM h) "
    "UPDATE data_keys d SET encryptions = d.encryptions + g.n FROM g WHERE d.id = g.id "
    "RETURNING g.n, d.encryptions, g.lim, g.hard, g.rotates"
)
_MARK_DUE = text(
    "UPDATE key_scopes s SET next_rotation_at = :now, updated_at = now() "
    "WHERE s.id = :sid AND s.active_version = :ver AND s.rotation_enabled "
    "AND (s.next_rotation_at IS NULL OR s.next_rotation_at > :now) "
    "RETURNING s.name"
)


async def reserve_encryptions(
    session: AsyncSession,
    scope_id: int,
    version: int,
    *,
    need: int,
    want: int,
    default_max: int,
    ceiling: int,
) -> tuple[int, int, int, int, bool] | None:
    """Reserve between ``need`` and ``want`` encryptions of a DEK, or none if fewer than ``need``
    are left before its hard stop.

    Returns:
        ``(reserved, encryptions now counted, limit, hard stop, rotates)``, or None if the DEK
        does not exist or takes no new values (retired, destroyed).
        ``rotates``: the DEK is its scope's active one and rotation is enabled.
    """
    params = {
        "sid": scope_id,
        "ver": version,
        "need": need,
        "want": want,
        "default_max": default_max,
        "ceiling": ceiling,
    }
    row = (await session.execute(_RESERVE, params)).first()
    if row is None:
        return None
    return int(row[0]), int(row[1]), int(row[2]), int(row[3]), bool(row[4])


async def mark_scope_due(session: AsyncSession, scope_id: int, version: int, now: datetime) -> str | None:
    """Make the scope due for rotation at ``now`` if ``version`` is its active DEK, rotation is
    enabled and it was due later; the scope's name if it was changed."""
    row = (await session.execute(_MARK_DUE, {"sid": scope_id, "ver": version, "now": now})).first()
    return None if row is None else str(row[0])


# --- rows of the secrets table ----------------------------------------------------------------


async def secrets_per_version(session: AsyncSession) -> Sequence[Sequence[Any]]:
    """``(scope id, DEK version, rows)`` of the ``secrets`` table."""
    stmt = text("SELECT scope_id, dek_version, count(*) FROM secrets GROUP BY scope_id, dek_version")
    return (await session.execute(stmt)).all()


async def scope_names(session: AsyncSession, ids: Sequence[int]) -> dict[int, str]:
    """The names of the scopes ``ids`` (those that exist)."""
    rows = await session.execute(
        text("SELECT id, name FROM key_scopes WHERE id = ANY(:ids)"), {"ids": list(ids)}
    )
    return {int(r[0]): str(r[1]) for r in rows.all()}
