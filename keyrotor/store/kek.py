"""The statements of KEK rotation and KEK provider migration: which DEKs to rewrap, the
compare-and-swap that writes a new wrapping, the KEK census, and the install salt.

Each function takes the session of a transaction the caller opened, except the install-salt
reads, which run on the short asyncpg connection a provider opens before any engine exists.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import asyncpg
from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncSession

# Serialises opening KEK rotations and migrations (they rewrap the same DEKs), per transaction.
KEK_RUNS_LOCK = 0x6B72_6B65_6B72_756E  # "krkekrun"


class DekToRewrap(NamedTuple):
    """A non-destroyed DEK as a rewrap batch reads it."""

    id: int
    scope: str
    version: int
    kek_id: str
    kek_version: int
    blob: bytes


_BELOW_VERSION = text(
    "SELECT d.id, s.name, d.version, d.kek_id, d.kek_version, d.encrypted_dek "
    "FROM data_keys d JOIN key_scopes s ON s.id = d.scope_id "
    "WHERE d.state <> 'destroyed' AND d.kek_version < :t "
    "AND d.id > :after ORDER BY d.id LIMIT :n"
)
_NOT_ON_KEK = text(
    "SELECT d.id, s.name, d.version, d.kek_id, d.kek_version, d.encrypted_dek "
    "FROM data_keys d JOIN key_scopes s ON s.id = d.scope_id "
    "WHERE d.state <> 'destroyed' AND d.kek_id <> :tid AND d.id > :after "
    "ORDER BY d.id LIMIT :n"
)
_SWAP = text(
    "UPDATE data_keys SET encrypted_dek = :new, kek_id = :kid, kek_version = :kv "
    "WHERE id = :id AND encrypted_dek = :old AND state <> 'destroyed'"
)
_SWAP_FROM_KEK = text(
    "UPDATE data_keys SET encrypted_dek = :new, kek_id = :kid, kek_version = :kv "
    "WHERE id = :id AND encrypted_dek = :old AND kek_id = :old_kid AND state <> 'destroyed'"
)


async def deks_below_kek_version(
    session: AsyncSession, target: int, *, after: int, limit: int
) -> list[DekToRewrap]:
    """Up to ``limit`` DEKs wrapped under a KEK version below ``target``, by id after ``after``."""
    rows = (await session.execute(_BELOW_VERSION, {"t": target, "after": after, "n": limit})).all()
    return [DekToRewrap(*row) for row in rows]


async def deks_not_on_kek(session: AsyncSession, kek_id: str, *, after: int, limit: int) -> list[DekToRewrap]:
    """Up to ``limit`` DEKs wrapped by another KEK than ``kek_id``, by id after ``after``."""
    rows = (await session.execute(_NOT_ON_KEK, {"tid": kek_id, "after": after, "n": limit})).all()
    return [DekToRewrap(*row) for row in rows]


async def swap_wrapped_dek(
    session: AsyncSession,
    dek_id: int,
    *,
    old_blob: bytes,
    new_blob: bytes,
    kek_id: str,
    kek_version: int,
    old_kek_id: str | None = None,
) -> bool:
    """Replace a DEK's wrapping if it still is ``old_blob`` (and on ``old_kek_id``, if given).

    Returns False when the DEK changed meanwhile (rotated, rewrapped or destroyed).
    """
    params: dict[str, Any] = {
        "id": dek_id,
        "new": new_blob,
        "kid": kek_id,
        "kv": kek_version,
        "old": old_blob,
    }
    if old_kek_id is None:
        result: Any = await session.execute(_SWAP, params)
    else:
        result = await session.execute(_SWAP_FROM_KEK, {**params, "old_kid": old_kek_id})
    return bool(result.rowcount)


async def count_deks_below_kek_version(session: AsyncSession, target: int) -> int:
    """Non-destroyed DEKs wrapped under a KEK version below ``target``."""
    result = await session.execute(
        text("SELECT count(*) FROM data_keys WHERE state <> 'destroyed' AND kek_version < :t"),
        {"t": target},
    )
    return int(result.scalar_one())


async def count_deks_not_on_kek(session: AsyncSession, kek_id: str) -> int:
    """Non-destroyed DEKs wrapped by another KEK than ``kek_id``."""
    result = await session.execute(
        text("SELECT count(*) FROM data_keys WHERE state <> 'destroyed' AND kek_id <> :tid"),
        {"tid": kek_id},
    )
    return int(result.scalar_one())


async def set_kek_run_target(session: AsyncSession, run_id: int, target: int, total: int) -> None:
    """Record a KEK rotation run's target KEK version and the DEKs it has to rewrap."""
    await session.execute(
        text(
            "UPDATE rotations SET to_version = :t, rows_total = :n, updated_at = now() "
            "WHERE id = :id AND state IN ('pending', 'running')"
        ),
        {"t": target, "n": total, "id": run_id},
    )


