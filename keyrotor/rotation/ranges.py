"""Steps 4-5 of a fanned-out DEK rotation: re-encrypt one key range, a batch a transaction.

A large scope's rows are split into key ranges (``rotation_ranges`` rows, planned when the new
DEK is promoted) that workers re-encrypt in parallel. Each transaction of a range locks its row,
re-encrypts one batch after the range's cursor on its current old version and advances the
cursor and the run's counters. At the end of a pass the range moves on to the next old version,
or goes round again if rows were skipped as locked, or is done; the range finishing last
completes the run (:mod:`keyrotor.rotation.completion`).

A range of a registered column that was unregistered after the run planned it is finished
without re-encrypting anything (the run's ``detail.skipped_columns`` names it), so the run still
ends and a later rotation opens a run of its own; its rows leave the run's ``rows_total`` when
the run completes (:func:`keyrotor.rotation.completion.complete`). Its values stay on the old version, which
stays in grace: retirement refuses while values of an uncovered location hold it.
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass
from typing import Any

import structlog
from sqlalchemy.ext.asyncio import AsyncSession

from keyrotor import runs
from keyrotor.census.columns import freeze_targets, refresh_targets
from keyrotor.errors import ConfigurationError, InvalidInput, TransientError
from keyrotor.rotation.completion import announce_completed, complete
from keyrotor.rotation.context import RotationContext, run_to_commit
from keyrotor.rotation.lifecycle import failing_run
from keyrotor.rotation.reencrypt import RotationKeys, load_keys, reencrypt_batch
from keyrotor.runs import RunInfo
from keyrotor.store import db
from keyrotor.store import rotation as store
from keyrotor.store.key_ranges import Key, range_bounds, start_cursor
from keyrotor.store.targets import Target, raw_connection, relax_commit, versions_in_range

log = structlog.get_logger("keyrotor.rotation.ranges")

# The run's ``detail`` key listing the registered columns (``managed_columns``) it planned ranges
# of: a range of one of them that is no longer registered is skipped, not left to another worker.
REGISTERED_COLUMNS = "registered_columns"

# The run's ``detail`` key listing the registered columns whose ranges were skipped because
# the column was unregistered during the run.
SKIPPED_COLUMNS = "skipped_columns"

# How long a range waits for rows locked by others (application transactions) before it
# gives up for now (a transient error: the job retries later).
LOCKED_ROWS_PATIENCE_S = 30.0


class RowsLocked(TransientError):
    """Rows to re-encrypt stay locked by other transactions; try again later."""


@dataclass(frozen=True)
class RangeProgress:
    """What one :func:`reencrypt_range` call did."""

    run_id: int
    target: str
    lo: int
    hi: int
    rows: int
    batches: int
    state: str  # the range's: "done", or the run's when it is not running
    completed_run: bool = False

    def summary(self) -> dict[str, Any]:
        return {
            "run_id": self.run_id,
            "target": self.target,
            "lo": self.lo,
            "hi": self.hi,
            "rows": self.rows,
            "batches": self.batches,
            "state": self.state,
            "completed_run": self.completed_run,
        }


async def reencrypt_range(
    rc: RotationContext, run_id: int, lo: int, hi: int, *, target: str = "secrets"
) -> RangeProgress:
    """Re-encrypt one id range of a fanned-out run, a batch a transaction. Idempotent.

    Resumes from the range's cursor; stops early when the run is no longer running (another
    range failed). Whoever finishes the last range completes the run (steps 6-8). A range of a
    registered column unregistered since the run planned it is finished with nothing done.

    Raises:
        ConfigurationError: ``target`` is no registered column and this process defines no such
            target in code; the run is left for a worker that does.
        RowFailed: a value did not decrypt; the run is marked failed naming it.
        RowsLocked, TransientError: retry later; the range resumes where it stopped.
    """
    await refresh_targets(rc)
    async with db.transaction(rc.sessions) as session:
        run = await runs.require_run(session, run_id)
        if run.state != "running":
            return RangeProgress(run_id, target, lo, hi, 0, 0, run.state)
        assert run.scope is not None and run.scope_id is not None and run.to_version is not None
        keys = await load_keys(session, rc.cipher, run.scope, run.scope_id, run.to_version)
    structlog.contextvars.bind_contextvars(run_id=run_id, scope=run.scope, step="reencrypt")
    tgt = next((t for t in rc.all_targets if t.name == target), None)
    if tgt is None and target not in run.detail.get(REGISTERED_COLUMNS, ()):
        # A worker without the application's registered targets: leave the run to one that has them.
        raise ConfigurationError(f"no re-encryption target named {target!r} is registered in this process")
    async with failing_run(rc, run):
        rows = batches = 0
        step = None if tgt is not None else await run_to_commit(_skip_unregistered(rc, run, keys, target, lo))
        if step is None:  # registered all along, or again since the refresh above
            tgt = next(t for t in rc.all_targets if t.name == target)
            rows, batches, step = await _batches(rc, run, keys, tgt, lo, hi)
    if step.stopped is not None:
        return RangeProgress(run_id, target, lo, hi, rows, batches, step.stopped)
    if step.completed_run:
        await announce_completed(rc, run, mode="ranges")
    return RangeProgress(run_id, target, lo, hi, rows, batches, "done", step.completed_run)


@dataclass(frozen=True, slots=True)
class _Step:
    """What one transaction of a range did."""

    written: int = 0
    finished: bool = False
    blocked: bool = False
    stopped: str | None = None
    completed_run: bool = False


async def _batches(
    rc: RotationContext, run: RunInfo, keys: RotationKeys, target: Target, lo: int, hi: int
) -> tuple[int, int, _Step]:
    """Run the range's transactions until it is done or the run stops: ``(rows, batches, last step)``.

    Raises:
        RowsLocked: rows stayed locked by others for :data:`LOCKED_ROWS_PATIENCE_S`.
    """
    rows = batches = 0
    waited = 0.0
    while True:
        await rc.spend_rows(rc.batch_rows)
        step = await run_to_commit(_range_step(rc, run, keys, target, lo, hi))
        if step.stopped is not None:
            return rows, batches, step
        rows += step.written
        if step.written:
            batches += 1
            waited = 0.0
            log.info(
                "batch_reencrypted", target=target.name, lo=lo, rows=step.written, to_version=run.to_version
            )
            await rc.test_pause()
        if step.finished:
            return rows, batches, step
        if step.blocked:
            if waited >= LOCKED_ROWS_PATIENCE_S:
                raise RowsLocked(
                    f"{target.name} rows of run {run.id} in ids {lo}..{hi} stay locked by others"
                )
            await asyncio.sleep(0.1)
            waited += 0.1


@dataclass(frozen=True, slots=True)
class _Range:
    """A locked range row: its current pass over ``version``, bounds and cursor."""

    id: int
    target: Target
    lo: int
    version: int
    start: Key | None  # the exclusive lower bound a pass begins after
    cursor: Key | None  # the last key done of this pass
    upper: Key | None  # the inclusive upper bound


async def _range_step(
    rc: RotationContext, run: RunInfo, keys: RotationKeys, target: Target, lo: int, hi: int
) -> _Step:
    """One transaction of a range: one batch, or moving to the next version, or finishing."""
    async with db.transaction(rc.sessions) as session:
        row, ended = await _lock_range(session, run, target.name, lo)
        if ended is not None:
            return ended
        range_id, _state, version = row[:3]
        rng = _Range(range_id, target, lo, version, *range_bounds(target.key_type, lo, hi, row[4:]))
        apg = await raw_connection(session)
        await relax_commit(apg)
        if version in keys.old_versions:
            step = await _next_batch(apg, rc, run, keys, rng)
            if step is not None:
                return step
        return await _end_of_pass(session, apg, rc, run, keys, rng)


async def _next_batch(
    apg: Any, rc: RotationContext, run: RunInfo, keys: RotationKeys, rng: _Range
) -> _Step | None:
    """Re-encrypt the batch after the range's cursor; None if the pass has no rows left."""
    batch = await reencrypt_batch(
        apg,
        rng.target,
        keys,
        rng.version,
        after=rng.cursor,
        hi=rng.upper,
        limit=rc.batch_rows,
        skip_locked=True,
    )
    if batch.last_id is None:
        return None
    integer = rng.target.key_type.integer
    # Last before the commit: the run row is the one every range updates.
    await store.advance_range_and_run(
        apg,
        rng.id,
        run.id,
        cursor=int(batch.last_id) if integer else None,
        cursor_key=None if integer else str(batch.last_id),
        rows=batch.written,
    )
    return _Step(written=batch.written)


