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
``ix_key_scopes_due`` (keyset pagination, ``batch`` rows a transaction), so a scan reads only
due rows, never the whole table. Nothing here touches a key or a ciphertext.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from keyrotor.errors import ScopeNotFound
from keyrotor.runs import RunInfo
from keyrotor.schedule.rules import KeyState, check_scope, retry_delay
from keyrotor.store import db

TRIGGER = "schedule"
_START = datetime(1, 1, 1, tzinfo=UTC)  # before any timestamp: the first page's keyset position


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


# Consecutive failures of a scope's runs of one kind: failed runs since its last completed one.
_FAILURES = (
    "LEFT JOIN LATERAL (SELECT count(*) AS failures, max(r.finished_at) AS last_failed_at "
    "FROM rotations r WHERE r.scope_id = {sid} AND r.kind = '{kind}' AND r.state = 'failed' "
    "AND r.id > coalesce((SELECT max(c.id) FROM rotations c "
    "WHERE c.scope_id = {sid} AND c.kind = '{kind}' AND c.state = 'completed'), 0)) f ON true"
)
# Spelled like uq_rotations_one_open so that the check is a lookup in that partial index.
_HAS_OPEN = (
    "EXISTS (SELECT 1 FROM rotations o WHERE o.kind = '{kind}' AND coalesce(o.scope_id, 0) = {sid} "
    "AND o.state IN ('pending', 'running'))"
)

DUE_SCOPES_SQL = (
    "SELECT s.id, s.name, s.active_version, s.latest_version, s.next_rotation_at, "
    "coalesce(d.encryptions, 0), coalesce(s.max_encryptions, :default_max), "
    f"{_HAS_OPEN.format(kind='dek', sid='s.id')}, f.failures, f.last_failed_at "
    "FROM key_scopes s "
    "LEFT JOIN data_keys d ON d.scope_id = s.id AND d.version = s.active_version "
    f"{_FAILURES.format(kind='dek', sid='s.id')} "
    "WHERE s.rotation_enabled AND s.next_rotation_at IS NOT NULL AND s.next_rotation_at <= :now "
    "AND (s.next_rotation_at, s.id) > (:after_at, :after_id) "
    "ORDER BY s.next_rotation_at, s.id LIMIT :batch"
)
DUE_GRACE_SQL = (
    "SELECT d.id, d.scope_id, s.name, d.version, d.grace_until, "
    f"{_HAS_OPEN.format(kind='retire', sid='d.scope_id')}, f.failures, f.last_failed_at "
    "FROM data_keys d JOIN key_scopes s ON s.id = d.scope_id "
    f"{_FAILURES.format(kind='retire', sid='d.scope_id')} "
    "WHERE d.state = 'grace' AND d.grace_until <= :now AND (d.grace_until, d.id) > (:after_at, :after_id) "
    "ORDER BY d.grace_until, d.id LIMIT :batch"
)
# Retired DEKs whose destruction window has passed (a use since retired_at is the job's to find:
# it cancels the window in the same transaction that would erase the key).
DUE_DESTROY_SQL = (
    "SELECT d.id, d.scope_id, s.name, d.version, d.destroy_after, "
    f"{_HAS_OPEN.format(kind='retire', sid='d.scope_id')}, f.failures, f.last_failed_at "
    "FROM data_keys d JOIN key_scopes s ON s.id = d.scope_id "
    f"{_FAILURES.format(kind='retire', sid='d.scope_id')} "
    "WHERE d.state = 'retired' AND d.destroy_after <= :now "
    "AND (d.destroy_after, d.id) > (:after_at, :after_id) "
    "ORDER BY d.destroy_after, d.id LIMIT :batch"
)
_LOCK_SCOPES = " FOR UPDATE OF s SKIP LOCKED"
_LOCK_KEYS = " FOR UPDATE OF d SKIP LOCKED"

