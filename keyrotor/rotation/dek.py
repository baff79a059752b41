"""DEK rotation of one scope: DESIGN.md's eight steps, resumable at every point.

:func:`rotate_dek` drives a run forward from wherever it stands; running it twice, or after
a crash at any point, is harmless:

1-2. **prepare**: generate a DEK, wrap it with the KEK (outside any transaction: a KEK call may
     be a network round trip), then store it ``pending`` and record its version on the run.
     A crash before the commit loses only an unused DEK; after it, the run adopts the stored one.
     The pending DEK is announced on Redis (every process may decrypt with it; none encrypts).
3.   **promote**, in one transaction with the scope row locked: new DEK ``active``, old one
     ``grace`` until now + the scope's ``grace_period_days``. In the same transaction:

     - a *small* scope (fewer rows than ``KEYROTOR_SMALL_SCOPE_ROWS``) is re-encrypted whole
       and completed (steps 3-7 commit together);
     - a *large* one is split into id ranges (``rotation_ranges`` rows) that workers
       re-encrypt in parallel with :func:`reencrypt_range`, a batch a transaction.
4-5. **re-encrypt** (:mod:`keyrotor.rotation.reencrypt`): lock, decrypt old, encrypt new, verify,
     compare-and-swap write, advance the counters -- each batch one transaction.
6-7. **complete**: whoever finishes the last range (counted in the database) sweeps
     stragglers, increments ``dek_rotation_count``, sets ``last_rotation_at`` and
     ``next_rotation_at`` and writes the ``rotate`` audit event, in one transaction.
8.   **announce**: every process drops its caches of the scope (Redis pub/sub).

A value that fails to decrypt stops the run (``failed``, its error naming the row id); its
batch is rolled back and the old DEK keeps decrypting (it is in grace, or still active if the
small-scope transaction rolled back).
"""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import structlog
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncSession

from keyrotor import metrics, runs
from keyrotor.audit.log import AuditEvent, write_event
from keyrotor.census.columns import refresh_targets
from keyrotor.crypto import envelope
from keyrotor.errors import (
    ConfigurationError,
    Conflict,
    InvalidInput,
    PermanentError,
    ScopeNotFound,
    TransientError,
)
from keyrotor.kek.base import WrapContext
from keyrotor.notify import KeyChange
from keyrotor.rotation.context import RotationContext, run_to_commit
from keyrotor.rotation.reencrypt import (
    RotationKeys,
    Target,
    exists_in_range,
    load_keys,
    plan_ranges,
    raw_connection,
    reencrypt_batch,
    relax_commit,
    sweep,
)
from keyrotor.runs import RunInfo
from keyrotor.schedule.rules import check_scope
from keyrotor.store import db
from keyrotor.store.key_ranges import insert_range, range_bounds

log = structlog.get_logger("keyrotor.rotation.dek")

# How long a range waits for rows locked by others (application transactions) before it
# gives up for now (a transient error: the job retries later).
LOCKED_ROWS_PATIENCE_S = 30.0


class RowsLocked(TransientError):
    """Rows to re-encrypt stay locked by other transactions; try again later."""


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


@dataclass(frozen=True, slots=True)
class _Scope:
    id: int
    name: str
    active_version: int
    latest_version: int


async def _scope(session: AsyncSession, name: str, *, for_update: bool = False) -> _Scope:
    sql = "SELECT id, name, active_version, latest_version FROM key_scopes WHERE name = :n"
    if for_update:
        sql += " FOR UPDATE"
    row = (await session.execute(text(sql), {"n": name})).first()
    if row is None:
        raise ScopeNotFound(f"scope {name!r} does not exist")
    return _Scope(*row)


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
    sc = await _scope(session, scope)
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
            run, _ = await request_rotation(session, scope, trigger=trigger)
        else:
            run = await runs.require_run(session, run_id)
            if run.kind != "dek" or run.scope != scope:
                raise InvalidInput(f"run {run_id} is not a DEK rotation of {scope!r}")
    if run.terminal:
        return DekProgress(run)
    # Refuse before touching anything if this worker's KEK cannot open the scope's DEKs.
    await rc.check_kek(scope)
    await refresh_targets(rc)  # application columns registered since this worker started
    async with db.transaction(rc.sessions) as session:
        run = await runs.start_attempt(session, run.id, job_id)
    structlog.contextvars.bind_contextvars(run_id=run.id, scope=scope)
    try:
        return await _drive(rc, scope, run)
    except PermanentError as exc:
        if not isinstance(exc, ConfigurationError):
            await fail(rc, run, exc)
        raise