async def _end_of_pass(
    session: AsyncSession, apg: Any, rc: RotationContext, run: RunInfo, keys: RotationKeys, rng: _Range
) -> _Step:
    """Start a pass over the next old version, or go round again, or finish the range.

    Versions no row of the range holds get no pass: one read of the range finds the next one
    that has rows (a scope rotated many times has many old versions, most of them empty).
    """
    later, least = await versions_in_range(
        apg, rng.target, keys.scope_id, keys.old_versions, rng.version, rng.start, rng.upper
    )
    if later is not None:
        await store.restart_range(session, rng.id, later, start_cursor(rng.lo))
        return _Step()
    if least is not None:
        # Rows skipped as locked (or written behind the cursor): go round again from the start.
        await store.restart_range(session, rng.id, least, start_cursor(rng.lo))
        return _Step(blocked=True)
    return await _finish(session, apg, rc, run, keys, rng.id)


async def _finish(
    session: AsyncSession, apg: Any, rc: RotationContext, run: RunInfo, keys: RotationKeys, range_id: int
) -> _Step:
    """Mark the range done; the last range of the run to finish completes it."""
    await store.finish_range(session, range_id)
    # Count the ranges left in the database, with the run row locked, so that exactly one
    # of the ranges finishing at the same moment completes the run.
    await runs.require_run(session, run.id, for_update=True)
    if await store.count_pending_ranges(session, run.id):
        return _Step(finished=True)
    assert run.scope is not None
    await complete(session, apg, rc, run.id, keys, rc.targets_for(run.scope))
    return _Step(finished=True, completed_run=True)


