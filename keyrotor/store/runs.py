"""Run rows: every statement on the ``rotations`` table, and the one row -> :class:`RunInfo` mapping.

The rules about runs (who may join one, what a request id may hold, which errors are raised) are
in :mod:`keyrotor.runs`; these functions only read and write rows, in the caller's transaction.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from datetime import datetime
from typing import Any

from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncSession

TERMINAL = ("completed", "failed", "cancelled")


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
    def request_ids(self) -> list[str]:
        """The request ids of whoever asked for this run, the creator first."""
        ids = self.detail.get("request_ids") or []
        return [i for i in ids if isinstance(i, str)] if isinstance(ids, list) else []

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


# A run row's columns in the order _run reads them; selects append the scope's name after them.
_RUN_COLUMNS = (
    "id, kind, scope_id, state, from_version, to_version, cursor, rows_done, rows_total, "
    "attempts, error, trigger, job_id, detail, created_at, started_at, finished_at, updated_at"
)
_SELECT = (
    "SELECT r.id, r.kind, r.scope_id, r.state, r.from_version, r.to_version, r.cursor, r.rows_done, "
    "r.rows_total, r.attempts, r.error, r.trigger, r.job_id, r.detail, r.created_at, r.started_at, "
    "r.finished_at, r.updated_at, s.name FROM rotations r LEFT JOIN key_scopes s ON s.id = r.scope_id"
)
_OPEN = "state IN ('pending', 'running')"


def _run(row: Sequence[Any], scope: str | None) -> RunInfo:
    detail = row[13]
    if isinstance(detail, str):
        detail = json.loads(detail)
    return RunInfo(
        id=row[0],
        kind=row[1],
        scope=scope,
        scope_id=row[2],
        state=row[3],
        from_version=row[4],
        to_version=row[5],
        cursor=row[6],
        rows_done=row[7],
        rows_total=row[8],
        attempts=row[9],
        error=row[10],
        trigger=row[11],
        job_id=row[12],
        detail=dict(detail or {}),
        created_at=row[14],
        started_at=row[15],
        finished_at=row[16],
        updated_at=row[17],
    )


def _selected(row: Sequence[Any]) -> RunInfo:
    return _run(row, row[18])


async def get_run(session: AsyncSession, run_id: int, *, for_update: bool = False) -> RunInfo | None:
    """One run, or None. ``for_update`` locks its row until the transaction ends."""
    sql = f"{_SELECT} WHERE r.id = :id"
    if for_update:
        sql += " FOR UPDATE OF r"
    row = (await session.execute(text(sql), {"id": run_id})).first()
    return _selected(row) if row else None


async def find_open_run(session: AsyncSession, kind: str, scope_id: int | None) -> RunInfo | None:
    """The pending or running run of this kind (and scope), or None."""
    row = (
        await session.execute(
            text(f"{_SELECT} WHERE r.kind = :kind AND coalesce(r.scope_id, 0) = :sid AND r.{_OPEN}"),
            {"kind": kind, "sid": scope_id or 0},
        )
    ).first()
    return _selected(row) if row else None


async def insert_run(
    session: AsyncSession,
    kind: str,
    scope_id: int | None,
    *,
    trigger: str,
    from_version: int | None,
    detail: dict[str, Any],
) -> int | None:
    """Insert a pending run and return its id; None (nothing written) if one of its kind is open."""
    created: int | None = (
        await session.execute(
            text(
                "INSERT INTO rotations (kind, scope_id, from_version, trigger, detail) "
                "VALUES (:kind, :sid, :fv, :trigger, CAST(:detail AS jsonb)) "
                f"ON CONFLICT (kind, (coalesce(scope_id, 0))) WHERE {_OPEN} "
                "DO NOTHING RETURNING id"
            ),
            {
                "kind": kind,
                "sid": scope_id,
                "fv": from_version,
                "trigger": trigger,
                "detail": json.dumps(detail),
            },
        )
    ).scalar_one_or_none()
    return created


# The same insert as insert_run, many rows at once; a conflicting open run (opened meanwhile by a
# client or another scan) makes that row a no-op.
_INSERT_RUNS_SQL = (
    "INSERT INTO rotations (kind, scope_id, from_version, trigger, detail) "
    "SELECT :kind, u.sid, u.fv, :trigger, CAST(u.detail AS jsonb) "
    "FROM unnest(CAST(:sids AS bigint[]), CAST(:fvs AS int[]), CAST(:details AS text[])) "
    "AS u(sid, fv, detail) "
    f"ON CONFLICT (kind, (coalesce(scope_id, 0))) WHERE {_OPEN} DO NOTHING RETURNING {_RUN_COLUMNS}"
)


async def insert_runs(
    session: AsyncSession,
    kind: str,
    trigger: str,
    items: Sequence[tuple[int, str, int, dict[str, Any]]],
) -> list[RunInfo]:
    """Insert pending runs ``(scope_id, scope, from_version, detail)``; returns those inserted, by id."""
    if not items:
        return []
    names = {sid: name for sid, name, _, _ in items}
    rows = (
        await session.execute(
            text(_INSERT_RUNS_SQL),
            {
                "kind": kind,
                "trigger": trigger,
                "sids": [i[0] for i in items],
                "fvs": [i[2] for i in items],
                "details": [json.dumps(i[3]) for i in items],
            },
        )
    ).all()
    return sorted((_run(r, names[r[2]]) for r in rows), key=lambda r: r.id)


async def append_request_id(session: AsyncSession, run_id: int, request_id: str, *, max_ids: int) -> bool:
    """Append a request id to an open run's ``detail.request_ids`` (once, at most ``max_ids``).

    Returns False if the run is no longer open. Appended in SQL under the row lock (another
    joiner may have appended since the caller read the run). ``updated_at`` is left alone: a
    join is not progress.
    """
    joined = (
        await session.execute(
            text(
                "UPDATE rotations SET detail = jsonb_set(detail, '{request_ids}', CASE "
                "WHEN coalesce(detail->'request_ids', '[]') @> jsonb_build_array(CAST(:rid AS text)) "
                "OR jsonb_array_length(coalesce(detail->'request_ids', '[]')) >= :max "
                "THEN coalesce(detail->'request_ids', '[]') "
                "ELSE coalesce(detail->'request_ids', '[]') || jsonb_build_array(CAST(:rid AS text)) END) "
                f"WHERE id = :id AND {_OPEN} RETURNING id"
            ),
            {"id": run_id, "rid": request_id, "max": max_ids},
        )
    ).scalar_one_or_none()
    return joined is not None


async def request_ids_of(session: AsyncSession, run_id: int) -> list[str]:
    """The request ids recorded on a run (empty if none, or no such run)."""
    ids = (
        await session.execute(
            text("SELECT detail->'request_ids' FROM rotations WHERE id = :id"), {"id": run_id}
        )
    ).scalar_one_or_none()
    if isinstance(ids, str):
        ids = json.loads(ids)
    return [i for i in ids if isinstance(i, str)] if isinstance(ids, list) else []


async def mark_running(session: AsyncSession, run_id: int, job_id: str | None) -> None:
    """Mark an open run running and count the attempt."""
    await session.execute(
        text(
            "UPDATE rotations SET state = 'running', attempts = attempts + 1, "
            "started_at = coalesce(started_at, now()), job_id = coalesce(:job, job_id), updated_at = now() "
            f"WHERE id = :id AND {_OPEN}"
        ),
        {"id": run_id, "job": job_id},
    )


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


async def _write_open(session: AsyncSession, sets: str, run_id: int, **params: Any) -> bool:
    """``UPDATE rotations SET <sets>`` of run ``run_id`` if it is still open; whether it was.

    An ended run's counters and outcome are final: arq may run a job twice, and an attempt that
    stalled past its lease may wake after another completed (or failed) the run. Every write of a
    run's progress or outcome (:func:`add_progress`, :func:`complete_run`, :func:`mark_failed`)
    goes through here, so that holds in one place.
    """
    updated = (
        await session.execute(
            text(f"UPDATE rotations SET {sets}, updated_at = now() WHERE id = :id AND {_OPEN} RETURNING id"),
            {"id": run_id, **params},
        )
    ).scalar_one_or_none()
    return updated is not None


async def add_progress(
    session: AsyncSession, run_id: int, rows: int, *, cursor: int | None = None, total: int | None = None
) -> bool:
    """Advance an open run's counters (in the transaction of the work they count); False, and
    nothing written, if the run has ended (:func:`_write_open`)."""
    return await _write_open(
        session,
        "rows_done = rows_done + :n, rows_total = greatest(coalesce(:total, rows_total, 0), rows_done + :n), "
        "cursor = coalesce(:cursor, cursor)",
        run_id,
        n=rows,
        cursor=cursor,
        total=total,
    )


async def complete_run(session: AsyncSession, run_id: int, *, total_is_done: bool = False) -> bool:
    """Mark an open run completed; False (nothing written) if it has ended already.

    ``rows_total`` becomes at least ``rows_done``; with ``total_is_done``, exactly ``rows_done``:
    for a run whose every row is done once it completes (a DEK rotation), rows its plan counted
    but it never rewrote (a column unregistered meanwhile, rows deleted) are not its rows.
    """
    total = "rows_done" if total_is_done else "greatest(coalesce(rows_total, 0), rows_done)"
    return await _write_open(
        session, f"state = 'completed', error = NULL, finished_at = now(), rows_total = {total}", run_id
    )


async def mark_failed(session: AsyncSession, run_id: int, error: str) -> bool:
    """Mark an open run failed with ``error``; False (nothing written) if it has ended already."""
    return await _write_open(
        session, "state = 'failed', error = :err, finished_at = now()", run_id, err=error
    )


async def select_runs(
    session: AsyncSession,
    *,
    limit: int,
    scope: str | None = None,
    open_only: bool = False,
    request_id: str | None = None,
) -> list[RunInfo]:
    """The most recent runs first, filtered by scope name, requester, or open state."""
    sql = f"{_SELECT} WHERE TRUE"
    params: dict[str, Any] = {"limit": limit}
    if scope is not None:
        sql += " AND s.name = :scope"
        params["scope"] = scope
    if request_id is not None:
        sql += " AND r.detail -> 'request_ids' @> jsonb_build_array(CAST(:rid AS text))"
        params["rid"] = request_id
    if open_only:
        sql += f" AND r.{_OPEN}"
    sql += " ORDER BY r.id DESC LIMIT :limit"
    return [_selected(row) for row in (await session.execute(text(sql), params)).all()]


async def last_retire_errors(session: AsyncSession, scope_ids: Sequence[int]) -> dict[int, str]:
    """The error of each scope's latest failed retirement run."""
    rows = await session.execute(
        text(
            "SELECT DISTINCT ON (scope_id) scope_id, error FROM rotations "
            "WHERE kind = 'retire' AND state = 'failed' AND scope_id = ANY(:ids) ORDER BY scope_id, id DESC"
        ),
        {"ids": list(scope_ids)},
    )
    return {sid: str(err) for sid, err in rows.all() if err}


