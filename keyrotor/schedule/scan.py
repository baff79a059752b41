"""What is due: the scheduler's scans over rotation policies and grace periods.

A scan finds

- **rotations**: scopes whose ``next_rotation_at`` has passed (the policy's interval, or a DEK
  that reached its encryption limit, see :mod:`keyrotor.census.usage`), and
- **retirements**: DEKs in ``grace`` whose ``grace_until`` has passed,
- **destructions**: ``retired`` DEKs whose ``destroy_after`` has passed (a ``retire`` run with
  ``destroy`` in its detail, driven by ``destroy_dek``, which proves again and may cancel),

and opens a run (a ``rotations`` row, trigger ``schedule``) for each, exactly as the enqueue
client does for an on-demand request. The caller (``worker/scheduler.py``) then enqueues the
run's driver job under the run's deterministic job id. Opening the run in Postgres first is what
makes a scan safe to run twice, concurrently, or again after a crash:

- at most one run of a kind is open per scope (``uq_rotations_one_open``); scopes with an open
  run are skipped, and a run opened by a concurrent scan or client makes the insert a no-op;
- each page of candidates is locked ``FOR UPDATE SKIP LOCKED``, so two scans share the work
  instead of both seeing a scope, and a rotation cannot complete (it updates the scope row)
  between the check "is it still due?" and the insert;
- a completed rotation moves ``next_rotation_at`` forward in its completing transaction, so a
  scope rotated on demand is no longer due.

A scope (or DEK) whose consecutive runs failed waits ``retry_delay(failures)`` after the last
failure (exponential, capped): a broken scope is retried, not hammered every scan.

Scans page through candidates in ``(next_rotation_at, id)`` order over the partial index
``ix_key_scopes_due`` (keyset pagination, ``batch`` rows a transaction; the statements are in
:mod:`keyrotor.store.schedule`), so a scan reads only due rows, never the whole table. Nothing
here touches a key or a ciphertext. What a scan *would* do is :mod:`keyrotor.schedule.plan`'s.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterable, Sequence
from dataclasses import dataclass, field, replace
from datetime import UTC, datetime
from typing import Any

from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from keyrotor.runs import RunInfo
from keyrotor.schedule.rules import retry_delay
from keyrotor.store import db
from keyrotor.store import schedule as store
from keyrotor.store.runs import insert_runs

# The statements of the due scans, for those who EXPLAIN them.
from keyrotor.store.schedule import DUE_GRACE_SQL as DUE_GRACE_SQL
from keyrotor.store.schedule import DUE_SCOPES_SQL as DUE_SCOPES_SQL

TRIGGER = "schedule"
START = datetime(1, 1, 1, tzinfo=UTC)  # before any timestamp: the first page's keyset position


@dataclass(frozen=True)
class ScanConfig:
    """The knobs of a scan (from ``Settings``: batch size, backoff, the global usage limit)."""

    batch: int = 500
    backoff_s: float = 300.0
    backoff_max_s: float = 21_600.0
    default_max_encryptions: int = 2**30

    def retry_at(self, failures: int, last_failed_at: datetime | None) -> datetime | None:
        """When a scope with ``failures`` consecutive failed runs may be tried again (None: now)."""
        if failures <= 0 or last_failed_at is None:
            return None
        return last_failed_at + retry_delay(failures, base_s=self.backoff_s, max_s=self.backoff_max_s)


@dataclass(frozen=True)
class DueRotation:
    """A scope whose DEK rotation is due."""

    scope_id: int
    scope: str
    from_version: int
    to_version: int
    reason: str  # "schedule" | "usage"
    due_at: datetime
    encryptions: int
    encryption_limit: int
    failures: int = 0
    skip: str | None = None  # "open_run" | "backoff": not opened this scan
    retry_at: datetime | None = None

    def as_dict(self) -> dict[str, Any]:
        return {
            "scope": self.scope,
            "from_version": self.from_version,
            "to_version": self.to_version,
            "reason": self.reason,
            "due_at": self.due_at.isoformat(),
            "encryptions": self.encryptions,
            "encryption_limit": self.encryption_limit,
            "failures": self.failures,
            "skip": self.skip,
            "retry_at": self.retry_at.isoformat() if self.retry_at else None,
        }


@dataclass(frozen=True)
class DueRetirement:
    """A DEK whose grace period is over."""

    scope_id: int
    scope: str
    version: int
    grace_until: datetime  # for a destruction: its destroy_after
    failures: int = 0
    skip: str | None = None  # "open_run" | "backoff" | "other_version"
    retry_at: datetime | None = None
    destroy: bool = False

    def as_dict(self) -> dict[str, Any]:
        return {
            "scope": self.scope,
            "version": self.version,
            ("destroy_after" if self.destroy else "grace_until"): self.grace_until.isoformat(),
            "destroy": self.destroy,
            "failures": self.failures,
            "skip": self.skip,
            "retry_at": self.retry_at.isoformat() if self.retry_at else None,
        }


@dataclass
class Batch:
    """One page of a scan: the runs it opened and the candidates it passed over."""

    opened: list[RunInfo] = field(default_factory=list)
    skipped: list[DueRotation | DueRetirement] = field(default_factory=list)
    candidates: int = 0


@dataclass
class ScanReport:
    """What one scan did."""

    now: datetime
    rotations: list[RunInfo] = field(default_factory=list)
    retirements: list[RunInfo] = field(default_factory=list)
    destructions: list[RunInfo] = field(default_factory=list)
    enqueued: list[str] = field(default_factory=list)
    skipped: dict[str, int] = field(default_factory=dict)
    candidates: int = 0
    batches: int = 0
    replica_job: str | None = None
    duration_s: float = 0.0

    def add(self, batch: Batch, kind: str) -> None:
        self.batches += 1
        self.candidates += batch.candidates
        {"dek": self.rotations, "retire": self.retirements, "destroy": self.destructions}[kind].extend(
            batch.opened
        )
        for item in batch.skipped:
            key = f"{kind}:{item.skip}"
            self.skipped[key] = self.skipped.get(key, 0) + 1

    def as_dict(self) -> dict[str, Any]:
        return {
            "now": self.now.isoformat(),
            "rotations": [
                {"scope": r.scope, "run_id": r.id, "from_version": r.from_version, **r.detail}
                for r in self.rotations
            ],
            "retirements": [
                {"scope": r.scope, "run_id": r.id, "version": r.from_version} for r in self.retirements
            ],
            "destructions": [
                {"scope": r.scope, "run_id": r.id, "version": r.from_version} for r in self.destructions
            ],
            "enqueued": self.enqueued,
            "skipped": self.skipped,
            "candidates": self.candidates,
            "batches": self.batches,
            "replica_job": self.replica_job,
            "duration_s": round(self.duration_s, 4),
        }


def due_rotation(row: Sequence[Any], now: datetime, cfg: ScanConfig) -> DueRotation:
    """The rotation a due-scope row (:data:`DUE_SCOPES_SQL`) stands for, and why a scan skips it."""
    sid, name, active, latest, due_at, encryptions, limit, has_open, failures, last_failed = row
    retry_at = cfg.retry_at(failures or 0, last_failed)
    skip = "open_run" if has_open else ("backoff" if retry_at is not None and retry_at > now else None)
    return DueRotation(
        scope_id=sid,
        scope=name,
        from_version=active,
        to_version=latest + 1,
        reason="usage" if encryptions >= limit else "schedule",
        due_at=due_at,
        encryptions=int(encryptions),
        encryption_limit=int(limit),
        failures=int(failures or 0),
        skip=skip,
        retry_at=retry_at if skip == "backoff" else None,
    )


def _retirement(row: Sequence[Any], now: datetime, cfg: ScanConfig, *, destroy: bool) -> DueRetirement:
    _id, sid, name, version, grace_until, has_open, failures, last_failed = row
    retry_at = cfg.retry_at(failures or 0, last_failed)
    skip = "open_run" if has_open else ("backoff" if retry_at is not None and retry_at > now else None)
    return DueRetirement(
        scope_id=sid,
        scope=name,
        version=version,
        grace_until=grace_until,
        failures=int(failures or 0),
        skip=skip,
        retry_at=retry_at if skip == "backoff" else None,
        destroy=destroy,
    )


def due_retirements(
    rows: Iterable[Sequence[Any]], now: datetime, cfg: ScanConfig, *, destroy: bool, seen: set[int]
) -> list[DueRetirement]:
    """The retirements a page of due-key rows (:data:`DUE_GRACE_SQL`) stands for, oldest version
    of a scope first. One retirement a scope at a time: a version of a scope in ``seen`` (or
    earlier in the page) is skipped as ``other_version``, for a later scan; ``seen`` gains the
    scopes of those not skipped."""
    out = []
    for row in sorted(rows, key=lambda r: (r[1], r[3])):
        due = _retirement(row, now, cfg, destroy=destroy)
        if due.skip is None and due.scope_id in seen:
            due = replace(due, skip="other_version", retry_at=None)
        if due.skip is None:
            seen.add(due.scope_id)
        out.append(due)
    return out


def next_page(rows: Sequence[Sequence[Any]], batch: int) -> tuple[datetime, int] | None:
    """The keyset position after a full page of due rows; None after the last page."""
    if len(rows) < batch:
        return None
    return (rows[-1][4], rows[-1][0])


def _rotation_detail(due: DueRotation) -> dict[str, Any]:
    return {"due_version": due.to_version, "reason": due.reason, "due_at": due.due_at.isoformat()}


def _retirement_detail(due: DueRetirement) -> dict[str, Any]:
    if due.destroy:
        return {"destroy": True, "destroy_after": due.grace_until.isoformat()}
    return {"force_now": False, "grace_until": due.grace_until.isoformat()}


async def _open(
    session: AsyncSession, kind: str, batch: Batch, due: Sequence[DueRotation | DueRetirement]
) -> None:
    todo: list[tuple[int, str, int, dict[str, Any]]] = []
    for item in due:
        if item.skip:
            batch.skipped.append(item)
        elif isinstance(item, DueRotation):
            todo.append((item.scope_id, item.scope, item.from_version, _rotation_detail(item)))
        else:
            todo.append((item.scope_id, item.scope, item.version, _retirement_detail(item)))
    batch.opened = await insert_runs(session, kind, TRIGGER, todo)


async def open_due_rotations(
    sessions: async_sessionmaker[AsyncSession], now: datetime, cfg: ScanConfig
) -> AsyncIterator[Batch]:
    """Open a ``dek`` run for every scope due at ``now``; yields each committed page.

    The caller enqueues each page's runs as it comes (a crash in between leaves pending runs,
    which the workers adopt; the next scan skips them).

    Raises:
        StoreUnavailable: the database is unavailable.
    """
    after: tuple[datetime, int] | None = (START, 0)
    while after is not None:
        batch = Batch()
        async with db.transaction(sessions) as session:
            rows = await store.due_scopes(
                session, now, after, batch=cfg.batch, default_max=cfg.default_max_encryptions, lock=True
            )
            batch.candidates = len(rows)
            await _open(session, "dek", batch, [due_rotation(row, now, cfg) for row in rows])
        yield batch
        after = next_page(rows, cfg.batch)


async def open_due_retirements(
    sessions: async_sessionmaker[AsyncSession], now: datetime, cfg: ScanConfig
) -> AsyncIterator[Batch]:
    """Open a ``retire`` run for every DEK whose grace period ended by ``now``; yields each page.

    At most one retirement a scope is open at a time (the oldest version goes first; the next
    one is opened by a later scan, after that run ends).

    Raises:
        StoreUnavailable: the database is unavailable.
    """
    async for batch in _open_due_keys(sessions, now, cfg, destroy=False):
        yield batch


async def open_due_destructions(
    sessions: async_sessionmaker[AsyncSession], now: datetime, cfg: ScanConfig
) -> AsyncIterator[Batch]:
    """Open a destruction run (kind ``retire``, ``destroy`` in its detail) for every retired DEK
    whose ``destroy_after`` passed by ``now``; yields each page. Shares the one-open-retirement-
    a-scope rule and the backoff of failed retirements.

    Raises:
        StoreUnavailable: the database is unavailable.
    """
    async for batch in _open_due_keys(sessions, now, cfg, destroy=True):
        yield batch


async def _open_due_keys(
    sessions: async_sessionmaker[AsyncSession], now: datetime, cfg: ScanConfig, *, destroy: bool
) -> AsyncIterator[Batch]:
    after: tuple[datetime, int] | None = (START, 0)
    seen: set[int] = set()
    while after is not None:
        batch = Batch()
        async with db.transaction(sessions) as session:
            rows = await store.due_keys(session, now, after, batch=cfg.batch, destroy=destroy, lock=True)
            batch.candidates = len(rows)
            due = due_retirements(rows, now, cfg, destroy=destroy, seen=seen)
            await _open(session, "retire", batch, due)
        yield batch
        after = next_page(rows, cfg.batch)
