"""The end of a retired DEK version: erase it after its window, or restore it to grace.

A retired version (:mod:`keyrotor.rotation.retire`) keeps its wrapped key until ``destroy_after``
(``KEYROTOR_DESTROY_AFTER_DAYS`` after it was retired, as AWS KMS's pending deletion). Any
decrypt that needs it meanwhile is recorded in ``retired_key_uses`` by the process that made it
(:class:`keyrotor.KeyManager`), and cancels the erasure.

:func:`destroy_dek` (the scheduler's ``destroy`` runs, once ``destroy_after`` has passed) does, in
ONE transaction: lock the ``data_keys`` row; lock ``retired_key_uses`` in SHARE mode (a use
committed before is seen, one after waits for this decision); then

- a use since ``retired_at`` cancels the erasure (``destroy_after`` NULL; the run completes as
  ``cancelled``): the value that needed it still decrypts, and retiring again re-runs the proof
  and starts a new window;
- otherwise the whole retirement proof once more (:func:`keyrotor.rotation.retire.prove_unused`: rows on
  the version in every registered location, and no location the census cannot count); if it
  fails, the erasure is cancelled likewise and the run fails naming the reason;
- only then the wrapped key is erased (``destroyed``, ``encrypted_dek`` NULL, ``destroyed_at``),
  with its ``retire`` audit event, and every process is told to forget the DEK (again by each
  later run of the same job: the attempt that erased it may have died before it could tell).

:func:`restore_dek` brings a retired version back to ``grace`` (``keyrotor keys restore``).
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from typing import Any

import structlog
from sqlalchemy.ext.asyncio import AsyncSession

from keyrotor import runs
from keyrotor.audit.log import check_actor, record_config_change
from keyrotor.census.locations import display
from keyrotor.crypto.envelope import MAX_VERSION
from keyrotor.errors import Conflict, KeyVersionUnknown, PermanentError, ScopeNotFound
from keyrotor.inputs import check_scope
from keyrotor.notify import KeyChange
from keyrotor.rotation.context import RotationContext, run_to_commit
from keyrotor.rotation.lifecycle import begin_attempt, failing_run
from keyrotor.rotation.retire import prove_unused, retire_event
from keyrotor.runs import RunInfo
from keyrotor.store import db
from keyrotor.store import retire as store

log = structlog.get_logger("keyrotor.rotation.destruction")

CANCELLED = "cancelled"
DESTROYED = "destroyed"
# Nothing to erase: destroyed already, restored meanwhile, or not due yet (a later scan retries).
ALREADY_DESTROYED, NOT_RETIRED, NOT_DUE = "already_destroyed", "not_retired", "not_due"


class NotRestorable(Conflict):
    """Only a retired DEK version can be restored."""


@dataclass(frozen=True)
class DestroyResult:
    """The outcome of a destruction run: ``destroyed``, ``cancelled`` (a use or a failed
    proof), ``already_destroyed``, ``not_retired`` or ``not_due``."""

    run: RunInfo
    scope: str
    version: int
    outcome: str

    def summary(self) -> dict[str, Any]:
        return {
            "run_id": self.run.id,
            "scope": self.scope,
            "version": self.version,
            "state": self.run.state,
            "outcome": self.outcome,
        }


async def destroy_dek(
    rc: RotationContext, scope: str, version: int, *, run_id: int, job_id: str | None = None
) -> DestroyResult:
    """Erase retired DEK ``version`` of ``scope`` if its window passed unused and the proof
    holds once more; otherwise cancel the erasure. Idempotent.

    Raises:
        Conflict: ``run_id`` is not a destruction run of this version.
        LocationNotCovered, KeyStillInUse: the proof failed; the erasure is cancelled and the
            run failed with the reason (the key is kept).
    """
    check_scope(scope)
    async with db.transaction(rc.sessions) as session:
        run = await runs.require_run(session, run_id)
    if (
        run.kind != "retire"
        or run.scope != scope
        or run.from_version != version
        or not run.detail.get("destroy")
    ):
        raise Conflict(f"run {run_id} is not the destruction of {scope} v{version}")
    if run.terminal:
        outcome = str(run.detail.get("outcome", run.state))
        if outcome == DESTROYED:
            # The attempt that erased the key may have died (or lost Redis) between its commit
            # and its announcement: announcing again is harmless, missing it leaves the key in
            # other processes' caches until they read its state again.
            await _forget_everywhere(rc, scope, version)
        return DestroyResult(run, scope, version, outcome)
    run = await begin_attempt(rc, run, scope, job_id)  # the proof covers every registered column
    async with failing_run(rc, run):
        outcome, refusal = await run_to_commit(_decide(rc, run, scope, version))
        if refusal is not None:
            raise refusal
    if outcome == DESTROYED:
        log.info("dek_destroyed", version=version)
        await _forget_everywhere(rc, scope, version)
    async with db.transaction(rc.sessions) as session:
        run = await runs.require_run(session, run.id)
    return DestroyResult(run, scope, version, outcome)


async def _forget_everywhere(rc: RotationContext, scope: str, version: int) -> None:
    """Drop the erased DEK from this process's cache and tell every other process to."""
    rc.ciphers.invalidate(scope, version)
    await rc.announce(KeyChange("destroyed", scope, version))