async def set_run_total(session: AsyncSession, run_id: int, total: int) -> None:
    """Record the DEKs a migration run has to rewrap."""
    await session.execute(
        text("UPDATE rotations SET rows_total = :n WHERE id = :id AND state IN ('pending', 'running')"),
        {"n": total, "id": run_id},
    )


async def lock_kek_runs(session: AsyncSession) -> None:
    """Take the transaction-scoped advisory lock that serialises opening KEK runs."""
    await session.execute(text("SELECT pg_advisory_xact_lock(:k)"), {"k": KEK_RUNS_LOCK})


async def lock_deks_against_writes(session: AsyncSession) -> None:
    """Lock ``data_keys`` and ``audit_keys`` in SHARE mode (waiting at most 10 s) until the
    transaction ends.

    SHARE waits for transactions writing keys to commit and keeps new ones out meanwhile; a
    transaction that wraps a new key takes :func:`hold_off_kek_cutoff` before wrapping it.
    """
    await session.execute(text("SET LOCAL lock_timeout = '10s'"))
    await session.execute(text("LOCK TABLE data_keys, audit_keys IN SHARE MODE"))


async def hold_off_kek_cutoff(session: AsyncSession, table: str = "data_keys") -> None:
    """Before wrapping a new key to store in ``table`` (``data_keys`` or ``audit_keys``): lock it
    in ROW EXCLUSIVE mode (what the insert takes anyway) until the transaction ends.

    A KEK rotation raises the provider's minimum decryption version to the lowest version a
    stored key is wrapped under (:func:`lock_deks_against_writes`, SHARE, then the provider's
    cut-off). A key wrapped before that cut-off and stored after it would be wrapped under a
    version the provider no longer opens. With the lock taken first, a cut-off in progress ends
    before the wrap (which then uses the new version), and one that starts later waits for this
    transaction and counts the key.
    """
    if table not in ("data_keys", "audit_keys"):
        raise ValueError(f"not a table of wrapped keys: {table!r}")
    await session.execute(text(f"LOCK TABLE {table} IN ROW EXCLUSIVE MODE"))


async def lowest_kek_version_in_use(session: AsyncSession, kek_id: str) -> int | None:
    """The lowest KEK version of ``kek_id`` any non-destroyed DEK or audit key is wrapped under."""
    lowest = (
        await session.execute(
            text(
                "SELECT least((SELECT min(kek_version) FROM data_keys "
                "WHERE state <> 'destroyed' AND kek_id = :kid), "
                "(SELECT min(kek_version) FROM audit_keys WHERE kek_id = :kid))"
            ),
            {"kid": kek_id},
        )
    ).scalar_one()
    return None if lowest is None else int(lowest)


async def deks_per_kek(session: AsyncSession) -> list[tuple[str, int, int]]:
    """``(kek_id, kek_version, count)`` of the non-destroyed DEKs, ordered."""
    rows = (
        await session.execute(
            text(
                "SELECT kek_id, kek_version, count(*) FROM data_keys WHERE state <> 'destroyed' "
                "GROUP BY kek_id, kek_version ORDER BY kek_id, kek_version"
            )
        )
    ).all()
    return [(str(kid), int(kv), int(n)) for kid, kv, n in rows]


async def install_salt_table_exists(conn: asyncpg.Connection) -> bool:
    """Whether the database has the ``install_salt`` table (migration 0010)."""
    return bool(await conn.fetchval("SELECT to_regclass('install_salt') IS NOT NULL"))


async def fetch_install_salt(conn: asyncpg.Connection) -> object:
    """The stored install salt as the database returns it (validated by the caller)."""
    return await conn.fetchval("SELECT salt FROM install_salt WHERE id = 1")
