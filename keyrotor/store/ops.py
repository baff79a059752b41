"""Statements of keyrotor's own processes and commands: the database probe of the health checks
(the worker's ``/readyz``, ``keyrotor health``) and the demo's audit excerpt."""

from __future__ import annotations

from collections.abc import Sequence

from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncSession

from keyrotor.store.models import AuditLogRow

_AUDIT = AuditLogRow.__tablename__
# The demo's bulk events: the `encrypt` events of its per-tenant keys (`secret:tenant-...`),
# thousands of which would hide the rotations in an excerpt.
_DEMO_BULK = "event_type = 'encrypt' AND (metadata->>'context') LIKE 'secret:tenant-%'"


async def ping(conn: AsyncConnection) -> None:
    """One round trip: raises if the database does not answer."""
    await conn.execute(text("SELECT 1"))


async def newest_audit_ids_but_demo_bulk(session: AsyncSession, n: int) -> Sequence[int]:
    """Ids of the newest ``n`` audit events, leaving out the demo's per-tenant ``encrypt`` events."""
    result = await session.execute(
        text(f"SELECT id FROM {_AUDIT} WHERE NOT ({_DEMO_BULK}) ORDER BY id DESC LIMIT :n"), {"n": n}
    )
    return result.scalars().all()


async def count_demo_bulk_after(session: AsyncSession, after_id: int) -> int:
    """How many of the demo's per-tenant ``encrypt`` events come after ``after_id``."""
    result = await session.execute(
        text(f"SELECT count(*) FROM {_AUDIT} WHERE id > :lo AND {_DEMO_BULK}"), {"lo": after_id}
    )
    return int(result.scalar_one())
