"""A legacy migration split across workers by id range.

scrypt makes a legacy value cost tens of milliseconds of CPU, so one worker's process pool
migrates a few dozen values a second. A large migration is therefore fanned out the way a large
rotation is (:mod:`keyrotor.rotation.dek`): the driver job plans ``rotation_ranges`` rows (one set
per source, ``KEYROTOR_LEGACY_RANGE_ROWS`` legacy values each) and enqueues one
``migrate_legacy_range`` job a range; any number of workers take them.

Each range job works like the single-worker migration (:mod:`keyrotor.legacy.migration`): a batch
is decrypted in the worker's process pool, sealed, verified and written with compare-and-swap,
and the same transaction advances the range's cursor, the run's counters and the range's part
of the report (``detail.range_reports``), so a killed range resumes after its last batch. The
range that finishes last (counted with the run row locked) merges the reports and completes the
run. A run that began on one worker keeps going that way (it has cursors); fan-out is decided
once, when the run starts.
"""

from __future__ import annotations

import concurrent.futures
import json
import os
from dataclasses import dataclass, field
from typing import Any

import structlog
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from sqlalchemy.ext.asyncio import AsyncSession

from keyrotor import runs
from keyrotor.crypto import legacy_format as legacy
from keyrotor.errors import ConfigurationError, InvalidInput, KeyrotorError, PermanentError
from keyrotor.keys import KeyManager
from keyrotor.legacy import events
from keyrotor.legacy.batch import KeyEvidence, make_executor, open_batch
from keyrotor.legacy.report import (
    MAX_LISTED,
    MODE,
    ColumnReport,
    known_failures,
    merged_columns,
    report_after,
)
from keyrotor.legacy.sources import sources
from keyrotor.rotation.context import run_to_commit
from keyrotor.runs import RunInfo
from keyrotor.store import db
from keyrotor.store import legacy as store
from keyrotor.store import rotation as ranges_store
from keyrotor.store.key_ranges import Key, PlannedRange, insert_range, range_bounds, ranges_from_buckets
from keyrotor.store.legacy import SealedBatch, Source
from keyrotor.store.targets import raw_connection

log = structlog.get_logger("keyrotor.legacy.ranges")


@dataclass(frozen=True)
class LegacyRange:
    """One id range of one source of a fanned-out legacy run, for the caller to enqueue."""

    run_id: int
    target: str
    lo: int
    hi: int

    @property
    def key(self) -> str:
        """The range's key in the run's ``detail.range_reports``."""
        return f"{self.target}:{self.lo}"


@dataclass
class FanOut:
    """A fanned-out run and its ranges still to do (empty once the run is complete)."""

    run: RunInfo
    ranges: list[LegacyRange] = field(default_factory=list)


@dataclass(frozen=True)
class RangeOutcome:
    """What one range job did."""

    run_id: int
    target: str
    lo: int
    hi: int
    migrated: int
    failed: int
    state: str  # done | stopped (the run is no longer running)
    completed_run: bool

    def summary(self) -> dict[str, Any]:
        """Ids and counts only."""
        return {
            "run_id": self.run_id,
            "target": self.target,
            "lo": self.lo,
            "hi": self.hi,
            "migrated": self.migrated,
            "failed": self.failed,
            "state": self.state,
            "completed_run": self.completed_run,
        }


async def fan_out(
    km: KeyManager, run_id: int, *, range_rows: int, job_id: str | None = None
) -> FanOut | None:
    """Split run ``run_id`` into ranges if it is large enough, or list its ranges still to do.

    Returns None when the run is to be driven by one worker (:func:`legacy_migration.migrate_legacy`):
    fan-out is off (``range_rows`` 0), the run already started that way, it has ended, or it has
    fewer than two ranges' worth of legacy values.
    """
    srcs = await sources(km)
    async with db.transaction(km.sessions) as session:
        run = await runs.require_run(session, run_id, for_update=True)
        if run.kind != "legacy":
            raise runs.RunFailed(f"run {run_id} is not a legacy migration")
        if run.terminal:
            return None
        if run.detail.get("mode") == MODE:  # fanned out before (whatever this worker's setting)
            run = await runs.start_attempt(session, run.id, job_id)
            pending = await _pending(session, run.id)
            if not pending:  # every range done, the last one's completion lost: finish here
                await _complete_if_done(session, run.id)
                run = await runs.require_run(session, run.id)
            return FanOut(run, pending)
        if range_rows <= 0 or "cursors" in run.detail:
            return None  # fan-out off, or begun on one worker: it goes on that way
        apg = await raw_connection(session)
        counts = {src.name: await store.count_values(apg, src) for src in srcs}
        total = sum(c[0] for c in counts.values())
        if total < 2 * range_rows:
            return None
        planned: list[LegacyRange] = []
        for src in srcs:
            for p in await _plan(apg, src, counts[src.name][0], range_rows):
                await insert_range(session, run.id, src.name, p, version=0)
                planned.append(LegacyRange(run.id, src.name, p.lo, p.hi))
        base = [
            ColumnReport(src.name, legacy_found=counts[src.name][0], already_migrated=counts[src.name][1])
            for src in srcs
        ]
        await runs.start_attempt(session, run.id, job_id)
        await runs.update_detail(
            session,
            run.id,
            mode=MODE,
            ranges=len(planned),
            range_rows=range_rows,
            columns=[c.as_dict() for c in base],
            range_reports={},
        )
        await runs.add_progress(session, run.id, 0, total=total)
        run = await runs.require_run(session, run.id)
    log.info("legacy_migration_fanned_out", run_id=run.id, legacy_values=total, ranges=len(planned))
    return FanOut(run, planned)


