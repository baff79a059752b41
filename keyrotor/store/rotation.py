"""The statements of a DEK rotation: the scope's DEK rows and a fanned-out run's id ranges.

Each function runs in the caller's transaction (``keyrotor.store.db.transaction``).
"""

from __future__ import annotations

from typing import Any

from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncSession

from keyrotor.store.dates import days_from_now

# --- DEK rows -----------------------------------------------------------------------------


async def pending_dek_version(session: AsyncSession, scope_id: int) -> int | None:
    """The newest ``pending`` DEK version of the scope, or None."""
    version: int | None = (
        await session.execute(
            text(
                "SELECT version FROM data_keys WHERE scope_id = :s AND state = 'pending' "
                "ORDER BY version DESC LIMIT 1"
            ),
            {"s": scope_id},
        )
    ).scalar_one_or_none()
    return version


async def insert_pending_dek(
    session: AsyncSession, scope_id: int, version: int, *, blob: bytes, kek_id: str, kek_version: int
) -> None:
    """Store a new wrapped DEK ``pending`` and make it the scope's latest version (keyrotor's
    own, not ``imported``: it seals only ``kr1`` values)."""
    await session.execute(
        text(
            "INSERT INTO data_keys (scope_id, version, state, encrypted_dek, kek_id, kek_version, imported) "
            "VALUES (:s, :v, 'pending', :blob, :kid, :kv, false)"
        ),
        {
            "s": scope_id,
            "v": version,
            "blob": blob,
            "kid": kek_id,
            "kv": kek_version,
        },
    )
    await session.execute(
        text("UPDATE key_scopes SET latest_version = :v, updated_at = now() WHERE id = :s"),
        {"s": scope_id, "v": version},
    )


async def dek_state(session: AsyncSession, scope_id: int, version: int) -> str | None:
    """The state of one DEK version, or None if it does not exist."""
    state: str | None = (
        await session.execute(
            text("SELECT state FROM data_keys WHERE scope_id = :s AND version = :v"),
            {"s": scope_id, "v": version},
        )
    ).scalar_one_or_none()
    return state


async def promote_dek(session: AsyncSession, scope_id: int, version: int) -> None:
    """Make ``version`` the active DEK; the active one goes to ``grace`` for the scope's grace days."""
    await session.execute(
        text(
            "UPDATE data_keys SET state = 'grace', "
            f"grace_until = {days_from_now('SELECT grace_period_days FROM key_scopes WHERE id = :s')} "
            "WHERE scope_id = :s AND state = 'active'"
        ),
        {"s": scope_id},
    )
    await session.execute(
        text(
            "UPDATE data_keys SET state = 'active', activated_at = now() WHERE scope_id = :s AND version = :v"
        ),
        {"s": scope_id, "v": version},
    )
    await session.execute(
        text("UPDATE key_scopes SET active_version = :v, updated_at = now() WHERE id = :s"),
        {"s": scope_id, "v": version},
    )


async def record_rotation(session: AsyncSession, scope_id: int, version: int, rows: int) -> None:
    """Count a completed rotation on the scope (and schedule the next), and the ``rows`` it
    re-encrypted as encryptions under the new DEK ``version``."""
    await session.execute(
        text(
            "UPDATE key_scopes SET dek_rotation_count = dek_rotation_count + 1, last_rotation_at = now(), "
            f"next_rotation_at = CASE WHEN rotation_enabled THEN {days_from_now('interval_days')} "
            "END, updated_at = now() WHERE id = :s"
        ),
        {"s": scope_id},
    )
    await session.execute(
        text("UPDATE data_keys SET encryptions = encryptions + :n WHERE scope_id = :s AND version = :v"),
        {"n": rows, "s": scope_id, "v": version},
    )


async def dek_rows(session: AsyncSession, scope_id: int, up_to: int) -> list[Any]:
    """``(version, state, encrypted_dek, kek_id, kek_version)`` of the scope's DEKs up to ``up_to``."""
    return list(
        (
            await session.execute(
                text(
                    "SELECT version, state, encrypted_dek, kek_id, kek_version FROM data_keys "
                    "WHERE scope_id = :sid AND version <= :v ORDER BY version"
                ),
                {"sid": scope_id, "v": up_to},
            )
        ).all()
    )