_RETURNING = (
    "RETURNING id, kind, scope_id, state, from_version, to_version, cursor, rows_done, rows_total, "
    "attempts, error, trigger, job_id, detail, created_at, started_at, finished_at, updated_at"
)
# The same insert as keyrotor.runs.open_run, many rows at once; a conflicting open run (opened
# meanwhile by a client or another scan) makes that row a no-op.
_OPEN_RUNS_SQL = (
    "INSERT INTO rotations (kind, scope_id, from_version, trigger, detail) "
    "SELECT :kind, u.sid, u.fv, :trigger, CAST(u.detail AS jsonb) "
    "FROM unnest(CAST(:sids AS bigint[]), CAST(:fvs AS int[]), CAST(:details AS text[])) "
    "AS u(sid, fv, detail) "
    "ON CONFLICT (kind, (coalesce(scope_id, 0))) WHERE state IN ('pending', 'running') DO NOTHING "
    + _RETURNING
)


def _run_info(row: Sequence[Any], scope: str) -> RunInfo:
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


def _rotation(row: Sequence[Any], now: datetime, cfg: ScanConfig) -> DueRotation:
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


def _retirement(
    row: Sequence[Any], now: datetime, cfg: ScanConfig, *, destroy: bool = False
) -> DueRetirement:
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


def _other_version(due: DueRetirement) -> DueRetirement:
    # One retirement a scope at a time: a later scan takes the next version.
    return DueRetirement(
        due.scope_id,
        due.scope,
        due.version,
        due.grace_until,
        due.failures,
        "other_version",
        destroy=due.destroy,
    )


async def _open_runs(
    session: AsyncSession, kind: str, items: Sequence[tuple[int, str, int, dict[str, Any]]]
) -> list[RunInfo]:
    """Insert pending runs ``(scope_id, scope, from_version, detail)``; returns those inserted."""
    if not items:
        return []
    names = {sid: name for sid, name, _, _ in items}
    rows = (
        await session.execute(
            text(_OPEN_RUNS_SQL),
            {
                "kind": kind,
                "trigger": TRIGGER,
                "sids": [i[0] for i in items],
                "fvs": [i[2] for i in items],
                "details": [json.dumps(i[3]) for i in items],
            },
        )
    ).all()
    return sorted((_run_info(r, names[r[2]]) for r in rows), key=lambda r: r.id)


async def open_due_rotations(
    sessions: async_sessionmaker[AsyncSession], now: datetime, cfg: ScanConfig
) -> AsyncIterator[Batch]:
    """Open a ``dek`` run for every scope due at ``now``; yields each committed page.

    The caller enqueues each page's runs as it comes (a crash in between leaves pending runs,
    which the workers adopt; the next scan skips them).

    Raises:
        StoreUnavailable: the database is unavailable.
    """
    after: tuple[datetime, int] = (_START, 0)
    while True:
        batch = Batch()
        async with db.transaction(sessions) as session:
            rows = (
                await session.execute(
                    text(DUE_SCOPES_SQL + _LOCK_SCOPES),
                    {
                        "now": now,
                        "after_at": after[0],
                        "after_id": after[1],
                        "batch": cfg.batch,
                        "default_max": cfg.default_max_encryptions,
                    },
                )
            ).all()
            batch.candidates = len(rows)
            todo: list[tuple[int, str, int, dict[str, Any]]] = []
            for row in rows:
                due = _rotation(row, now, cfg)
                if due.skip:
                    batch.skipped.append(due)
                    continue
                detail = {
                    "due_version": due.to_version,
                    "reason": due.reason,
                    "due_at": due.due_at.isoformat(),
                }
                todo.append((due.scope_id, due.scope, due.from_version, detail))
            batch.opened = await _open_runs(session, "dek", todo)
        yield batch
        if len(rows) < cfg.batch:
            return
        after = (rows[-1][4], rows[-1][0])


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
    after: tuple[datetime, int] = (_START, 0)
    seen: set[int] = set()
    while True:
        batch = Batch()
        async with db.transaction(sessions) as session:
            rows = (
                await session.execute(
                    text((DUE_DESTROY_SQL if destroy else DUE_GRACE_SQL) + _LOCK_KEYS),
                    {"now": now, "after_at": after[0], "after_id": after[1], "batch": cfg.batch},
                )
            ).all()
            batch.candidates = len(rows)
            todo: list[tuple[int, str, int, dict[str, Any]]] = []
            for row in sorted(rows, key=lambda r: (r[1], r[3])):  # oldest version of a scope first
                due = _retirement(row, now, cfg, destroy=destroy)
                if due.skip is None and due.scope_id in seen:
                    due = _other_version(due)
                if due.skip:
                    batch.skipped.append(due)
                    continue
                seen.add(due.scope_id)
                detail: dict[str, Any] = {"force_now": False, "grace_until": due.grace_until.isoformat()}
                if destroy:
                    detail = {"destroy": True, "destroy_after": due.grace_until.isoformat()}
                todo.append((due.scope_id, due.scope, due.version, detail))
            batch.opened = await _open_runs(session, "retire", todo)
        yield batch
        if len(rows) < cfg.batch:
            return
        after = (rows[-1][4], rows[-1][0])