async def _plan(apg: Any, src: Source, n: int, range_rows: int) -> list[PlannedRange]:
    """Contiguous key ranges of about ``range_rows`` legacy values covering every key of ``src``.

    They cover keys below, between and above the planned ones, so a legacy row the application
    writes meanwhile has a range (:func:`keyrotor.store.key_ranges.ranges_from_buckets`).
    """
    if n == 0:
        return []
    k = max(1, -(-n // range_rows))
    return ranges_from_buckets(src.key_type, await store.plan_buckets(apg, src, k))


async def _pending(session: AsyncSession, run_id: int) -> list[LegacyRange]:
    return [
        LegacyRange(run_id, t, lo, hi) for t, lo, hi in await ranges_store.pending_ranges(session, run_id)
    ]


async def complete_if_done(km: KeyManager, run_id: int) -> bool:
    """Complete a fanned-out run whose ranges are all done. Returns True if this call did."""
    async with db.transaction(km.sessions) as session:
        return await _complete_if_done(session, run_id)


async def _complete_if_done(session: AsyncSession, run_id: int) -> bool:
    run = await runs.require_run(session, run_id, for_update=True)
    if run.state != "running" or run.detail.get("mode") != MODE:
        return False
    if await ranges_store.count_pending_ranges(session, run_id):
        return False
    columns = merged_columns(run.detail)
    await runs.update_detail(session, run_id, columns=[c.as_dict() for c in columns])
    await events.complete(session, run_id, columns)
    log.info(
        "legacy_migration_completed",
        run_id=run_id,
        mode=MODE,
        migrated=sum(c.migrated for c in columns),
        failed=sum(c.failed_count for c in columns),
    )
    return True


async def migrate_range(
    km: KeyManager,
    run_id: int,
    target: str,
    lo: int,
    hi: int,
    *,
    executor: concurrent.futures.Executor | None = None,
    workers: int = 0,
    batch_rows: int = 64,
) -> RangeOutcome:
    """Migrate the legacy values of ``target`` with ``lo <= id <= hi`` (one range of a fanned-out run).

    Idempotent: it resumes after the range's last committed batch; a range already done, or a run
    no longer running, returns at once.

    Raises:
        ConfigurationError: no legacy master key, or it is the wrong one (the run is failed).
        InvalidInput: the run has no such range.
    """
    key = km.settings.legacy_key
    if key is None:
        raise ConfigurationError("legacy migration needs ENCRYPTION_KEY (or KEYROTOR_LEGACY_KEY)")
    legacy._password(key)
    rng = LegacyRange(run_id, target, lo, hi)
    own = executor is None
    n_workers = workers or km.settings.legacy_workers or os.cpu_count() or 1
    pool = executor or make_executor(n_workers)
    try:
        return await _migrate_range(km, key, pool, n_workers, rng, batch_rows)
    except PermanentError as exc:
        if isinstance(exc, KeyrotorError) and not isinstance(exc, InvalidInput):
            async with db.transaction(km.sessions) as session:
                await events.fail(session, run_id, exc)
        raise
    finally:
        if own:
            pool.shutdown(wait=False, cancel_futures=True)


async def _migrate_range(
    km: KeyManager,
    key: str,
    pool: concurrent.futures.Executor,
    workers: int,
    rng: LegacyRange,
    batch_rows: int,
) -> RangeOutcome:
    structlog.contextvars.bind_contextvars(run_id=rng.run_id, target=rng.target, lo=rng.lo)
    run, known, (range_id, range_state, bounds) = await _read_range(km, rng)
    part = run.detail.get("range_reports", {}).get(rng.key)
    rep = ColumnReport.from_dict(part) if part else ColumnReport(rng.target)

    def outcome(state: str, completed: bool = False) -> RangeOutcome:
        return RangeOutcome(
            rng.run_id, rng.target, rng.lo, rng.hi, rep.migrated, rep.failed_count, state, completed
        )

    if run.state != "running":
        return outcome("stopped")
    if range_state == "done":
        return outcome("done", await complete_if_done(km, rng.run_id))
    src = next((s for s in await sources(km) if s.name == rng.target), None)
    cursor: Key | None = None
    upper: Key | None = None
    if src is not None:
        _start, cursor, upper = range_bounds(src.key_type, rng.lo, rng.hi, bounds)
    second: dict[str, list[AESGCM]] = {}
    evidence = KeyEvidence(set(known))
    evidence.ignore(rng.target, rep.failed)
    while src is not None:  # None: the column was unregistered meanwhile; nothing left to do
        async with db.transaction(km.sessions) as session:
            rows = await store.fetch_rows(await raw_connection(session), src, cursor, batch_rows, upper)
        if not rows:
            break
        sealed = await open_batch(km, key, pool, workers, src, rows, rep, second)
        evidence.check(((rng.target, f) for f in rep.failed), len(sealed.ids))
        done = await run_to_commit(
            _write(km, rng, range_id, src, sealed, src.key_type.key(rows[-1][0]), rep, bounds)
        )
        if done is None:
            return outcome("stopped")
        if isinstance(done, _Moved):
            # Another run of this job wrote first (arq may run a job twice): this batch was its
            # work. Go on from where the range stands, with the report it has.
            rep, bounds = done.report, done.bounds
            evidence.ignore(rng.target, rep.failed)
            _start, cursor, upper = range_bounds(src.key_type, rng.lo, rng.hi, bounds)
            continue
        written, bounds = done
        rep.migrated += len(written)
        rep.changed = (rep.changed + [i for i in sealed.ids if i not in written])[:MAX_LISTED]
        cursor = src.key_type.key(rows[-1][0])
    completed = await run_to_commit(_finish(km, rng, range_id))
    log.info("legacy_range_done", migrated=rep.migrated, failed=rep.failed_count, completed_run=completed)
    return outcome("done", completed)


async def _read_range(
    km: KeyManager, rng: LegacyRange
) -> tuple[RunInfo, set[tuple[str, Key]], tuple[int, str, Any]]:
    """The range's run, the values an earlier run failed to authenticate, and the range row.

    Raises:
        RunFailed: the run is not a legacy migration.
    """
    async with db.transaction(km.sessions) as session:
        # The range before the run: its report part, read second, is then at least as new as
        # its cursor (a newer one shows as a moved cursor at the first write, see _write).
        found = await _range_row(session, rng)
        run = await runs.require_run(session, rng.run_id)
        known = await known_failures(session, rng.run_id)
    if run.kind != "legacy":
        raise runs.RunFailed(f"run {rng.run_id} is not a legacy migration")
    return run, known, found


async def _range_row(session: AsyncSession, rng: LegacyRange) -> tuple[int, str, Any]:
    """The range's id, state and ``(cursor, after_key, hi_key, cursor_key)``."""
    row = await store.range_row(session, rng.run_id, rng.target, rng.lo)
    if row is None:
        raise InvalidInput(f"run {rng.run_id} has no {rng.target} range starting at {rng.lo}")
    return row


@dataclass(frozen=True)
class _Moved:
    """The range's cursor moved since this job read it: another run of the job wrote batches."""

    report: ColumnReport  # the range's report part as it stands
    bounds: Any  # the range's (cursor, after_key, hi_key, cursor_key) as they stand


async def _write(
    km: KeyManager,
    rng: LegacyRange,
    range_id: int,
    src: Source,
    sealed: SealedBatch,
    last_id: Key,
    rep: ColumnReport,
    bounds: Any,
) -> tuple[set[Key], Any] | _Moved | None:
    """One batch's compare-and-swap write, the range's cursor and report part, the run's counters.

    ``bounds``: the range's ``(cursor, after_key, hi_key, cursor_key)`` that the batch was read
    after and ``rep`` stands on. Returns the ids written and the range's bounds after them;
    :class:`_Moved` (nothing written) if the range's cursor is no longer ``bounds``; None
    (nothing written) if the run is no longer running.
    """
    async with db.transaction(km.sessions) as session:
        state, now = await store.lock_range_run_state(session, range_id)
        if state != "running":
            return None
        if now != tuple(bounds):
            # Compared under the range row's lock: of two runs of this job, one writes each
            # batch and the other, finding the cursor moved, drops its copy of it. Otherwise
            # its compare-and-swap would miss every row, reported "changed meanwhile", and its
            # report part would overwrite the other's.
            run = await runs.require_run(session, rng.run_id)
            part = run.detail.get("range_reports", {}).get(rng.key)
            return _Moved(ColumnReport.from_dict(part) if part else ColumnReport(rng.target), now)
        written = await store.swap_values(await raw_connection(session), src, sealed)
        after = report_after(rep, sealed, written)
        integer = src.key_type.integer
        await ranges_store.advance_range(
            session,
            range_id,
            cursor=int(last_id) if integer else None,
            cursor_key=None if integer else str(last_id),
            rows=len(written),
        )
        await store.set_range_report(session, rng.run_id, rng.key, json.dumps(after))
        await runs.add_progress(session, rng.run_id, len(written))
    advanced = (int(last_id), *now[1:3], None) if integer else (*now[:3], str(last_id))
    return written, advanced


async def _finish(km: KeyManager, rng: LegacyRange, range_id: int) -> bool:
    """Mark the range done; the last range to finish completes the run. Returns True if this one did."""
    async with db.transaction(km.sessions) as session:
        await ranges_store.finish_range(session, range_id)
        return await _complete_if_done(session, rng.run_id)
