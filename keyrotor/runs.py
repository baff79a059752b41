"""Run state: one ``rotations`` row a run, what makes every rotation resumable and observable.

A run is ``pending`` (requested), ``running`` (a job has started it at least once), then
``completed`` or ``failed``. At most one run of a kind is open (pending or running) per scope
(``uq_rotations_one_open``, a partial unique index): :func:`open_run` inserts one or, when one
is open already, joins it, so many enqueuers asking at once get the same run.

Kinds: ``dek`` (a scope's DEK rotation), ``kek`` (rewrap every DEK; no scope), ``retire``
(destroy one old DEK version of a scope).
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from datetime import datetime
from typing import Any, Literal

from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncSession

from keyrotor.errors import Conflict, KeyrotorError, NotFound, PermanentError

RunKind = Literal["dek", "kek", "retire"]
TERMINAL = ("completed", "failed", "cancelled")
MAX_ERROR_CHARS = 2_000


class RunNotFound(NotFound):
    """The rotation run does not exist."""


class RunFailed(PermanentError):
    """The rotation run failed."""


@dataclass(frozen=True, slots=True)
class RunInfo:
    """A snapshot of one ``rotations`` row (plus its scope's name)."""

    id: int
    kind: str
    scope: str | None
    scope_id: int | None
    state: str
    from_version: int | None
    to_version: int | None
    cursor: int
    rows_done: int
    rows_total: int | None
    attempts: int
    error: str | None
    trigger: str
    job_id: str | None
    detail: dict[str, Any]
    created_at: datetime
    started_at: datetime | None
    finished_at: datetime | None
    updated_at: datetime

    @property
    def terminal(self) -> bool:
        """Completed, failed or cancelled: nothing more will happen to it."""
        return self.state in TERMINAL

    def as_dict(self) -> dict[str, Any]:
        """JSON-ready (timestamps as ISO 8601)."""
        doc = asdict(self)
        for key in ("created_at", "started_at", "finished_at", "updated_at"):
            value = doc[key]
            doc[key] = value.isoformat() if value is not None else None
        return doc


_COLUMNS = (
    "r.id, r.kind, s.name, r.scope_id, r.state, r.from_version, r.to_version, r.cursor, r.rows_done, "
    "r.rows_total, r.attempts, r.error, r.trigger, r.job_id, r.detail, r.created_at, r.started_at, "
    "r.finished_at, r.updated_at"
)
_FROM = "FROM rotations r LEFT JOIN key_scopes s ON s.id = r.scope_id"


def _info(row: Any) -> RunInfo:
    detail = row[14]
    if isinstance(detail, str):
        detail = json.loads(detail)
    return RunInfo(
        id=row[0],
        kind=row[1],
        scope=row[2],
        scope_id=row[3],
        state=row[4],
        from_version=row[5],
        to_version=row[6],
        cursor=row[7],
        rows_done=row[8],
        rows_total=row[9],
        attempts=row[10],
        error=row[11],
        trigger=row[12],
        job_id=row[13],
        detail=dict(detail or {}),
        created_at=row[15],
        started_at=row[16],
        finished_at=row[17],
        updated_at=row[18],
    )


async def get_run(session: AsyncSession, run_id: int, *, for_update: bool = False) -> RunInfo | None:
    """One run, or None. ``for_update`` locks its row until the transaction ends."""
    sql = f"SELECT {_COLUMNS} {_FROM} WHERE r.id = :id"
    if for_update:
        sql += " FOR UPDATE OF r"
    row = (await session.execute(text(sql), {"id": run_id})).first()
    return _info(row) if row else None


async def require_run(session: AsyncSession, run_id: int, *, for_update: bool = False) -> RunInfo:
    """One run.

    Raises:
        RunNotFound: no such run.
    """
    run = await get_run(session, run_id, for_update=for_update)
    if run is None:
        raise RunNotFound(f"rotation run {run_id} does not exist")
    return run


async def find_open_run(session: AsyncSession, kind: RunKind, scope_id: int | None) -> RunInfo | None:
    """The pending or running run of this kind (and scope), or None."""
    row = (
        await session.execute(
            text(
                f"SELECT {_COLUMNS} {_FROM} WHERE r.kind = :kind AND coalesce(r.scope_id, 0) = :sid "
                "AND r.state IN ('pending', 'running')"
            ),
            {"kind": kind, "sid": scope_id or 0},
        )
    ).first()
    return _info(row) if row else None


async def open_run(
    session: AsyncSession,
    kind: RunKind,
    scope_id: int | None,
    *,
    trigger: str,
    from_version: int | None = None,
    detail: dict[str, Any] | None = None,
) -> tuple[RunInfo, bool]:
    """Insert a pending run, or join the open one. Returns ``(run, created)``.

    Safe under concurrency: two callers inserting at once collide on ``uq_rotations_one_open``;
    the second waits for the first to commit, inserts nothing, and reads the same run.
    """
    created_id = (
        await session.execute(
            text(
                "INSERT INTO rotations (kind, scope_id, from_version, trigger, detail) "
                "VALUES (:kind, :sid, :fv, :trigger, CAST(:detail AS jsonb)) "
                "ON CONFLICT (kind, (coalesce(scope_id, 0))) WHERE state IN ('pending', 'running') "
                "DO NOTHING RETURNING id"
            ),
            {
                "kind": kind,
                "sid": scope_id,
                "fv": from_version,
                "trigger": trigger[:100],
                "detail": json.dumps(detail or {}),
            },
        )
    ).scalar_one_or_none()
    if created_id is not None:
        return await require_run(session, created_id), True
    run = await find_open_run(session, kind, scope_id)
    if run is None:  # the open run finished between the insert and the read: ask again
        raise Conflict(f"a {kind} run finished while this one was requested; request it again")
    return run, False


async def start_attempt(session: AsyncSession, run_id: int, job_id: str | None) -> RunInfo:
    """Mark a run running and count the attempt (a job started or resumed it)."""
    await session.execute(
        text(
            "UPDATE rotations SET state = 'running', attempts = attempts + 1, "
            "started_at = coalesce(started_at, now()), job_id = coalesce(:job, job_id), updated_at = now() "
            "WHERE id = :id AND state IN ('pending', 'running')"
        ),
        {"id": run_id, "job": job_id},
    )
    return await require_run(session, run_id)


async def set_versions(session: AsyncSession, run_id: int, from_version: int, to_version: int) -> None:
    """Record the DEK versions a run moves between."""
    await session.execute(
        text("UPDATE rotations SET from_version = :fv, to_version = :tv, updated_at = now() WHERE id = :id"),
        {"id": run_id, "fv": from_version, "tv": to_version},
    )


async def update_detail(session: AsyncSession, run_id: int, **values: Any) -> None:
    """Merge keys into a run's ``detail`` JSON."""
    await session.execute(
        text("UPDATE rotations SET detail = detail || CAST(:d AS jsonb), updated_at = now() WHERE id = :id"),
        {"id": run_id, "d": json.dumps(values)},
    )


async def add_progress(
    session: AsyncSession, run_id: int, rows: int, *, cursor: int | None = None, total: int | None = None
) -> None:
    """Advance a run's counters (in the transaction of the work they count)."""
    await session.execute(
        text(
            "UPDATE rotations SET rows_done = rows_done + :n, "
            "rows_total = greatest(coalesce(:total, rows_total, 0), rows_done + :n), "
            "cursor = coalesce(:cursor, cursor), updated_at = now() WHERE id = :id"
        ),
        {"id": run_id, "n": rows, "cursor": cursor, "total": total},
    )


async def complete_run(session: AsyncSession, run_id: int) -> None:
    """Mark a run completed."""
    await session.execute(
        text(
            "UPDATE rotations SET state = 'completed', error = NULL, finished_at = now(), "
            "updated_at = now(), "
            "rows_total = greatest(coalesce(rows_total, 0), rows_done) WHERE id = :id"
        ),
        {"id": run_id},
    )


async def fail_run(session: AsyncSession, run_id: int, error: KeyrotorError | str) -> None:
    """Mark a run failed with a reason (keyrotor error messages never hold secrets)."""
    message = f"{type(error).__name__}: {error}" if isinstance(error, KeyrotorError) else error
    await session.execute(
        text(
            "UPDATE rotations SET state = 'failed', error = :err, finished_at = now(), updated_at = now() "
            "WHERE id = :id AND state IN ('pending', 'running')"
        ),
        {"id": run_id, "err": message[:MAX_ERROR_CHARS]},
    )


async def list_runs(
    session: AsyncSession, *, limit: int = 20, scope: str | None = None, open_only: bool = False
) -> list[RunInfo]:
    """The most recent runs first."""
    sql = f"SELECT {_COLUMNS} {_FROM} WHERE TRUE"
    params: dict[str, Any] = {"limit": limit}
    if scope is not None:
        sql += " AND s.name = :scope"
        params["scope"] = scope
    if open_only:
        sql += " AND r.state IN ('pending', 'running')"
    sql += " ORDER BY r.id DESC LIMIT :limit"
    return [_info(row) for row in (await session.execute(text(sql), params)).all()]