async def one_dek_per_kek(session: AsyncSession, scope: str | None) -> list[Any]:
    """``(scope, version, kek_id, kek_version, encrypted_dek)`` of one live DEK per KEK id and
    version (of ``scope``, or of all scopes)."""
    sql = (
        "SELECT DISTINCT ON (d.kek_id, d.kek_version) s.name, d.version, d.kek_id, d.kek_version, "
        "d.encrypted_dek FROM data_keys d JOIN key_scopes s ON s.id = d.scope_id "
        "WHERE d.state <> 'destroyed'"
    )
    params: dict[str, object] = {}
    if scope is not None:
        sql += " AND s.name = :scope"
        params["scope"] = scope
    sql += " ORDER BY d.kek_id, d.kek_version, d.id DESC"
    return list((await session.execute(text(sql), params)).all())


# --- the id ranges of a fanned-out run ------------------------------------------------------


async def pending_ranges(session: AsyncSession, run_id: int) -> list[tuple[str, int, int]]:
    """``(target, lo, hi)`` of the run's ranges still to do, in order."""
    rows = (
        await session.execute(
            text(
                "SELECT target, lo, hi FROM rotation_ranges WHERE run_id = :r AND state = 'pending' "
                "ORDER BY target, lo"
            ),
            {"r": run_id},
        )
    ).all()
    return [(t, lo, hi) for t, lo, hi in rows]


async def count_pending_ranges(session: AsyncSession, run_id: int) -> int:
    """How many of the run's ranges are still to do."""
    left: int = (
        await session.execute(
            text("SELECT count(*) FROM rotation_ranges WHERE run_id = :r AND state = 'pending'"),
            {"r": run_id},
        )
    ).scalar_one()
    return left


async def lock_range(session: AsyncSession, run_id: int, target: str, lo: int) -> Any:
    """Lock one range row: ``(id, state, version, run state, cursor, after_key, hi_key,
    cursor_key)``, or None if the run has no such range."""
    return (
        await session.execute(
            text(
                "SELECT g.id, g.state, g.version, r.state, g.cursor, g.after_key, g.hi_key, g.cursor_key "
                "FROM rotation_ranges g "
                "JOIN rotations r ON r.id = g.run_id "
                "WHERE g.run_id = :r AND g.target = :t AND g.lo = :lo "
                "FOR UPDATE OF g"
            ),
            {"r": run_id, "t": target, "lo": lo},
        )
    ).first()


async def advance_range(
    session: AsyncSession, range_id: int, *, cursor: int | None, cursor_key: str | None, rows: int
) -> None:
    """Move a range's cursor past a batch (``cursor`` for integer keys, else ``cursor_key``)."""
    await session.execute(
        text(
            "UPDATE rotation_ranges SET cursor = coalesce(:c, cursor), cursor_key = :ck, "
            "rows_done = rows_done + :n, updated_at = now() WHERE id = :id"
        ),
        {"id": range_id, "c": cursor, "ck": cursor_key, "n": rows},
    )


# The range's cursor and counter, then the run's: one round trip, the shared run row last.
_ADVANCE_RANGE_AND_RUN = (
    "WITH g AS (UPDATE rotation_ranges SET cursor = coalesce($2, cursor), cursor_key = $3, "
    "rows_done = rows_done + $4, updated_at = now() WHERE id = $1) "
    "UPDATE rotations SET rows_done = rows_done + $4, "
    "rows_total = greatest(coalesce(rows_total, 0), rows_done + $4), updated_at = now() WHERE id = $5"
)


async def advance_range_and_run(
    apg: Any, range_id: int, run_id: int, *, cursor: int | None, cursor_key: str | None, rows: int
) -> None:
    """:func:`advance_range`, then the run's counters as ``keyrotor.store.runs.add_progress``
    advances them, in one statement on the asyncpg connection ``apg`` of the caller's
    transaction: a batch's last statement before its commit."""
    await apg.execute(_ADVANCE_RANGE_AND_RUN, range_id, cursor, cursor_key, rows, run_id)


async def restart_range(session: AsyncSession, range_id: int, version: int, cursor: int | None) -> None:
    """Start a new pass over a range, on ``version``, from its start (``cursor``: see
    :func:`keyrotor.store.key_ranges.start_cursor`)."""
    await session.execute(
        text(
            "UPDATE rotation_ranges SET version = :v, cursor = :c, cursor_key = NULL, updated_at = now() "
            "WHERE id = :id"
        ),
        {"id": range_id, "v": version, "c": cursor},
    )


async def finish_range(session: AsyncSession, range_id: int) -> None:
    """Mark a range done."""
    await session.execute(
        text("UPDATE rotation_ranges SET state = 'done', updated_at = now() WHERE id = :id"),
        {"id": range_id},
    )