async def fail(rc: RotationContext, run: RunInfo, exc: PermanentError) -> None:
    """Mark a run failed and audit it (in a transaction of its own: the work rolled back)."""
    async with db.transaction(rc.sessions) as session:
        await runs.fail_run(session, run.id, exc)
        metrics.ROTATIONS_FAILED.labels(metrics.scope_label(run.scope or "-"), run.kind).inc()
        event = {"dek": "rotate", "kek": "rewrap", "retire": "retire"}.get(run.kind, "rotate")
        await write_event(
            session,
            AuditEvent(
                event_type=event,  # type: ignore[arg-type]
                scope=run.scope,
                key_version=run.to_version if run.kind == "dek" else run.from_version,
                success=False,
                error_message=f"{type(exc).__name__}: {exc}"[:1000],
                metadata={"run_id": run.id, "trigger": run.trigger, **runs.request_context(run.request_ids)},
            ),
        )
    log.error("run_failed", run_id=run.id, kind=run.kind, error=f"{type(exc).__name__}: {exc}")


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
        # Steps 6-8 ran in _promote's task, whose context bindings do not come back here.
        structlog.contextvars.bind_contextvars(step="complete")
        await rc.announce(KeyChange("rotated", scope, run.to_version))
        metrics.rotation_completed(scope, _elapsed(run))
        log.info(
            "rotation_completed", mode="single_transaction", rows=run.rows_done, to_version=run.to_version
        )
        return DekProgress(run)
    await rc.announce(KeyChange("active", scope, run.to_version))
    async with db.transaction(rc.sessions) as session:
        run = await runs.require_run(session, run.id)
        rows = (
            await session.execute(
                text(
                    "SELECT target, lo, hi FROM rotation_ranges WHERE run_id = :r AND state = 'pending' "
                    "ORDER BY target, lo"
                ),
                {"r": run.id},
            )
        ).all()
    ranges = [RangeJob(run.id, t, lo, hi) for t, lo, hi in rows]
    if not ranges and run.state == "running":
        # Every range is done but the run was not completed (its last range's job died after
        # marking itself done? impossible: same transaction) -- or no range was ever needed.
        done = await run_to_commit(_complete_if_done(rc, run))
        if done:
            await rc.announce(KeyChange("rotated", scope, run.to_version))
        async with db.transaction(rc.sessions) as session:
            run = await runs.require_run(session, run.id)
        if done:
            metrics.rotation_completed(scope, _elapsed(run))
    return DekProgress(run, ranges)


def _elapsed(run: RunInfo) -> float | None:
    end = run.finished_at or datetime.now(UTC)
    return (end - run.created_at).total_seconds()