async def last_retire_errors(session: AsyncSession, scope_ids: Sequence[int]) -> dict[int, str]:
    """The error of each scope's latest failed retirement run (what it backs off from)."""
    rows = await session.execute(
        text(
            "SELECT DISTINCT ON (scope_id) scope_id, error FROM rotations "
            "WHERE kind = 'retire' AND state = 'failed' AND scope_id = ANY(:ids) ORDER BY scope_id, id DESC"
        ),
        {"ids": list(scope_ids)},
    )
    return {sid: str(err) for sid, err in rows.all() if err}


# --- dry runs: the same questions, nothing locked or written --------------------------------

# The rate a dry run estimates with comes from the latest completed rotations that moved enough
# rows, for long enough, to measure: rows_done / (finished_at - started_at), wall clock, however
# many workers shared the run. Smaller runs measure their fixed costs, not re-encryption. Only the
# latest RECENT_RUNS runs of any kind are looked at, so the lookup costs the same however long the
# history (rotations has no index that would find large completed runs directly).
MEASURED_RUNS = 20
MIN_MEASURED_ROWS = 1_000
MIN_MEASURED_SECONDS = 1.0
RECENT_RUNS = 5_000
# The median of the runs' rates, so that one run that sat out an outage between its attempts
# (started_at is its first start) does not drag the estimate down.
_MEASURED_RATE_SQL = (
    "SELECT count(*), percentile_cont(0.5) WITHIN GROUP (ORDER BY CAST(rows_done AS float8) "
    "/ CAST(extract(epoch FROM finished_at - started_at) AS float8)) FROM ("
    "SELECT rows_done, started_at, finished_at FROM ("
    "SELECT id, kind, state, rows_done, started_at, finished_at FROM rotations ORDER BY id DESC LIMIT :recent"
    ") AS recent WHERE kind = 'dek' AND state = 'completed' AND rows_done >= :min_rows "
    "AND finished_at - started_at >= make_interval(secs => :min_s) "
    "ORDER BY id DESC LIMIT :n) AS latest"
)


@dataclass(frozen=True)
class Rate:
    """Rows re-encrypted a second, and where the figure comes from."""

    rows_per_second: float
    source: str  # "measured": from completed rotations; "configured": KEYROTOR_ESTIMATE_ROWS_PER_SECOND
    runs: int = 0  # completed rotations measured

    def seconds(self, rows: int) -> float:
        return rows / self.rows_per_second

    def as_dict(self) -> dict[str, Any]:
        return {
            "rows_per_second": round(self.rows_per_second, 1),
            "rate_source": self.source,
            "rate_runs": self.runs,
        }


async def measured_rate(session: AsyncSession, *, configured: float) -> Rate:
    """The median re-encryption rate of the latest completed rotations (up to ``MEASURED_RUNS`` of at
    least ``MIN_MEASURED_ROWS`` rows and ``MIN_MEASURED_SECONDS``, among the latest
    ``RECENT_RUNS`` runs), else ``configured``."""
    runs, rate = (
        await session.execute(
            text(_MEASURED_RATE_SQL),
            {
                "recent": RECENT_RUNS,
                "min_rows": MIN_MEASURED_ROWS,
                "min_s": MIN_MEASURED_SECONDS,
                "n": MEASURED_RUNS,
            },
        )
    ).one()
    if runs and rate:
        return Rate(float(rate), "measured", int(runs))
    return Rate(configured, "configured")


