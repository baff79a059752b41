"""Dry runs: what a scan, or rotating one scope, would do, and how long it would take.

The same questions as :mod:`keyrotor.schedule.scan`, asked in one read-only transaction: nothing
is locked or written. Durations are estimated from rows per DEK version and a rate measured on
completed rotations.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from keyrotor.errors import ScopeNotFound
from keyrotor.inputs import check_scope
from keyrotor.schedule.rules import KeyState
from keyrotor.schedule.scan import (
    START,
    DueRetirement,
    DueRotation,
    ScanConfig,
    due_retirements,
    due_rotation,
    next_page,
)
from keyrotor.store import db
from keyrotor.store import schedule as store
from keyrotor.store.runs import RunInfo, find_open_run, median_rotation_rate
from keyrotor.store.targets import SECRETS, Target, count_version, default_targets, raw_connection

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
    runs, rate = await median_rotation_rate(
        session,
        recent=RECENT_RUNS,
        min_rows=MIN_MEASURED_ROWS,
        min_s=MIN_MEASURED_SECONDS,
        runs=MEASURED_RUNS,
    )
    if runs and rate:
        return Rate(rate, "measured", runs)
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


async def rows_by_version(
    session: AsyncSession, scopes: Mapping[int, str], managed: Sequence[Target]
) -> dict[int, dict[int, int]]:
    """Rows per DEK version of each scope (``{scope id: name}``), over keyrotor's ``secrets``, the
    targets registered in code and ``managed``, the targets of the application columns registered
    with ``keyrotor columns register`` (:func:`keyrotor.census.columns.load_targets`): what a
    rotation of the scope would re-encrypt."""
    out: dict[int, dict[int, int]] = {sid: {} for sid in scopes}
    if not scopes:
        return out
    # Every decryptable version of each scope: pending, active, grace.
    decrypting = [s.value for s in KeyState if s.decrypts]
    for sid, version in await store.versions_in_states(session, list(scopes), decrypting):
        out[sid][version] = 0
    for sid, version, n in await store.secrets_by_version(session, list(scopes)):
        out[sid][version] = out[sid].get(version, 0) + n
    # The same targets a rotation reads (keyrotor.census.columns.refresh_targets): a managed
    # column is skipped where a target given in code has its name.
    in_code = [t for t in default_targets() if t is not SECRETS]
    names = {t.name for t in in_code}
    apg = await raw_connection(session)
    for target in in_code + [t for t in managed if t.name not in names]:
        for sid, versions_of in out.items():
            # A fixed-scope target's statements do not filter by scope: count it only for its own.
            if not target.covers(scopes[sid]):
                continue
            for version in list(versions_of):
                versions_of[version] += await count_version(apg, target, sid, version)
    return out


async def plan_scan(
    sessions: async_sessionmaker[AsyncSession],
    now: datetime,
    cfg: ScanConfig,
    *,
    rows_per_second: float,
    managed: Sequence[Target],
) -> ScanPlan:
    """What a scan at ``now`` would open: the due rotations (with rows per version, counted over
    ``secrets``, the targets given in code and ``managed`` (:func:`rows_by_version`), and an
    estimated duration at the rate measured on completed rotations, else ``rows_per_second``)
    and retirements. Locks and writes nothing."""
    async with db.transaction(sessions) as session:
        plan = ScanPlan(now, await measured_rate(session, configured=rows_per_second))
        await _plan_rotations(session, plan, cfg, managed)
        await _plan_retirements(session, plan, cfg)
    return plan


async def _plan_rotations(
    session: AsyncSession, plan: ScanPlan, cfg: ScanConfig, managed: Sequence[Target]
) -> None:
    due: list[DueRotation] = []
    after: tuple[datetime, int] | None = (START, 0)
    while after is not None:
        rows = await store.due_scopes(
            session, plan.now, after, batch=cfg.batch, default_max=cfg.default_max_encryptions, lock=False
        )
        for row in rows:
            item = due_rotation(row, plan.now, cfg)
            (plan.skipped if item.skip else due).append(item)
        after = next_page(rows, cfg.batch)
    counts = await rows_by_version(session, {d.scope_id: d.scope for d in due}, managed)
    for d in due:
        per_version = counts.get(d.scope_id, {})
        per_version.pop(d.to_version, None)  # a pending DEK left by a failed run: nothing on it to move
        plan.rotations.append(
            RotationPlan(d.scope, d.from_version, d.to_version, per_version, plan.rate, due=d)
        )


async def _plan_retirements(session: AsyncSession, plan: ScanPlan, cfg: ScanConfig) -> None:
    seen: set[int] = set()
    for destroy in (False, True):
        after: tuple[datetime, int] | None = (START, 0)
        while after is not None:
            rows = await store.due_keys(
                session, plan.now, after, batch=cfg.batch, destroy=destroy, lock=False
            )
            for ret in due_retirements(rows, plan.now, cfg, destroy=destroy, seen=seen):
                (plan.skipped if ret.skip else plan.retirements).append(ret)
            after = next_page(rows, cfg.batch)


async def plan_rotation(
    sessions: async_sessionmaker[AsyncSession],
    scope: str,
    *,
    now: datetime,
    cfg: ScanConfig,
    rows_per_second: float,
    managed: Sequence[Target],
) -> RotationPlan:
    """What rotating ``scope`` now would do (``keyrotor rotate SCOPE --dry-run``): its rows per
    version over ``secrets``, the targets given in code and ``managed`` (the registered columns'
    targets), estimated at the rate measured on completed rotations, else ``rows_per_second``.
    Writes nothing.

    Raises:
        ScopeNotFound: no such scope.
    """
    check_scope(scope)
    async with db.transaction(sessions) as session:
        row = await store.rotation_facts(session, scope, default_max=cfg.default_max_encryptions)
        if row is None:
            raise ScopeNotFound(f"scope {scope!r} does not exist")
        sid, active, latest, enabled, next_at, encryptions, limit, pending = row
        run = await find_open_run(session, "dek", sid)
        per_version = (await rows_by_version(session, {sid: scope}, managed))[sid]
        rate = await measured_rate(session, configured=rows_per_second)
    to_version = int(run.to_version) if run and run.to_version else (pending or latest + 1)
    per_version.pop(to_version, None)
    due = None
    if enabled and next_at is not None and (next_at <= now or encryptions >= limit):
        reason = "usage" if encryptions >= limit else "schedule"
        due = DueRotation(sid, scope, active, to_version, reason, next_at, int(encryptions), int(limit))
    return RotationPlan(scope, active, to_version, per_version, rate, due=due, open_run=_open_run(run))


def _open_run(run: RunInfo | None) -> dict[str, Any] | None:
    if run is None:
        return None
    return {
        "id": run.id,
        "state": run.state,
        "to_version": run.to_version,
        "rows_done": run.rows_done,
        "rows_total": run.rows_total,
        "trigger": run.trigger,
    }