async def _prepare(rc: RotationContext, scope: str, run: RunInfo) -> RunInfo:
    """Steps 1-2: the new DEK, wrapped and stored ``pending``; its version recorded on the run."""
    async with db.transaction(rc.sessions) as session:
        sc = await _scope(session, scope)
        pending = (
            await session.execute(
                text(
                    "SELECT version FROM data_keys WHERE scope_id = :s AND state = 'pending' "
                    "ORDER BY version DESC LIMIT 1"
                ),
                {"s": sc.id},
            )
        ).scalar_one_or_none()
        if pending is not None:
            # Left by a run that failed before promotion: adopt it rather than pile up keys.
            locked = await runs.require_run(session, run.id, for_update=True)
            if locked.to_version is None:
                await runs.set_versions(session, run.id, sc.active_version, pending)
            return await runs.require_run(session, run.id)
    version = sc.latest_version + 1
    dek = envelope.new_dek()
    wrapped = await rc.kek.wrap(dek, WrapContext(scope, version))
    async with db.transaction(rc.sessions) as session:
        locked = await runs.require_run(session, run.id, for_update=True)
        if locked.to_version is not None:  # a concurrent job of the same run got here first
            return locked
        sc = await _scope(session, scope, for_update=True)
        if sc.latest_version != version - 1:
            raise Conflict(f"{scope}: DEK versions changed while preparing v{version}; run again")
        await session.execute(
            text(
                "INSERT INTO data_keys (scope_id, version, state, encrypted_dek, kek_id, kek_version) "
                "VALUES (:s, :v, 'pending', :blob, :kid, :kv)"
            ),
            {
                "s": sc.id,
                "v": version,
                "blob": wrapped.blob,
                "kid": wrapped.kek_id,
                "kv": wrapped.kek_version,
            },
        )
        await session.execute(
            text("UPDATE key_scopes SET latest_version = :v, updated_at = now() WHERE id = :s"),
            {"s": sc.id, "v": version},
        )
        await runs.set_versions(session, run.id, sc.active_version, version)
        run = await runs.require_run(session, run.id)
    rc.ciphers.put(scope, version, AESGCM(dek))
    metrics.ROTATIONS_STARTED.labels(metrics.scope_label(scope)).inc()
    log.info("dek_pending", to_version=version, kek_id=wrapped.kek_id, kek_version=wrapped.kek_version)
    return run


async def _promote(rc: RotationContext, scope: str, run: RunInfo) -> bool:
    """Step 3 (and 4-7 for a small scope) in one transaction. Returns True if the run completed."""
    assert run.to_version is not None
    async with db.transaction(rc.sessions) as session:
        locked = await runs.require_run(session, run.id, for_update=True)
        if locked.state != "running":
            return locked.state == "completed"
        sc = await _scope(session, scope, for_update=True)
        state = (
            await session.execute(
                text("SELECT state FROM data_keys WHERE scope_id = :s AND version = :v"),
                {"s": sc.id, "v": run.to_version},
            )
        ).scalar_one_or_none()
        if state == "active":
            return False  # promoted by an earlier attempt: the ranges carry on
        if state != "pending":
            raise Conflict(f"{scope}: DEK v{run.to_version} is {state or 'missing'}, not pending")
        keys = await load_keys(session, rc.cipher, scope, sc.id, run.to_version)
        apg = await raw_connection(session)
        targets = rc.targets_for(scope)
        total = 0
        for target in targets:
            total += int(await apg.fetchval(target.sql.count_older, sc.id, run.to_version))
        await session.execute(
            text(
                "UPDATE data_keys SET state = 'grace', "
                "grace_until = now() + make_interval(days => (SELECT grace_period_days FROM key_scopes "
                "WHERE id = :s)) WHERE scope_id = :s AND state = 'active'"
            ),
            {"s": sc.id},
        )
        await session.execute(
            text(
                "UPDATE data_keys SET state = 'active', activated_at = now() "
                "WHERE scope_id = :s AND version = :v"
            ),
            {"s": sc.id, "v": run.to_version},
        )
        await session.execute(
            text("UPDATE key_scopes SET active_version = :v, updated_at = now() WHERE id = :s"),
            {"s": sc.id, "v": run.to_version},
        )
        await runs.add_progress(session, run.id, 0, total=total)
        if total < rc.settings.small_scope_rows:
            written = 0
            for target in targets:
                written += await sweep(apg, target, keys, limit=rc.batch_rows)
            await runs.add_progress(session, run.id, written)
            await runs.update_detail(session, run.id, mode="single_transaction")
            await _complete(session, apg, rc, run.id, keys, targets)
            return True
        planned = 0
        first_version = keys.old_versions[0] if keys.old_versions else run.to_version - 1
        for target in targets:
            for p in await plan_ranges(apg, target, sc.id, run.to_version, range_rows=rc.range_rows):
                await insert_range(session, run.id, target.name, p, version=first_version)
                planned += 1
        await runs.update_detail(session, run.id, mode="ranges", ranges=planned)
        log.info("rotation_fanned_out", rows_total=total, ranges=planned, to_version=run.to_version)
        return False