@dataclass(frozen=True)
class RotationPlan:
    """What rotating one scope would do."""

    scope: str
    from_version: int
    to_version: int
    rows_by_version: dict[int, int]
    rate: Rate
    due: DueRotation | None = None
    open_run: dict[str, Any] | None = None

    @property
    def rows_total(self) -> int:
        return sum(self.rows_by_version.values())

    @property
    def estimate_s(self) -> float:
        """Seconds to re-encrypt the rows at ``rate``."""
        return self.rate.seconds(self.rows_total)

    def as_dict(self) -> dict[str, Any]:
        return {
            "scope": self.scope,
            "from_version": self.from_version,
            "to_version": self.to_version,
            "rows_by_version": {str(v): n for v, n in sorted(self.rows_by_version.items())},
            "rows_total": self.rows_total,
            "estimated_seconds": round(self.estimate_s, 3),
            **self.rate.as_dict(),
            "due": self.due.as_dict() if self.due else None,
            "open_run": self.open_run,
        }


@dataclass
class ScanPlan:
    """What a scan at ``now`` would open (and what it would pass over, and why)."""

    now: datetime
    rate: Rate
    rotations: list[RotationPlan] = field(default_factory=list)
    retirements: list[DueRetirement] = field(default_factory=list)
    skipped: list[DueRotation | DueRetirement] = field(default_factory=list)

    def as_dict(self) -> dict[str, Any]:
        rows = sum(p.rows_total for p in self.rotations)
        return {
            "now": self.now.isoformat(),
            "dry_run": True,
            "rotations": [p.as_dict() for p in self.rotations],
            "retirements": [r.as_dict() for r in self.retirements],
            "skipped": [s.as_dict() | {"kind": _kind(s)} for s in self.skipped],
            "rows_total": rows,
            **self.rate.as_dict(),
            "estimated_seconds": round(self.rate.seconds(rows), 3),
        }


def _kind(item: DueRotation | DueRetirement) -> str:
    return "rotation" if isinstance(item, DueRotation) else "retirement"


async def rows_by_version(session: AsyncSession, scope_ids: Sequence[int]) -> dict[int, dict[int, int]]:
    """Rows per DEK version of each scope, over keyrotor's ``secrets`` and the registered targets."""
    from keyrotor.store.targets import SECRETS, default_targets, raw_connection

    out: dict[int, dict[int, int]] = {sid: {} for sid in scope_ids}
    if not scope_ids:
        return out
    # Every decryptable version of each scope: pending, active, grace.
    versions = (
        await session.execute(
            text(
                "SELECT scope_id, version FROM data_keys WHERE scope_id = ANY(CAST(:ids AS bigint[])) "
                "AND state = ANY(CAST(:states AS text[]))"
            ),
            {"ids": list(scope_ids), "states": [s.value for s in KeyState if s.decrypts]},
        )
    ).all()
    for sid, version in versions:
        out[sid][version] = 0
    counts = (
        await session.execute(
            text(
                "SELECT scope_id, dek_version, count(*) FROM secrets "
                "WHERE scope_id = ANY(CAST(:ids AS bigint[])) "
                "GROUP BY scope_id, dek_version"
            ),
            {"ids": list(scope_ids)},
        )
    ).all()
    for sid, version, n in counts:
        out[sid][version] = out[sid].get(version, 0) + int(n)
    others = [t for t in default_targets() if t is not SECRETS and t.scope_id_column is not None]
    if others:
        apg = await raw_connection(session)
        for target in others:
            for sid, versions_of in out.items():
                for version in list(versions_of):
                    n = int(await apg.fetchval(target.sql.count_version, sid, version))
                    versions_of[version] += n
    return out


