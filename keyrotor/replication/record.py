"""The record of a replica check's repairs survives the check's death (migration 0017).

A repair writes in the region's database; its ``replica_check`` audit event is written in the
primary's, later: no transaction holds both. So a check that repairs first commits an intent in
the primary (one row a region) while holding its repair lock (a transaction-scoped advisory
lock, held until the check ends), and every repair batch counts what it wrote in the region's
``replica_repair_log`` in the batch's own transaction. The check's event deletes its intents in
the event's transaction. An intent whose lock is free belongs to a check that died: the next
check (:func:`record_interrupted`) writes its event (``status: interrupted``, the copies the
region counted) and deletes the intent in one transaction, so the record is written once.
"""

from __future__ import annotations

import logging
import uuid
from collections.abc import AsyncIterator, Sequence
from contextlib import asynccontextmanager

from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from keyrotor.audit.log import AuditEvent, write_event
from keyrotor.replication.regions import Region, error_text
from keyrotor.store import db
from keyrotor.store import repair_record as store

log = logging.getLogger("keyrotor.replication.check")


@asynccontextmanager
async def repairing(
    sessions: async_sessionmaker[AsyncSession],
    regions: Sequence[Region],
    scope: str | None,
    actor: str,
) -> AsyncIterator[str]:
    """A repair id whose intents are committed, its lock held for the block."""
    repair_id = uuid.uuid4().hex
    async with db.transaction(sessions) as held:
        await store.hold_repair(held, repair_id)  # before the intents exist: never seen unheld
        async with db.transaction(sessions) as session:
            await store.open_intents(session, repair_id, [r.name for r in regions], scope, actor)
        yield repair_id


async def record_interrupted(
    sessions: async_sessionmaker[AsyncSession], regions: Sequence[Region], primary: str
) -> int:
    """Write the ``replica_check`` event of every repair whose check died before its own.
    An intent whose region cannot be read now is left for the next check. Returns the events."""
    by_name = {r.name: r for r in regions}
    written, done = 0, []
    async with db.transaction(sessions) as session:
        for intent in await store.orphaned_intents(session):
            region = by_name.get(intent.region)
            try:
                n = 0 if region is None else await _logged(region, intent.id)
            except Exception as exc:
                log.warning(
                    "region %s: an interrupted repair's record waits: %s", intent.region, error_text(exc)
                )
                continue
            if n:
                await write_event(session, _event(intent, n, primary))
                written += 1
            await store.close_intents(session, intent.id, intent.region)
            if region is not None:
                done.append((region, intent.id))
    for region, repair_id in done:
        await forget(region, repair_id)
    return written


def _event(intent: store.Intent, repaired: int, primary: str) -> AuditEvent:
    return AuditEvent(
        "replica_check",
        scope=intent.scope,
        success=False,
        actor=intent.actor,
        error_message="the check died after its repair and before its record; recorded by the next check",
        metadata={
            "region": intent.region,
            "primary": primary,
            "status": "interrupted",
            "found": "unknown",
            "repaired": repaired,
            "repair_id": intent.id,
        },
    )


async def _logged(region: Region, repair_id: str) -> int:
    async with db.transaction(region.sessions) as session:
        return await store.logged_repair(session, repair_id)


async def forget(region: Region, repair_id: str) -> None:
    """Drop a recorded repair's count from its region (best effort: a few bytes left behind)."""
    try:
        async with db.transaction(region.sessions) as session:
            await store.forget_repair(session, repair_id)
    except Exception as exc:
        log.debug("region %s: repair count %s kept: %s", region.name, repair_id, error_text(exc))
