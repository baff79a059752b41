"""Run state: one ``rotations`` row a run, what makes every rotation resumable and observable.

A run is ``pending`` (requested), ``running`` (a job has started it at least once), then
``completed`` or ``failed``. At most one run of a kind is open (pending or running) per scope
(``uq_rotations_one_open``, a partial unique index): :func:`open_run` inserts one or, when one
is open already, joins it, so many enqueuers asking at once get the same run.

Kinds: ``dek`` (a scope's DEK rotation), ``kek`` (rewrap every DEK; no scope), ``retire``
(destroy one old DEK version of a scope).

Callers may name themselves with a request id (their correlation id): the run keeps the ids of
its requesters in ``detail.request_ids`` (the creator first, each joiner appended, at most
:data:`MAX_REQUEST_IDS`), and its jobs' log events and audit events carry them
(:func:`request_context`).
"""

from __future__ import annotations

import json
import re
from dataclasses import asdict, dataclass
from datetime import datetime
from typing import Any, Literal

from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncSession

from keyrotor.errors import Conflict, InvalidInput, KeyrotorError, NotFound, PermanentError
from keyrotor.redaction import looks_like_key_material

RunKind = Literal["dek", "kek", "retire"]
TERMINAL = ("completed", "failed", "cancelled")
MAX_ERROR_CHARS = 2_000
MAX_REQUEST_IDS = 20
MAX_REQUEST_ID_CHARS = 128
# No spaces, quotes, newlines or '=': a request id cannot forge a log line or a field.
_REQUEST_ID_RE = re.compile(r"[A-Za-z0-9._:/@-]{1,128}")
# An API key fits that alphabet, though: what the log redaction blanks (keyrotor.redaction:
# provider API keys, kr1 values, a password in a URL, long random runs) is refused instead, so a
# key pasted by mistake is never stored on a run and an id is never shown blanked in the logs.


class RunNotFound(NotFound):
    """The rotation run does not exist."""


class RunFailed(PermanentError):
    """The rotation run failed."""


class InvalidRequestId(InvalidInput):
    """The request id is not valid."""


def check_request_id(value: str) -> str:
    """Validate a caller's request id and return it.

    Args:
        value: 1 to 128 characters of ``A-Z a-z 0-9 . _ : / @ -``, not looking like key material
            (a provider API key, a ``kr1:`` value, a password in a URL, a random run of 32 or more
            characters mixing letters and digits: what the log redaction would blank).

    Raises:
        InvalidRequestId: anything else; the message states the rule and never echoes the value.
    """
    if not isinstance(value, str) or not _REQUEST_ID_RE.fullmatch(value):
        size = f"{len(value)} characters" if isinstance(value, str) else type(value).__name__
        raise InvalidRequestId(
            f"invalid request id ({size}): use 1 to {MAX_REQUEST_ID_CHARS} characters of "
            "letters, digits and . _ : / @ -"
        )
    if looks_like_key_material(value):
        raise InvalidRequestId(
            f"invalid request id ({len(value)} characters): it looks like key material (an API key, "
            "a kr1 value, a URL password or a long random run, which logs blank); use an id of "
            "1 to 128 characters of letters, digits and . _ : / @ - that is not a secret"
        )
    return value


def _valid(value: str) -> bool:
    return bool(_REQUEST_ID_RE.fullmatch(value)) and not looks_like_key_material(value)


def request_context(request_ids: list[str]) -> dict[str, Any]:
    """Log and audit fields for a run's requesters: ``request_id`` (the first, who opened the
    run) and, once others joined, ``request_ids`` (all). Empty if nobody named themselves.

    Ids that are not valid (a row edited by hand) are left out rather than logged.
    """
    ids = [i for i in request_ids if isinstance(i, str) and _valid(i)]
    if not ids:
        return {}
    if len(ids) == 1:
        return {"request_id": ids[0]}
    return {"request_id": ids[0], "request_ids": ids}


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
    request_id: str | None = None,
) -> tuple[RunInfo, bool]:
    """Insert a pending run, or join the open one. Returns ``(run, created)``.

    Safe under concurrency: two callers inserting at once collide on ``uq_rotations_one_open``;
    the second waits for the first to commit, inserts nothing, and reads the same run.

    ``request_id`` (validated here) is recorded in ``detail.request_ids`` in this transaction:
    as the first id of a new run, or appended to the open run's ids when joining (once per id,
    at most :data:`MAX_REQUEST_IDS`; later joiners are not recorded).

    Raises:
        InvalidRequestId: ``request_id`` is not valid (nothing is written).
        Conflict: the open run finished while it was being joined.
    """
    if request_id is not None:
        check_request_id(request_id)
        detail = {**(detail or {}), "request_ids": [request_id]}
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
    known = run.request_ids
    if request_id is not None and request_id not in known and len(known) < MAX_REQUEST_IDS:
        run = await _join_request(session, run, request_id)
    return run, False


async def _join_request(session: AsyncSession, run: RunInfo, request_id: str) -> RunInfo:
    # Appended in SQL under the row lock (another joiner may have appended since the read), so
    # a joiner waits for a job transaction holding the row (a batch; a small scope's whole
    # rotation). updated_at is left alone: a join is not progress (enqueue_driver re-drives on it).
    joined = (
        await session.execute(
            text(
                "UPDATE rotations SET detail = jsonb_set(detail, '{request_ids}', CASE "
                "WHEN coalesce(detail->'request_ids', '[]') @> jsonb_build_array(CAST(:rid AS text)) "
                "OR jsonb_array_length(coalesce(detail->'request_ids', '[]')) >= :max "
                "THEN coalesce(detail->'request_ids', '[]') "
                "ELSE coalesce(detail->'request_ids', '[]') || jsonb_build_array(CAST(:rid AS text)) END) "
                "WHERE id = :id AND state IN ('pending', 'running') RETURNING id"
            ),
            {"id": run.id, "rid": request_id, "max": MAX_REQUEST_IDS},
        )
    ).scalar_one_or_none()
    if joined is None:
        raise Conflict(f"{run.kind} run {run.id} finished while it was being joined; request it again")
    return await require_run(session, run.id)


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
    session: AsyncSession,
    *,
    limit: int = 20,
    scope: str | None = None,
    open_only: bool = False,
    request_id: str | None = None,
) -> list[RunInfo]:
    """The most recent runs first; with ``request_id``, only the runs that requester asked for.

    Raises:
        InvalidRequestId: ``request_id`` is not a valid request id.
    """
    sql = f"SELECT {_COLUMNS} {_FROM} WHERE TRUE"
    params: dict[str, Any] = {"limit": limit}
    if scope is not None:
        sql += " AND s.name = :scope"
        params["scope"] = scope
    if request_id is not None:
        sql += " AND r.detail -> 'request_ids' @> jsonb_build_array(CAST(:rid AS text))"
        params["rid"] = check_request_id(request_id)
    if open_only:
        sql += " AND r.state IN ('pending', 'running')"
    sql += " ORDER BY r.id DESC LIMIT :limit"
    return [_info(row) for row in (await session.execute(text(sql), params)).all()]
