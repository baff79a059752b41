"""Steps 6-8 of a DEK rotation: complete the run once its rows are on the new DEK, announce it.

Whoever re-encrypts last completes the run: the small scope's single transaction, the range
that finishes last (counted in the database with the run row locked), or the driver that finds
every range done. :func:`complete` sweeps stragglers (rows written by a process whose cache
still named the old DEK), counts the rotation on the scope and writes the ``rotate`` audit
event, in the caller's transaction, which commits durably.
"""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

import structlog
from sqlalchemy.ext.asyncio import AsyncSession

from keyrotor import metrics, runs
from keyrotor.audit.log import AuditEvent, write_event
from keyrotor.notify import KeyChange
from keyrotor.rotation.context import RotationContext
from keyrotor.rotation.reencrypt import RotationKeys, load_keys, sweep
from keyrotor.runs import RunInfo
from keyrotor.store import db
from keyrotor.store import rotation as store
from keyrotor.store.targets import Target, durable_commit, raw_connection

log = structlog.get_logger("keyrotor.rotation.completion")


async def complete(
    session: AsyncSession,
    apg: Any,
    rc: RotationContext,
    run_id: int,
    keys: RotationKeys,
    targets: list[Target],
) -> None:
    """Steps 6-7, inside the caller's transaction (which holds the run row's lock)."""
    structlog.contextvars.bind_contextvars(step="complete")
    await durable_commit(apg)  # a completed run must survive a crash
    swept = 0
    for target in targets:
        swept += await sweep(apg, target, keys, limit=rc.batch_rows)
    if swept:
        await runs.add_progress(session, run_id, swept)
        log.info("stragglers_reencrypted", rows=swept)
    run = await runs.require_run(session, run_id)
    # Every row the run re-encrypted is an encryption under the new DEK: its usage counter
    # (KEYROTOR_MAX_ENCRYPTIONS_PER_DEK, keyrotor.census.usage) must see them like application writes.
    await store.record_rotation(session, keys.scope_id, keys.new_version, run.rows_done)
    await write_event(
        session,
        AuditEvent(
            event_type="rotate",
            scope=keys.scope,
            key_version=keys.new_version,
            success=True,
            metadata={
                "run_id": run.id,
                "from_version": run.from_version,
                "to_version": run.to_version,
                "rows": run.rows_done,
                "trigger": run.trigger,
                "attempts": run.attempts,
                # Columns unregistered during the run: their values were left on older versions.
                **({"skipped_columns": skipped} if (skipped := run.detail.get("skipped_columns")) else {}),
                **runs.request_context(run.request_ids),
            },
        ),
    )
    # Every row of a covered target is on the new DEK now, and those the run rewrote are its
    # rows_done: the total counted at promotion also held rows it never rewrote (a column
    # unregistered during the run, in detail.skipped_columns; rows deleted meanwhile), which
    # would show a completed run as unfinished.
    await runs.complete_run(session, run_id, total_is_done=True)


async def complete_if_done(rc: RotationContext, run: RunInfo) -> bool:
    """Complete a running run whose ranges are all done. Returns True if this call completed it."""
    assert run.scope is not None and run.scope_id is not None and run.to_version is not None
    async with db.transaction(rc.sessions) as session:
        locked = await runs.require_run(session, run.id, for_update=True)
        if locked.state != "running":
            return False
        if await store.count_pending_ranges(session, run.id):
            return False
        keys = await load_keys(session, rc.cipher, run.scope, run.scope_id, run.to_version)
        apg = await raw_connection(session)
        await complete(session, apg, rc, run.id, keys, rc.targets_for(run.scope))
        return True


async def announce_completed(rc: RotationContext, run: RunInfo, **fields: Any) -> None:
    """Step 8: every process drops its caches of the scope; the completion is counted and logged.

    Called after the completing transaction committed, in the caller's task (the completion ran
    in :func:`keyrotor.rotation.context.run_to_commit`'s, whose context bindings do not come back).
    """
    assert run.scope is not None
    structlog.contextvars.bind_contextvars(step="complete")
    await rc.announce(KeyChange("rotated", run.scope, run.to_version))
    end = run.finished_at or datetime.now(UTC)
    metrics.rotation_completed(run.scope, (end - run.created_at).total_seconds())
    log.info("rotation_completed", to_version=run.to_version, **fields)