async def plan_scan(
    sessions: async_sessionmaker[AsyncSession], now: datetime, cfg: ScanConfig, *, rows_per_second: float
) -> ScanPlan:
    """What a scan at ``now`` would open: the due rotations (with rows per version and an
    estimated duration at the rate measured on completed rotations, else ``rows_per_second``)
    and retirements. Locks and writes nothing."""
    due: list[DueRotation] = []
    async with db.transaction(sessions) as session:
        plan = ScanPlan(now, await measured_rate(session, configured=rows_per_second))
        after: tuple[datetime, int] = (_START, 0)
        while True:
            rows = (
                await session.execute(
                    text(DUE_SCOPES_SQL),
                    {
                        "now": now,
                        "after_at": after[0],
                        "after_id": after[1],
                        "batch": cfg.batch,
                        "default_max": cfg.default_max_encryptions,
                    },
                )
            ).all()
            for row in rows:
                item = _rotation(row, now, cfg)
                (plan.skipped if item.skip else due).append(item)
            if len(rows) < cfg.batch:
                break
            after = (rows[-1][4], rows[-1][0])
        counts = await rows_by_version(session, [d.scope_id for d in due])
        for d in due:
            per_version = counts.get(d.scope_id, {})
            per_version.pop(d.to_version, None)  # a pending DEK left by a failed run: nothing on it to move
            plan.rotations.append(
                RotationPlan(d.scope, d.from_version, d.to_version, per_version, plan.rate, due=d)
            )
        seen: set[int] = set()
        for destroy, sql in ((False, DUE_GRACE_SQL), (True, DUE_DESTROY_SQL)):
            after = (_START, 0)
            while True:
                rows = (
                    await session.execute(
                        text(sql),
                        {"now": now, "after_at": after[0], "after_id": after[1], "batch": cfg.batch},
                    )
                ).all()
                for row in sorted(rows, key=lambda r: (r[1], r[3])):
                    ret = _retirement(row, now, cfg, destroy=destroy)
                    if ret.skip is None and ret.scope_id in seen:
                        ret = _other_version(ret)
                    if ret.skip is None:
                        seen.add(ret.scope_id)
                    (plan.skipped if ret.skip else plan.retirements).append(ret)
                if len(rows) < cfg.batch:
                    break
                after = (rows[-1][4], rows[-1][0])
    return plan


async def plan_rotation(
    sessions: async_sessionmaker[AsyncSession],
    scope: str,
    *,
    now: datetime,
    cfg: ScanConfig,
    rows_per_second: float,
) -> RotationPlan:
    """What rotating ``scope`` now would do (``keyrotor rotate SCOPE --dry-run``), estimated at the
    rate measured on completed rotations, else ``rows_per_second``. Writes nothing.

    Raises:
        ScopeNotFound: no such scope.
    """
    check_scope(scope)
    async with db.transaction(sessions) as session:
        row = (
            await session.execute(
                text(
                    "SELECT s.id, s.active_version, s.latest_version, s.rotation_enabled, "
                    "s.next_rotation_at, "
                    "coalesce(d.encryptions, 0), coalesce(s.max_encryptions, :default_max), "
                    "(SELECT version FROM data_keys p WHERE p.scope_id = s.id AND p.state = 'pending' "
                    "ORDER BY version DESC LIMIT 1) "
                    "FROM key_scopes s "
                    "LEFT JOIN data_keys d ON d.scope_id = s.id AND d.version = s.active_version "
                    "WHERE s.name = :name"
                ),
                {"name": scope, "default_max": cfg.default_max_encryptions},
            )
        ).first()
        if row is None:
            raise ScopeNotFound(f"scope {scope!r} does not exist")
        sid, active, latest, enabled, next_at, encryptions, limit, pending = row
        open_row = (
            await session.execute(
                text(
                    "SELECT id, state, to_version, rows_done, rows_total, trigger FROM rotations "
                    "WHERE kind = 'dek' AND coalesce(scope_id, 0) = :sid AND state IN ('pending', 'running')"
                ),
                {"sid": sid},
            )
        ).first()
        per_version = (await rows_by_version(session, [sid]))[sid]
        rate = await measured_rate(session, configured=rows_per_second)
    to_version = int(open_row[2]) if open_row and open_row[2] else (pending or latest + 1)
    per_version.pop(to_version, None)
    due = None
    if enabled and next_at is not None and (next_at <= now or encryptions >= limit):
        due = DueRotation(
            sid,
            scope,
            active,
            to_version,
            "usage" if encryptions >= limit else "schedule",
            next_at,
            int(encryptions),
            int(limit),
        )
    open_run = (
        {
            "id": open_row[0],
            "state": open_row[1],
            "to_version": open_row[2],
            "rows_done": open_row[3],
            "rows_total": open_row[4],
            "trigger": open_row[5],
        }
        if open_row
        else None
    )
    return RotationPlan(scope, active, to_version, per_version, rate, due=due, open_run=open_run)
