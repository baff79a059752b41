"""What every kind of run shares: its scope row, how a job takes it up and how it fails.

A job starts an attempt of its run (:func:`begin_attempt`: the registered columns refreshed, the
attempt counted, the run's ids bound to every log line) and works inside :func:`failing_run`:
a permanent error marks the run ``failed`` and writes its failed audit event, while a
configuration error leaves the run for a worker configured right.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import structlog
from sqlalchemy.ext.asyncio import AsyncSession

from keyrotor import metrics, runs
from keyrotor.audit.log import AuditEvent, write_event
from keyrotor.census.columns import refresh_targets
from keyrotor.errors import ConfigurationError, PermanentError, ScopeNotFound
from keyrotor.rotation.context import RotationContext
from keyrotor.runs import RunInfo
from keyrotor.store import db, repo
from keyrotor.store.models import KeyScope

log = structlog.get_logger("keyrotor.rotation.lifecycle")


async def require_scope(session: AsyncSession, name: str, *, for_update: bool = False) -> KeyScope:
    """The scope row (locked with ``for_update``).

    Raises:
        ScopeNotFound: no such scope.
    """
    scope = await repo.get_scope(session, name, for_update=for_update)
    if scope is None:
        raise ScopeNotFound(f"scope {name!r} does not exist")
    return scope


async def begin_attempt(rc: RotationContext, run: RunInfo, scope: str, job_id: str | None) -> RunInfo:
    """Count a new attempt of ``run`` by ``job_id``, after loading the application columns
    registered since this worker started (the run covers every one of them)."""
    await refresh_targets(rc)
    async with db.transaction(rc.sessions) as session:
        run = await runs.start_attempt(session, run.id, job_id)
    structlog.contextvars.bind_contextvars(run_id=run.id, scope=scope)
    return run


async def record_failure(session: AsyncSession, run: RunInfo, exc: PermanentError) -> bool:
    """Mark ``run`` failed with ``exc``, count it and write its failed audit event, in the
    caller's transaction (the event last: it takes the chain lock). Returns whether it did.

    A run that has ended already (another attempt completed or failed it) is left as it is and
    nothing is recorded: whoever ended it recorded its outcome.
    """
    if not await runs.fail_run(session, run.id, exc):
        return False
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
    return True


async def fail(rc: RotationContext, run: RunInfo, exc: PermanentError) -> None:
    """Mark a run failed and audit it (:func:`record_failure`, in a transaction of its own: the
    work rolled back). A run that has ended already is left as it is."""
    async with db.transaction(rc.sessions) as session:
        failed = await record_failure(session, run, exc)
    if not failed:
        log.warning("run_ended_before_failure", run_id=run.id, kind=run.kind, error=type(exc).__name__)
        return
    log.error("run_failed", run_id=run.id, kind=run.kind, error=f"{type(exc).__name__}: {exc}")


@asynccontextmanager
async def failing_run(rc: RotationContext, run: RunInfo) -> AsyncIterator[None]:
    """Fail ``run`` (:func:`fail`) when the block raises a permanent error, then re-raise it.

    A :class:`ConfigurationError` (this worker lacks a key or a target) leaves the run as is,
    for a worker that has them.
    """
    try:
        yield
    except PermanentError as exc:
        if not isinstance(exc, ConfigurationError):
            await fail(rc, run, exc)
        raise