async def _decide(
    rc: RotationContext, run: RunInfo, scope: str, version: int
) -> tuple[str, PermanentError | None]:
    async with db.transaction(rc.sessions) as session:
        await store.limit_lock_wait(session)
        key_id, state, retired_at, destroy_after, due, scope_id = await store.lock_dek_to_destroy(
            session, scope, version
        )
        ended = await runs.require_run(session, run.id)
        if ended.terminal:
            # Another attempt of this run (arq ran the job again meanwhile) decided while this
            # one waited for the key's row: its outcome stands, so that a retry still acts on it.
            return str(ended.detail.get("outcome", ended.state)), None
        if state != "retired" or destroy_after is None or not due:
            outcome = _nothing_to_erase(state, destroy_after is None)
            await _complete(session, run, outcome)
            return outcome, None
        await store.lock_retired_key_uses(session)
        uses = await store.uses_since(session, scope_id, version, retired_at)
        if uses:
            await store.cancel_destruction(session, key_id)
            locations = sorted(uses)
            await retire_event(
                session,
                run,
                scope,
                version,
                success=True,
                state=CANCELLED,
                used_from=locations,
                uses=sum(uses.values()),
            )
            await _complete(session, run, CANCELLED, used_from=[display(loc) for loc in locations])
            log.warning(
                "dek_destruction_cancelled", version=version, used_from=[display(x) for x in locations]
            )
            return CANCELLED, None
        refusal = (await prove_unused(rc, session, scope, scope_id, version)).refusal(scope, version)
        if refusal is not None:
            await store.cancel_destruction(session, key_id)  # committed; the caller fails the run
            return CANCELLED, type(refusal)(f"{refusal}; its destruction is cancelled (retire it again)")
        await store.erase_dek(session, key_id)
        await retire_event(
            session, run, scope, version, success=True, state=DESTROYED, retired_at=retired_at.isoformat()
        )
        await _complete(session, run, DESTROYED)
    return DESTROYED, None


def _nothing_to_erase(state: str, cancelled: bool) -> str:
    if state == "destroyed":
        return ALREADY_DESTROYED
    if state != "retired":  # restored meanwhile
        return NOT_RETIRED
    return CANCELLED if cancelled else NOT_DUE


async def _complete(session: AsyncSession, run: RunInfo, outcome: str, **detail: Any) -> None:
    await runs.update_detail(session, run.id, outcome=outcome, **detail)
    await runs.complete_run(session, run.id)


@dataclass(frozen=True)
class Restored:
    """A retired version back in grace."""

    scope: str
    version: int
    grace_until: datetime

    def as_dict(self) -> dict[str, Any]:
        return {
            "scope": self.scope,
            "version": self.version,
            "state": "grace",
            "grace_until": self.grace_until.isoformat(),
        }


async def restore_dek(session: AsyncSession, scope: str, version: int, *, actor: str) -> Restored:
    """Bring retired DEK ``version`` of ``scope`` back to ``grace`` (until now + the scope's
    grace days; no destruction pending), recorded as a ``config_change`` by ``actor`` in the
    caller's transaction. Announce ``restored`` after it commits.

    Raises:
        ScopeNotFound, KeyVersionUnknown: no such scope or version.
        NotRestorable: the version is pending, active, in grace or destroyed.
        InvalidInput: ``actor`` is not a valid actor name.
    """
    check_scope(scope)
    actor = check_actor(actor)
    if not 0 < version <= MAX_VERSION:
        raise KeyVersionUnknown(f"{scope}: DEK v{version} does not exist")
    row = await store.lock_scope_and_dek(session, scope, version)
    if row is None:
        raise ScopeNotFound(f"scope {scope!r} does not exist")
    grace_days, key_id, retired_at, destroy_after = row
    if key_id is None:
        raise KeyVersionUnknown(f"{scope}: DEK v{version} does not exist")
    state = await store.lock_dek_state(session, key_id)
    if state != "retired":
        why = (
            "its key is erased; nothing can bring it back"
            if state == "destroyed"
            else "only a retired one can be restored"
        )
        raise NotRestorable(f"{scope}: DEK v{version} is {state}: {why}")
    grace_until = await store.restore_to_grace(session, key_id, grace_days)
    before = {
        "version": version,
        "state": "retired",
        "retired_at": retired_at.isoformat() if retired_at else None,
        "destroy_after": destroy_after.isoformat() if destroy_after else None,
    }
    after = {"version": version, "state": "grace", "grace_until": grace_until.isoformat()}
    await record_config_change(session, actor, "restore_key", before, after, scope=scope)
    return Restored(scope, version, grace_until)
