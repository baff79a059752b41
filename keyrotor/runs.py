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

import re
from typing import Any, Literal

from sqlalchemy.ext.asyncio import AsyncSession

from keyrotor.errors import Conflict, InvalidInput, KeyrotorError, NotFound, PermanentError
from keyrotor.redaction import looks_like_key_material
from keyrotor.store import runs as store
from keyrotor.store.runs import TERMINAL as TERMINAL
from keyrotor.store.runs import RunInfo as RunInfo
from keyrotor.store.runs import add_progress as add_progress
from keyrotor.store.runs import complete_run as complete_run
from keyrotor.store.runs import find_open_run as find_open_run
from keyrotor.store.runs import get_run as get_run
from keyrotor.store.runs import request_ids_of as request_ids_of
from keyrotor.store.runs import set_versions as set_versions
from keyrotor.store.runs import update_detail as update_detail

RunKind = Literal["dek", "kek", "retire"]
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


async def require_run(session: AsyncSession, run_id: int, *, for_update: bool = False) -> RunInfo:
    """One run.

    Raises:
        RunNotFound: no such run.
    """
    run = await get_run(session, run_id, for_update=for_update)
    if run is None:
        raise RunNotFound(f"rotation run {run_id} does not exist")
    return run


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
    created_id = await store.insert_run(
        session, kind, scope_id, trigger=trigger[:100], from_version=from_version, detail=detail or {}
    )
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
    # The append waits for a job transaction holding the row (a batch; a small scope's whole
    # rotation), and leaves updated_at alone (enqueue_driver re-drives on it).
    if not await store.append_request_id(session, run.id, request_id, max_ids=MAX_REQUEST_IDS):
        raise Conflict(f"{run.kind} run {run.id} finished while it was being joined; request it again")
    return await require_run(session, run.id)


async def start_attempt(session: AsyncSession, run_id: int, job_id: str | None) -> RunInfo:
    """Mark a run running and count the attempt (a job started or resumed it)."""
    await store.mark_running(session, run_id, job_id)
    return await require_run(session, run_id)


async def fail_run(session: AsyncSession, run_id: int, error: KeyrotorError | str) -> bool:
    """Mark an open run failed with a reason (keyrotor error messages never hold secrets).

    Returns False, and writes nothing, if the run has ended already (completed by another
    attempt, say): the caller records no failure for it either.
    """
    message = f"{type(error).__name__}: {error}" if isinstance(error, KeyrotorError) else error
    return await store.mark_failed(session, run_id, message[:MAX_ERROR_CHARS])


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
    if request_id is not None:
        check_request_id(request_id)
    return await store.select_runs(
        session, limit=limit, scope=scope, open_only=open_only, request_id=request_id
    )
