"""The statements of retiring, destroying and restoring an old DEK version.

Each function runs in the caller's transaction (``keyrotor.store.db.transaction``).
"""

from __future__ import annotations

from datetime import datetime
from typing import Any

from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncSession

from keyrotor.store.dates import days_from_now

# How long the proof's transaction waits for a lock before it gives up (a transient error).
LOCK_TIMEOUT = "5s"


async def limit_lock_wait(session: AsyncSession) -> None:
    """Make the transaction's lock waits fail after :data:`LOCK_TIMEOUT`."""
    await session.execute(text(f"SET LOCAL lock_timeout = '{LOCK_TIMEOUT}'"))


async def retirement_facts(session: AsyncSession, scope: str, version: int) -> Any:
    """``(state, grace_until, scope's active version)`` of one DEK version (``state`` None if the
    version does not exist), or None if the scope does not exist."""
    return (
        await session.execute(
            text(
                "SELECT d.state, d.grace_until, s.active_version FROM key_scopes s "
                "LEFT JOIN data_keys d ON d.scope_id = s.id AND d.version = :v WHERE s.name = :n"
            ),
            {"n": scope, "v": version},
        )
    ).first()


async def lock_dek_to_retire(session: AsyncSession, scope: str, version: int) -> Any:
    """Lock one DEK row: ``(key id, state, scope id)``."""
    return (
        await session.execute(
            text(
                "SELECT d.id, d.state, s.id FROM data_keys d JOIN key_scopes s ON s.id = d.scope_id "
                "WHERE s.name = :n AND d.version = :v FOR UPDATE OF d"
            ),
            {"n": scope, "v": version},
        )
    ).one()


async def is_imported(session: AsyncSession, scope_id: int, version: int) -> bool:
    """Whether one DEK version was adopted from the old backend (``data_keys.imported``)."""
    imported: bool = (
        await session.execute(
            text("SELECT imported FROM data_keys WHERE scope_id = :s AND version = :v"),
            {"s": scope_id, "v": version},
        )
    ).scalar_one()
    return imported


async def lock_key_locations(session: AsyncSession) -> None:
    """Lock ``key_locations`` in SHARE mode until the transaction ends (recorders wait)."""
    await session.execute(text("LOCK TABLE key_locations IN SHARE MODE"))


async def retire_dek(session: AsyncSession, key_id: int, destroy_after_days: int) -> datetime:
    """Mark a DEK ``retired`` with a new destruction window. Returns ``destroy_after``.

    A version retired already whose destruction is still pending keeps its ``retired_at``: the
    uses recorded since then have not been seen by a destruction yet, and must still cancel it.
    Only after a cancellation (``destroy_after`` NULL) does retiring again count from now.
    """
    destroy_after: datetime = (
        await session.execute(
            text(
                "UPDATE data_keys SET state = 'retired', retired_at = CASE "
                "WHEN state = 'retired' AND destroy_after IS NOT NULL THEN retired_at ELSE now() END, "
                f"destroy_after = {days_from_now(':days')} WHERE id = :id "
                "RETURNING destroy_after"
            ),
            {"id": key_id, "days": destroy_after_days},
        )
    ).scalar_one()
    return destroy_after


# --- destruction ----------------------------------------------------------------------------


async def lock_dek_to_destroy(session: AsyncSession, scope: str, version: int) -> Any:
    """Lock one DEK row: ``(key id, state, retired_at, destroy_after, whether it is due, scope id)``."""
    return (
        await session.execute(
            text(
                "SELECT d.id, d.state, d.retired_at, d.destroy_after, d.destroy_after <= now(), s.id "
                "FROM data_keys d JOIN key_scopes s ON s.id = d.scope_id "
                "WHERE s.name = :n AND d.version = :v FOR UPDATE OF d"
            ),
            {"n": scope, "v": version},
        )
    ).one()


async def lock_retired_key_uses(session: AsyncSession) -> None:
    """Lock ``retired_key_uses`` in SHARE mode until the transaction ends (recorders wait)."""
    await session.execute(text("LOCK TABLE retired_key_uses IN SHARE MODE"))


async def uses_since(session: AsyncSession, scope_id: int, version: int, since: datetime) -> dict[str, int]:
    """Recorded uses of a retired version since ``since``, counted by location."""
    rows = await session.execute(
        text(
            "SELECT location, count(*) FROM retired_key_uses "
            "WHERE scope_id = :s AND dek_version = :v AND used_at >= :since GROUP BY location"
        ),
        {"s": scope_id, "v": version, "since": since},
    )
    return {loc: int(n) for loc, n in rows.all()}


async def cancel_destruction(session: AsyncSession, key_id: int) -> None:
    """Take a retired DEK off the destruction schedule (it stays retired)."""
    await session.execute(text("UPDATE data_keys SET destroy_after = NULL WHERE id = :id"), {"id": key_id})


async def erase_dek(session: AsyncSession, key_id: int) -> None:
    """Erase a DEK's wrapped key: ``destroyed`` for good."""
    await session.execute(
        text(
            "UPDATE data_keys SET state = 'destroyed', encrypted_dek = NULL, destroyed_at = now() "
            "WHERE id = :id"
        ),
        {"id": key_id},
    )


# --- restore --------------------------------------------------------------------------------


async def lock_scope_and_dek(session: AsyncSession, scope: str, version: int) -> Any:
    """Lock the scope row: ``(grace_period_days, key id, retired_at, destroy_after)`` of one DEK
    version (key id None if it does not exist), or None if the scope does not exist."""
    return (
        await session.execute(
            text(
                "SELECT s.grace_period_days, d.id, d.retired_at, d.destroy_after "
                "FROM key_scopes s LEFT JOIN data_keys d ON d.scope_id = s.id AND d.version = :v "
                "WHERE s.name = :n FOR UPDATE OF s"
            ),
            {"n": scope, "v": version},
        )
    ).first()


async def lock_dek_state(session: AsyncSession, key_id: int) -> str:
    """Lock one DEK row and return its state."""
    state: str = (
        await session.execute(text("SELECT state FROM data_keys WHERE id = :id FOR UPDATE"), {"id": key_id})
    ).scalar_one()
    return state


async def restore_to_grace(session: AsyncSession, key_id: int, grace_days: int) -> datetime:
    """Bring a retired DEK back to ``grace`` for ``grace_days``, off the destruction schedule.
    Returns ``grace_until``."""
    grace_until: datetime = (
        await session.execute(
            text(
                f"UPDATE data_keys SET state = 'grace', grace_until = {days_from_now(':g')}, "
                "retired_at = NULL, destroy_after = NULL WHERE id = :id RETURNING grace_until"
            ),
            {"id": key_id, "g": grace_days},
        )
    ).scalar_one()
    return grace_until


async def destroy_after(session: AsyncSession, scope: str, version: int) -> datetime | None:
    """When retired DEK ``version`` of ``scope`` may be erased; None if it is not retired or its
    destruction was cancelled."""
    value: datetime | None = (
        await session.execute(
            text(
                "SELECT d.destroy_after FROM data_keys d JOIN key_scopes s ON s.id = d.scope_id "
                "WHERE s.name = :n AND d.version = :v AND d.state = 'retired'"
            ),
            {"n": scope, "v": version},
        )
    ).scalar_one_or_none()
    return value