async def _complete(
    session: AsyncSession,
    apg: Any,
    rc: RotationContext,
    run_id: int,
    keys: RotationKeys,
    targets: list[Target],
) -> None:
    """Steps 6-7, inside the caller's transaction (which holds the run row's lock)."""
    structlog.contextvars.bind_contextvars(step="complete")
    await apg.execute("SET LOCAL synchronous_commit = on")  # a completed run must survive a crash
    swept = 0
    for target in targets:
        swept += await sweep(apg, target, keys, limit=rc.batch_rows)
    if swept:
        await runs.add_progress(session, run_id, swept)
        log.info("stragglers_reencrypted", rows=swept)
    await session.execute(
        text(
            "UPDATE key_scopes SET dek_rotation_count = dek_rotation_count + 1, last_rotation_at = now(), "
            "next_rotation_at = CASE WHEN rotation_enabled THEN now() + make_interval(days => interval_days) "
            "END, updated_at = now() WHERE id = :s"
        ),
        {"s": keys.scope_id},
    )
    run = await runs.require_run(session, run_id)
    # Every row the run re-encrypted is an encryption under the new DEK: its usage counter
    # (KEYROTOR_MAX_ENCRYPTIONS_PER_DEK, keyrotor.census.usage) must see them like application writes.
    await session.execute(
        text("UPDATE data_keys SET encryptions = encryptions + :n WHERE scope_id = :s AND version = :v"),
        {"n": run.rows_done, "s": keys.scope_id, "v": keys.new_version},
    )
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
                **runs.request_context(run.request_ids),
            },
        ),
    )
    await runs.complete_run(session, run_id)


async def _complete_if_done(rc: RotationContext, run: RunInfo) -> bool:
    """Complete a running run whose ranges are all done. Returns True if this call completed it."""
    assert run.scope is not None and run.scope_id is not None and run.to_version is not None
    async with db.transaction(rc.sessions) as session:
        locked = await runs.require_run(session, run.id, for_update=True)
        if locked.state != "running":
            return False
        left = (
            await session.execute(
                text("SELECT count(*) FROM rotation_ranges WHERE run_id = :r AND state = 'pending'"),
                {"r": run.id},
            )
        ).scalar_one()
        if left:
            return False
        keys = await load_keys(session, rc.cipher, run.scope, run.scope_id, run.to_version)
        apg = await raw_connection(session)
        await _complete(session, apg, rc, run.id, keys, rc.targets_for(run.scope))
        return True


# --- one id range -------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class _Step:
    written: int = 0
    finished: bool = False
    blocked: bool = False
    stopped: str | None = None
    completed_run: bool = False