async def _lock_range(session: AsyncSession, run: RunInfo, target: str, lo: int) -> tuple[Any, _Step | None]:
    """The range's row, locked, and the step that ends this job here: the run no longer runs,
    or the range is done (None: the range has work left).

    Raises:
        InvalidInput: the run has no such range.
    """
    row = await store.lock_range(session, run.id, target, lo)
    if row is None:
        raise InvalidInput(f"run {run.id} has no {target} range starting at {lo}")
    range_state, run_state = row[1], row[3]
    if run_state != "running":
        return row, _Step(stopped=run_state)
    if range_state == "done":
        return row, _Step(finished=True)
    return row, None


async def _skip_unregistered(
    rc: RotationContext, run: RunInfo, keys: RotationKeys, target: str, lo: int
) -> _Step | None:
    """Finish a range of a column unregistered since the run planned it, re-encrypting nothing.

    Returns None if the column is registered again (the range is then worked as any other).
    Its values are left on their version: skipping them loses nothing, since retirement counts
    only covered locations and refuses while an uncovered one (this column's) holds the version;
    leaving the range pending instead would keep the run open, joined by every later rotate.
    """
    async with db.transaction(rc.sessions) as session:
        # The registry stays locked until the commit: the column cannot come back meanwhile.
        await freeze_targets(rc, session)
        if any(t.name == target for t in rc.all_targets):
            return None
        row, ended = await _lock_range(session, run, target, lo)
        if ended is not None:
            return ended
        range_id = row[0]
        locked = await runs.require_run(session, run.id, for_update=True)
        skipped = list(locked.detail.get(SKIPPED_COLUMNS, []))
        if target not in skipped:
            await runs.update_detail(session, run.id, **{SKIPPED_COLUMNS: [*skipped, target]})
        log.warning("range_skipped", target=target, lo=lo, reason="column no longer registered")
        return await _finish(session, await raw_connection(session), rc, run, keys, range_id)
