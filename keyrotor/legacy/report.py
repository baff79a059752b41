"""What a legacy migration reports: per source, values migrated, already migrated, changed
meanwhile and failed (by row id and reason, never a value), kept in the run's ``detail`` so a
resumed run, or a fanned-out one's ranges, report the whole run.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from sqlalchemy.ext.asyncio import AsyncSession

from keyrotor.runs import RunInfo
from keyrotor.store import legacy as store
from keyrotor.store.key_ranges import Key
from keyrotor.store.legacy import SealedBatch

MAX_LISTED = 1_000  # failures (and warnings) kept by id in the run's detail
# The run's detail.mode when keyrotor.legacy.ranges fanned it out across workers.
MODE = "ranges"
# In a failure's reason: the value did not authenticate under the legacy master key.
AUTH_FAILED = "failed authentication"


@dataclass
class ColumnReport:
    """What a migration did to one source."""

    column: str
    legacy_found: int = 0
    migrated: int = 0
    already_migrated: int = 0
    changed: list[Key] = field(default_factory=list)  # changed or deleted meanwhile: left alone
    failed: list[dict[str, Any]] = field(default_factory=list)  # {"id", "reason"}
    warnings: list[dict[str, Any]] = field(default_factory=list)  # {"id", "warning"}
    failed_count: int = 0

    def as_dict(self) -> dict[str, Any]:
        """The JSON form kept in the run's detail (lists cut at ``MAX_LISTED``)."""
        return {
            "column": self.column,
            "legacy_found": self.legacy_found,
            "migrated": self.migrated,
            "already_migrated": self.already_migrated,
            "changed": self.changed[:MAX_LISTED],
            "failed_count": self.failed_count,
            "failed": self.failed[:MAX_LISTED],
            "warnings": self.warnings[:MAX_LISTED],
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ColumnReport:
        """The report :meth:`as_dict` gave."""
        return cls(
            column=d["column"],
            legacy_found=d.get("legacy_found", 0),
            migrated=d.get("migrated", 0),
            already_migrated=d.get("already_migrated", 0),
            changed=list(d.get("changed", [])),
            failed=list(d.get("failed", [])),
            warnings=list(d.get("warnings", [])),
            failed_count=d.get("failed_count", 0),
        )


@dataclass
class LegacyReport:
    """The outcome of a migration (or a dry run): counts and row ids, never values."""

    dry_run: bool
    columns: dict[str, ColumnReport] = field(default_factory=dict)
    run_id: int | None = None
    state: str = "completed"

    @property
    def migrated(self) -> int:
        """Values migrated, every source."""
        return sum(c.migrated for c in self.columns.values())

    @property
    def failed(self) -> int:
        """Values that failed, every source."""
        return sum(c.failed_count for c in self.columns.values())

    def column(self, name: str) -> ColumnReport:
        """The report of source ``name`` (created empty if new)."""
        return self.columns.setdefault(name, ColumnReport(name))

    def as_dict(self) -> dict[str, Any]:
        """The JSON form (``keyrotor legacy migrate --json``, the job's result)."""
        return {
            "run_id": self.run_id,
            "dry_run": self.dry_run,
            "state": self.state,
            "migrated": self.migrated,
            "already_migrated": sum(c.already_migrated for c in self.columns.values()),
            "changed": sum(len(c.changed) for c in self.columns.values()),
            "failed": self.failed,
            "columns": [c.as_dict() for c in self.columns.values()],
        }


def report_after(rep: ColumnReport, sealed: SealedBatch, written: set[Key]) -> dict[str, Any]:
    """``rep`` as it will stand once the batch's write commits."""
    after = rep.as_dict()
    after["migrated"] = rep.migrated + len(written)
    after["changed"] = (rep.changed + [i for i in sealed.ids if i not in written])[:MAX_LISTED]
    return after


def report_of(run: RunInfo) -> LegacyReport:
    """The report a (finished or running) legacy run has recorded so far."""
    report = LegacyReport(dry_run=False, run_id=run.id, state=run.state)
    if run.detail.get("mode") == MODE and run.state != "completed":  # completed: merged already
        columns = merged_columns(run.detail)
    else:
        columns = [ColumnReport.from_dict(d) for d in run.detail.get("columns", [])]
    for c in columns:
        report.columns[c.column] = c
    return report


def merged_columns(detail: dict[str, Any]) -> list[ColumnReport]:
    """A fanned-out run's report per source: counts found at the start plus every range's part."""
    merged = {d["column"]: ColumnReport.from_dict(d) for d in detail.get("columns", [])}
    for key, part in sorted(detail.get("range_reports", {}).items()):
        rep = ColumnReport.from_dict(part)
        into = merged.setdefault(rep.column, ColumnReport(rep.column))
        if key.startswith(f"{rep.column}:"):
            into.migrated += rep.migrated
            into.failed_count += rep.failed_count
            into.changed = (into.changed + rep.changed)[:MAX_LISTED]
            into.failed = (into.failed + rep.failed)[:MAX_LISTED]
            into.warnings = (into.warnings + rep.warnings)[:MAX_LISTED]
    return list(merged.values())


def failed_authentication(detail: dict[str, Any]) -> set[tuple[str, Key]]:
    """``(source, row id)`` of every value a run's report lists as failing authentication."""
    if detail.get("mode") == MODE:
        columns = merged_columns(detail)
    else:
        columns = [ColumnReport.from_dict(d) for d in detail.get("columns", [])]
    return {(c.column, f["id"]) for c in columns for f in c.failed if AUTH_FAILED in f["reason"]}


async def known_failures(session: AsyncSession, before: int | None) -> set[tuple[str, Key]]:
    """The values the latest run that migrated values (before run ``before``) failed to
    authenticate: not the old backend's, whatever the key (:func:`~keyrotor.legacy.batch.check_wrong_key`)."""
    detail = await store.last_proven_run_detail(session, before)
    return set() if detail is None else failed_authentication(detail)