async def reencrypt_range(
    rc: RotationContext, run_id: int, lo: int, hi: int, *, target: str = "secrets"
) -> RangeProgress:
    """Re-encrypt one id range of a fanned-out run, a batch a transaction. Idempotent.

    Resumes from the range's cursor; stops early when the run is no longer running (another
    range failed). Whoever finishes the last range completes the run (steps 6-8).

    Raises:
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
    if tgt is None:
        # A worker without the application's registered targets: leave the run to one that has them.
        raise ConfigurationError(f"no re-encryption target named {target!r} is registered in this process")
    rows = batches = 0
    waited = 0.0
    try:
        while True:
            await rc.spend_rows(rc.batch_rows)
            step = await run_to_commit(_range_step(rc, run, keys, tgt, lo, hi))
            if step.stopped is not None:
                return RangeProgress(run_id, target, lo, hi, rows, batches, step.stopped)
            rows += step.written
            if step.written:
                batches += 1
                waited = 0.0
                log.info(
                    "batch_reencrypted", target=target, lo=lo, rows=step.written, to_version=run.to_version
                )
                await rc.test_pause()
            if step.finished:
                break
            if step.blocked:
                if waited >= LOCKED_ROWS_PATIENCE_S:
                    raise RowsLocked(f"{target} rows of run {run_id} in ids {lo}..{hi} stay locked by others")
                await asyncio.sleep(0.1)
                waited += 0.1
    except PermanentError as exc:
        if not isinstance(exc, ConfigurationError):
            await fail(rc, run, exc)
        raise
    if step.completed_run:
        # _complete ran in run_to_commit's task, whose context bindings do not come back here.
        structlog.contextvars.bind_contextvars(step="complete")
        await rc.announce(KeyChange("rotated", run.scope, run.to_version))
        metrics.rotation_completed(run.scope, (datetime.now(UTC) - run.created_at).total_seconds())
        log.info("rotation_completed", mode="ranges", to_version=run.to_version)
    return RangeProgress(run_id, target, lo, hi, rows, batches, "done", step.completed_run)


async def _range_step(
    rc: RotationContext, run: RunInfo, keys: RotationKeys, target: Target, lo: int, hi: int
) -> _Step:
    """One transaction of a range: one batch, or moving to the next version, or finishing."""
    async with db.transaction(rc.sessions) as session:
        row = (
            await session.execute(
                text(
                    "SELECT g.id, g.state, g.version, r.state, g.cursor, g.after_key, g.hi_key, g.cursor_key "
                    "FROM rotation_ranges g "
                    "JOIN rotations r ON r.id = g.run_id "
                    "WHERE g.run_id = :r AND g.target = :t AND g.lo = :lo "
                    "FOR UPDATE OF g"
                ),
                {"r": run.id, "t": target.name, "lo": lo},
            )
        ).first()
        if row is None:
            raise InvalidInput(f"run {run.id} has no {target.name} range starting at {lo}")
        range_id, range_state, version, run_state = row[:4]
        start, cursor, upper = range_bounds(target.key_type, lo, hi, row[4:])
        if run_state != "running":
            return _Step(stopped=run_state)
        if range_state == "done":
            return _Step(finished=True)
        apg = await raw_connection(session)
        await relax_commit(apg)
        versions = keys.old_versions
        if version in versions:
            batch = await reencrypt_batch(
                apg, target, keys, version, after=cursor, hi=upper, limit=rc.batch_rows, skip_locked=True
            )
            if batch.last_id is not None:
                integer = target.key_type.integer
                await session.execute(
                    text(
                        "UPDATE rotation_ranges SET cursor = coalesce(:c, cursor), cursor_key = :ck, "
                        "rows_done = rows_done + :n, updated_at = now() WHERE id = :id"
                    ),
                    {
                        "id": range_id,
                        "c": batch.last_id if integer else None,
                        "ck": None if integer else str(batch.last_id),
                        "n": batch.written,
                    },
                )
                # Last statement before the commit: the run row is the one every range updates.
                await runs.add_progress(session, run.id, batch.written)
                return _Step(written=batch.written)
        later = [v for v in versions if v > version]
        restart = text(
            "UPDATE rotation_ranges SET version = :v, cursor = :c, cursor_key = NULL, updated_at = now() "
            "WHERE id = :id"
        )
        if later:
            await session.execute(restart, {"id": range_id, "v": later[0], "c": lo - 1})
            return _Step()
        if await exists_in_range(apg, target, keys, start, upper):
            # Rows skipped as locked (or written behind the cursor): go round again from the start.
            await session.execute(restart, {"id": range_id, "v": versions[0], "c": lo - 1})
            return _Step(blocked=True)
        await session.execute(
            text("UPDATE rotation_ranges SET state = 'done', updated_at = now() WHERE id = :id"),
            {"id": range_id},
        )
        # Count the ranges left in the database, with the run row locked, so that exactly one
        # of the ranges finishing at the same moment completes the run.
        await runs.require_run(session, run.id, for_update=True)
        left = (
            await session.execute(
                text("SELECT count(*) FROM rotation_ranges WHERE run_id = :r AND state = 'pending'"),
                {"r": run.id},
            )
        ).scalar_one()
        if left:
            return _Step(finished=True)
        assert run.scope is not None
        await _complete(session, apg, rc, run.id, keys, rc.targets_for(run.scope))
        return _Step(finished=True, completed_run=True)