# The median of the rates rows_done / (finished_at - started_at) of the latest completed DEK runs
# that moved at least :min_rows rows for :min_s seconds, among the latest :recent runs of any kind
# (rotations has no index that would find large completed runs directly, so the lookup is bounded).
_MEASURED_RATE_SQL = (
    "SELECT count(*), percentile_cont(0.5) WITHIN GROUP (ORDER BY CAST(rows_done AS float8) "
    "/ CAST(extract(epoch FROM finished_at - started_at) AS float8)) FROM ("
    "SELECT rows_done, started_at, finished_at FROM ("
    "SELECT id, kind, state, rows_done, started_at, finished_at FROM rotations ORDER BY id DESC LIMIT :recent"
    ") AS recent WHERE kind = 'dek' AND state = 'completed' AND rows_done >= :min_rows "
    "AND finished_at - started_at >= make_interval(secs => :min_s) "
    "ORDER BY id DESC LIMIT :n) AS latest"
)


async def median_rotation_rate(
    session: AsyncSession, *, recent: int, min_rows: int, min_s: float, runs: int
) -> tuple[int, float | None]:
    """``(runs measured, median rows a second)`` over the latest completed DEK rotations."""
    measured, rate = (
        await session.execute(
            text(_MEASURED_RATE_SQL),
            {"recent": recent, "min_rows": min_rows, "min_s": min_s, "n": runs},
        )
    ).one()
    return int(measured or 0), (float(rate) if rate is not None else None)
