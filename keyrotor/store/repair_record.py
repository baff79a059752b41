"""Statements of the replica repair record (migration 0017): the primary's intents, one a check
and region about to be repaired, and a region's count of the copies each repair wrote.

Every function takes the session of a transaction the caller opened.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import NamedTuple

from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncSession

# The advisory lock namespace of running repairs: a check holds (namespace, hashtext(id)) while it
# runs, so another check never takes its intents for those of a check that died.
REPAIR_LOCK = 0x6B72_7265  # "krre"


class Intent(NamedTuple):
    """A repair of ``region`` begun by a check, not yet recorded."""

    id: str
    region: str
    scope: str | None
    actor: str


async def hold_repair(session: AsyncSession, repair_id: str) -> None:
    """Mark repair ``repair_id`` as running until the transaction ends."""
    await session.execute(
        text("SELECT pg_advisory_xact_lock(:ns, hashtext(:id))"), {"ns": REPAIR_LOCK, "id": repair_id}
    )


async def open_intents(
    session: AsyncSession, repair_id: str, regions: Sequence[str], scope: str | None, actor: str
) -> None:
    """Record that repair ``repair_id`` may write to ``regions``."""
    await session.execute(
        text(
            "INSERT INTO replica_repair_intents (id, region, scope, actor) "
            "SELECT :id, r, :s, :a FROM unnest(CAST(:r AS text[])) AS r"
        ),
        {"id": repair_id, "r": list(regions), "s": scope, "a": actor},
    )


async def close_intents(session: AsyncSession, repair_id: str, region: str | None = None) -> None:
    """Delete repair ``repair_id``'s intents (one region's, or all): its event is in this transaction."""
    await session.execute(
        text(
            "DELETE FROM replica_repair_intents WHERE id = :id AND (CAST(:r AS text) IS NULL OR region = :r)"
        ),
        {"id": repair_id, "r": region},
    )


async def orphaned_intents(session: AsyncSession) -> list[Intent]:
    """The intents of checks no longer running (their repair lock is free), locked until the
    transaction ends; intents another transaction holds are skipped."""
    rows = await session.execute(
        text(
            "SELECT id, region, scope, actor FROM replica_repair_intents "
            "WHERE pg_try_advisory_xact_lock(:ns, hashtext(id)) "
            "ORDER BY started_at FOR UPDATE SKIP LOCKED"
        ),
        {"ns": REPAIR_LOCK},
    )
    return [Intent(*r) for r in rows.all()]


async def log_repair(session: AsyncSession, repair_id: str, written: int) -> None:
    """In a region, in a repair batch's transaction: count the copies it wrote or removed."""
    await session.execute(
        text(
            "INSERT INTO replica_repair_log (repair_id, written) VALUES (:id, :n) "
            "ON CONFLICT (repair_id) DO UPDATE SET written = replica_repair_log.written + EXCLUDED.written"
        ),
        {"id": repair_id, "n": written},
    )


async def logged_repair(session: AsyncSession, repair_id: str) -> int:
    """In a region: the copies repair ``repair_id`` wrote or removed (0 if none)."""
    n = (
        await session.execute(
            text("SELECT written FROM replica_repair_log WHERE repair_id = :id"), {"id": repair_id}
        )
    ).scalar_one_or_none()
    return int(n or 0)


async def forget_repair(session: AsyncSession, repair_id: str) -> None:
    """In a region: drop a recorded repair's count."""
    await session.execute(text("DELETE FROM replica_repair_log WHERE repair_id = :id"), {"id": repair_id})
