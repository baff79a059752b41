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
  with its ``retire`` audit event, and every process is told to forget the DEK.

:func:`restore_dek` brings a retired version back to ``grace`` (``keyrotor keys restore``).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import structlog
from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncSession

from keyrotor import runs
from keyrotor.audit.log import check_actor, record_config_change
from keyrotor.census.columns import refresh_targets
from keyrotor.census.locations import display
from keyrotor.crypto.envelope import MAX_VERSION
from keyrotor.errors import ConfigurationError, Conflict, KeyVersionUnknown, PermanentError, ScopeNotFound
from keyrotor.notify import KeyChange
from keyrotor.rotation.context import RotationContext, run_to_commit
from keyrotor.rotation.dek import fail
from keyrotor.rotation.retire import LOCK_TIMEOUT, prove_unused, retire_event
from keyrotor.runs import RunInfo
from keyrotor.schedule.rules import check_scope
from keyrotor.store import db

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
        return DestroyResult(run, scope, version, str(run.detail.get("outcome", run.state)))
    await refresh_targets(rc)  # the proof covers every registered application column
    async with db.transaction(rc.sessions) as session:
        run = await runs.start_attempt(session, run.id, job_id)
    structlog.contextvars.bind_contextvars(run_id=run.id, scope=scope)
    try:
        outcome, refusal = await run_to_commit(_decide(rc, run, scope, version))
        if refusal is not None:
            raise refusal
    except PermanentError as exc:
        if not isinstance(exc, ConfigurationError):
            await fail(rc, run, exc)
        raise
    if outcome == DESTROYED:
        rc.ciphers.invalidate(scope, version)
        await rc.announce(KeyChange("destroyed", scope, version))
        log.info("dek_destroyed", version=version)
    async with db.transaction(rc.sessions) as session:
        run = await runs.require_run(session, run.id)
    return DestroyResult(run, scope, version, outcome)


async def _decide(
    rc: RotationContext, run: RunInfo, scope: str, version: int
) -> tuple[str, PermanentError | None]:
    async with db.transaction(rc.sessions) as session:
        await session.execute(text(f"SET LOCAL lock_timeout = '{LOCK_TIMEOUT}'"))
        key = (
            await session.execute(
                text(
                    "SELECT d.id, d.state, d.retired_at, d.destroy_after, d.destroy_after <= now(), s.id "
                    "FROM data_keys d JOIN key_scopes s ON s.id = d.scope_id "
                    "WHERE s.name = :n AND d.version = :v FOR UPDATE OF d"
                ),
                {"n": scope, "v": version},
            )
        ).one()
        key_id, state, retired_at, destroy_after, due, scope_id = key
        if state != "retired" or destroy_after is None or not due:
            outcome = _nothing_to_erase(state, destroy_after is None)
            await _complete(session, run, outcome)
            return outcome, None
        await session.execute(text("LOCK TABLE retired_key_uses IN SHARE MODE"))
        uses = await uses_since(session, scope_id, version, retired_at)
        if uses:
            await _cancel(session, key_id)
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
            await _cancel(session, key_id)  # committed; the caller fails the run with the reason
            return CANCELLED, type(refusal)(f"{refusal}; its destruction is cancelled (retire it again)")
        await session.execute(
            text(
                "UPDATE data_keys SET state = 'destroyed', encrypted_dek = NULL, destroyed_at = now() "
                "WHERE id = :id"
            ),
            {"id": key_id},
        )
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


async def _cancel(session: AsyncSession, key_id: int) -> None:
    await session.execute(text("UPDATE data_keys SET destroy_after = NULL WHERE id = :id"), {"id": key_id})


async def _complete(session: AsyncSession, run: RunInfo, outcome: str, **detail: Any) -> None:
    await session.execute(
        text("UPDATE rotations SET detail = detail || CAST(:d AS jsonb) WHERE id = :id"),
        {"id": run.id, "d": json.dumps({"outcome": outcome, **detail})},
    )
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
    row = (
        await session.execute(
            text(
                "SELECT s.grace_period_days, d.id, d.retired_at, d.destroy_after "
                "FROM key_scopes s LEFT JOIN data_keys d ON d.scope_id = s.id AND d.version = :v "
                "WHERE s.name = :n FOR UPDATE OF s"
            ),
            {"n": scope, "v": version},
        )
    ).first()
    if row is None:
        raise ScopeNotFound(f"scope {scope!r} does not exist")
    grace_days, key_id, retired_at, destroy_after = row
    if key_id is None:
        raise KeyVersionUnknown(f"{scope}: DEK v{version} does not exist")
    state = (
        await session.execute(text("SELECT state FROM data_keys WHERE id = :id FOR UPDATE"), {"id": key_id})
    ).scalar_one()
    if state != "retired":
        why = (
            "its key is erased; nothing can bring it back"
            if state == "destroyed"
            else "only a retired one can be"
        )
        raise NotRestorable(f"{scope}: DEK v{version} is {state}: {why}")
    grace_until = (
        await session.execute(
            text(
                "UPDATE data_keys SET state = 'grace', grace_until = now() + make_interval(days => :g), "
                "retired_at = NULL, destroy_after = NULL WHERE id = :id RETURNING grace_until"
            ),
            {"id": key_id, "g": grace_days},
        )
    ).scalar_one()
    before = {
        "version": version,
        "state": "retired",
        "retired_at": retired_at.isoformat() if retired_at else None,
        "destroy_after": destroy_after.isoformat() if destroy_after else None,
    }
    after = {"version": version, "state": "grace", "grace_until": grace_until.isoformat()}
    await record_config_change(session, actor, "restore_key", before, after, scope=scope)
    return Restored(scope, version, grace_until)
