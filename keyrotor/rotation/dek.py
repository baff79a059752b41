"""DEK rotation of one scope: DESIGN.md's eight steps, resumable at every point.

:func:`rotate_dek` drives a run forward from wherever it stands; running it twice, or after
a crash at any point, is harmless:

1-2. **prepare**: generate a DEK, wrap it with the KEK and store it ``pending`` in one
     transaction (held open for the KEK call, so that a KEK rotation's cut-off cannot fall
     between the wrap and the insert), and record its version on the run.
     A crash before the commit loses only an unused DEK; after it, the run adopts the stored one.
     The pending DEK is announced on Redis (every process may decrypt with it; none encrypts).
3.   **promote**, in one transaction with the scope row locked: new DEK ``active``, old one
     ``grace`` until now + the scope's ``grace_period_days``. In the same transaction:

     - a *small* scope (fewer rows than ``KEYROTOR_SMALL_SCOPE_ROWS``) is re-encrypted whole
       and completed (steps 3-7 commit together);
     - a *large* one is split into id ranges (``rotation_ranges`` rows) that workers
       re-encrypt in parallel with :func:`reencrypt_range`, a batch a transaction.
4-5. **re-encrypt** (:mod:`keyrotor.rotation.ranges`, batches by :mod:`keyrotor.rotation.reencrypt`):
     lock, decrypt old, encrypt new, verify, compare-and-swap write, advance the counters --
     each batch one transaction.
6-7. **complete** (:mod:`keyrotor.rotation.completion`): whoever finishes the last range (counted
     in the database) sweeps stragglers, increments ``dek_rotation_count``, sets
     ``last_rotation_at`` and ``next_rotation_at`` and writes the ``rotate`` audit event, in one
     transaction.
8.   **announce**: every process drops its caches of the scope (Redis pub/sub).

The two job entry points are here: :func:`rotate_dek` (steps 1-3, then the fan-out) and
:func:`reencrypt_range` (one range, from :mod:`keyrotor.rotation.ranges`).

A value that fails to decrypt stops the run (``failed``, its error naming the row id); its
batch is rolled back and the old DEK keeps decrypting (it is in grace, or still active if the
small-scope transaction rolled back).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import structlog
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from sqlalchemy.ext.asyncio import AsyncSession

from keyrotor import metrics, runs
from keyrotor.census.columns import ManagedTarget
from keyrotor.crypto import envelope
from keyrotor.errors import Conflict, InvalidInput
from keyrotor.inputs import check_scope
from keyrotor.kek.base import WrapContext
from keyrotor.notify import KeyChange
from keyrotor.rotation.completion import announce_completed, complete, complete_if_done
from keyrotor.rotation.context import RotationContext, run_to_commit
from keyrotor.rotation.lifecycle import begin_attempt, failing_run, require_scope
from keyrotor.rotation.ranges import REGISTERED_COLUMNS
from keyrotor.rotation.ranges import reencrypt_range as reencrypt_range
from keyrotor.rotation.reencrypt import RotationKeys, load_keys, plan_ranges, sweep
from keyrotor.runs import RunInfo
from keyrotor.store import db
from keyrotor.store import kek as kek_store
from keyrotor.store import rotation as store
from keyrotor.store.key_ranges import insert_range
from keyrotor.store.targets import Target, count_older, raw_connection

log = structlog.get_logger("keyrotor.rotation.dek")


@dataclass(frozen=True, slots=True)
class RangeJob:
    """One key range of a fanned-out run, for the caller to enqueue.

    ``lo``/``hi``: the id bounds of an integer key, or the range's ordinal for other keys (whose
    bounds the ``rotation_ranges`` row holds).
    """

    run_id: int
    target: str
    lo: int
    hi: int


@dataclass(frozen=True)
class DekProgress:
    """Where a run stands after :func:`rotate_dek` and what remains to schedule."""

    run: RunInfo
    ranges: list[RangeJob] = field(default_factory=list)

    def summary(self) -> dict[str, Any]:
        """Job result: ids, versions and counts only."""
        return {
            "run_id": self.run.id,
            "scope": self.run.scope,
            "state": self.run.state,
            "from_version": self.run.from_version,
            "to_version": self.run.to_version,
            "rows_done": self.run.rows_done,
            "rows_total": self.run.rows_total,
            "ranges_pending": len(self.ranges),
        }


async def request_rotation(
    session: AsyncSession, scope: str, *, trigger: str = "api", request_id: str | None = None
) -> tuple[RunInfo, bool]:
    """Open a DEK rotation run for ``scope`` or join the open one. Returns ``(run, created)``.

    ``request_id`` (the caller's correlation id) is recorded on the run (:func:`runs.open_run`).

    Raises:
        ScopeNotFound: no such scope.
        InvalidRequestId: ``request_id`` is not valid.
    """
    check_scope(scope)
    return await _open_run(session, scope, trigger=trigger, request_id=request_id)


async def _open_run(
    session: AsyncSession, scope: str, *, trigger: str, request_id: str | None = None
) -> tuple[RunInfo, bool]:
    sc = await require_scope(session, scope)
    return await runs.open_run(
        session, "dek", sc.id, trigger=trigger, from_version=sc.active_version, request_id=request_id
    )


async def rotate_dek(
    rc: RotationContext,
    scope: str,
    *,
    trigger: str = "api",
    run_id: int | None = None,
    job_id: str | None = None,
) -> DekProgress:
    """Rotate ``scope``'s DEK, or resume its open rotation. Idempotent.

    Args:
        rc: the rotation dependencies.
        scope: the scope.
        trigger: who asked (``api``, ``schedule``, ``cli``), recorded on a new run.
        run_id: the run to drive (the enqueue client creates it); None opens or joins one.
        job_id: the queue job driving it, recorded on the run.

    Returns:
        The run (completed for a small scope) and the id ranges still to re-encrypt.

    Raises:
        KekMismatch: this process's KEK cannot unwrap the scope's DEKs (the run is left as is).
        RowFailed: a value did not decrypt; the run is marked failed naming it.
        TransientError: an outage; run it again later and it resumes.
    """
    check_scope(scope)
    async with db.transaction(rc.sessions) as session:
        if run_id is None:
            run, _ = await _open_run(session, scope, trigger=trigger)
        else:
            run = await runs.require_run(session, run_id)
            if run.kind != "dek" or run.scope != scope:
                raise InvalidInput(f"run {run_id} is not a DEK rotation of {scope!r}")
    if run.terminal:
        return DekProgress(run)
    # Refuse before touching anything if this worker's KEK cannot open the scope's DEKs.
    await rc.check_kek(scope)
    run = await begin_attempt(rc, run, scope, job_id)
    async with failing_run(rc, run):
        return await _drive(rc, scope, run)


async def _drive(rc: RotationContext, scope: str, run: RunInfo) -> DekProgress:
    if run.to_version is None:
        structlog.contextvars.bind_contextvars(step="prepare")
        run = await _prepare(rc, scope, run)
    assert run.to_version is not None
    # Tink's order: distribute first, promote second.
    structlog.contextvars.bind_contextvars(step="promote")
    await rc.announce(KeyChange("pending", scope, run.to_version))
    small = await run_to_commit(_promote(rc, scope, run))
    if small:
        async with db.transaction(rc.sessions) as session:
            run = await runs.require_run(session, run.id)
        await announce_completed(rc, run, mode="single_transaction", rows=run.rows_done)
        return DekProgress(run)
    await rc.announce(KeyChange("active", scope, run.to_version))
    async with db.transaction(rc.sessions) as session:
        run = await runs.require_run(session, run.id)
        ranges = [RangeJob(run.id, t, lo, hi) for t, lo, hi in await store.pending_ranges(session, run.id)]
    if not ranges and run.state == "running":
        # Every range is done but the run was not completed: no range was ever needed.
        done = await run_to_commit(complete_if_done(rc, run))
        async with db.transaction(rc.sessions) as session:
            run = await runs.require_run(session, run.id)
        if done:
            await announce_completed(rc, run, mode="ranges")
    return DekProgress(run, ranges)


# --- steps 1-2: the new DEK ----------------------------------------------------------------


async def _prepare(rc: RotationContext, scope: str, run: RunInfo) -> RunInfo:
    """Steps 1-2: the new DEK, wrapped and stored ``pending``; its version recorded on the run."""
    async with db.transaction(rc.sessions) as session:
        sc = await require_scope(session, scope)
        active, latest = sc.active_version, sc.latest_version
        pending = await store.pending_dek_version(session, sc.id)
        if pending is not None:
            # Left by a run that failed before promotion: adopt it rather than pile up keys.
            locked = await runs.require_run(session, run.id, for_update=True)
            if locked.to_version is None:
                await runs.set_versions(session, run.id, active, pending)
            return await runs.require_run(session, run.id)
    version = latest + 1
    dek = envelope.new_dek()
    async with db.transaction(rc.sessions) as session:
        locked = await runs.require_run(session, run.id, for_update=True)
        if locked.to_version is not None:  # a concurrent job of the same run got here first
            return locked
        sc = await require_scope(session, scope, for_update=True)
        if sc.latest_version != version - 1:
            raise Conflict(f"{scope}: DEK versions changed while preparing v{version}; run again")
        # Wrapped in the inserting transaction: a KEK rotation's cut-off cannot fall between.
        await kek_store.hold_off_kek_cutoff(session)
        wrapped = await rc.kek.wrap(dek, WrapContext(scope, version))
        await store.insert_pending_dek(
            session, sc.id, version, blob=wrapped.blob, kek_id=wrapped.kek_id, kek_version=wrapped.kek_version
        )
        await runs.set_versions(session, run.id, sc.active_version, version)
        run = await runs.require_run(session, run.id)
    rc.ciphers.put(scope, version, AESGCM(dek))
    metrics.ROTATIONS_STARTED.labels(metrics.scope_label(scope)).inc()
    log.info("dek_pending", to_version=version, kek_id=wrapped.kek_id, kek_version=wrapped.kek_version)
    return run


# --- step 3: promote, and re-encrypt a small scope whole or fan a large one out ---------------


async def _promote(rc: RotationContext, scope: str, run: RunInfo) -> bool:
    """Step 3 (and 4-7 for a small scope) in one transaction. Returns True if the run completed."""
    assert run.to_version is not None
    async with db.transaction(rc.sessions) as session:
        locked = await runs.require_run(session, run.id, for_update=True)
        if locked.state != "running":
            return locked.state == "completed"
        sc = await require_scope(session, scope, for_update=True)
        state = await store.dek_state(session, sc.id, run.to_version)
        if state == "active":
            return False  # promoted by an earlier attempt: the ranges carry on
        if state != "pending":
            raise Conflict(f"{scope}: DEK v{run.to_version} is {state or 'missing'}, not pending")
        keys = await load_keys(session, rc.cipher, scope, sc.id, run.to_version)
        apg = await raw_connection(session)
        targets = rc.targets_for(scope)
        # Counted once here, then handed to the range planner, which would otherwise count again.
        counts = {t.name: await count_older(apg, t, sc.id, run.to_version) for t in targets}
        total = sum(counts.values())
        await store.promote_dek(session, sc.id, run.to_version)
        await runs.add_progress(session, run.id, 0, total=total)
        if total < rc.settings.small_scope_rows:
            await _rotate_whole(session, apg, rc, run.id, keys, targets)
            return True
        planned = await _fan_out(session, apg, rc, run, keys, targets, counts)
        log.info("rotation_fanned_out", rows_total=total, ranges=planned, to_version=run.to_version)
        return False


async def _rotate_whole(
    session: AsyncSession,
    apg: Any,
    rc: RotationContext,
    run_id: int,
    keys: RotationKeys,
    targets: list[Target],
) -> None:
    """Steps 4-7 of a small scope, in the promoting transaction."""
    written = 0
    for target in targets:
        written += await sweep(apg, target, keys, limit=rc.batch_rows)
    await runs.add_progress(session, run_id, written)
    await runs.update_detail(session, run_id, mode="single_transaction")
    await complete(session, apg, rc, run_id, keys, targets)


async def _fan_out(
    session: AsyncSession,
    apg: Any,
    rc: RotationContext,
    run: RunInfo,
    keys: RotationKeys,
    targets: list[Target],
    counts: dict[str, int],
) -> int:
    """Split a large scope's rows into ``rotation_ranges`` rows, in the promoting transaction
    (``counts``: each target's rows still to do, counted in it). Returns how many."""
    assert run.to_version is not None
    planned = 0
    first_version = keys.old_versions[0] if keys.old_versions else run.to_version - 1
    for target in targets:
        plan = await plan_ranges(
            apg, target, keys.scope_id, run.to_version, range_rows=rc.range_rows, total=counts[target.name]
        )
        for p in plan:
            # A range's first pass is over the oldest version its rows hold, not the scope's.
            version = p.least_version if p.least_version in keys.old else first_version
            await insert_range(session, run.id, target.name, p, version=version)
            planned += 1
    # Which targets are registered columns: a range of one that is unregistered before it runs
    # is skipped (keyrotor.rotation.ranges), where a target only some process defines in code waits.
    managed = [t.name for t in targets if isinstance(t, ManagedTarget)]
    await runs.update_detail(
        session, run.id, mode="ranges", ranges=planned, **({REGISTERED_COLUMNS: managed} if managed else {})
    )
    return planned
