"""Grading a region's DEK copies against the primary's DEKs, and the reports of a check.

Both the check (:mod:`keyrotor.replication.check`) and promotion
(:mod:`keyrotor.replication.promotion`) grade a region the same way; the grades are described
in the docstring of :mod:`keyrotor.replication.check`.
"""

from __future__ import annotations

import hmac
from collections import Counter
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from keyrotor.errors import KekError, KekUnavailable
from keyrotor.kek.base import WrappedDek
from keyrotor.replication.regions import Region, corrupt_copies, error_text
from keyrotor.store.replication import NO_DATES, Lifecycle, ReplicaCopy

STATUSES = ("in_sync", "stale", "drifted", "corrupt", "missing", "unreachable")
# A region's grade is its worst copy's; unreachable trumps everything.
SEVERITY = {"in_sync": 0, "stale": 1, "missing": 2, "drifted": 3, "corrupt": 4, "unreachable": 5}


@dataclass(frozen=True, slots=True)
class Source:
    """A usable DEK of the primary, as the check sees it (no key material)."""

    scope: str
    version: int
    state: str
    kek_version: int
    wrapped: WrappedDek
    fingerprint: str
    dates: Lifecycle = NO_DATES
    imported: bool = True  # adopted from the old backend: its retirement proof scans every table


Sources = Mapping[tuple[str, int], Source]
"""The primary's usable DEKs by ``(scope, version)``."""


@dataclass
class RegionReport:
    """The result of checking (and maybe repairing) one region."""

    region: str
    status: str
    kek_version: int | None
    detail: str
    checked_at: datetime
    last_ok_at: datetime | None = None
    keys_total: int = 0
    counts: dict[str, int] = field(default_factory=dict)
    repaired: int = 0
    found: str | None = None  # the status before repair, if a repair ran

    def as_dict(self) -> dict[str, Any]:
        """The JSON form (``keyrotor replicas check --json``); no key material."""
        return {
            "region": self.region,
            "status": self.status,
            "kek_version": self.kek_version,
            "last_ok_at": self.last_ok_at.isoformat() if self.last_ok_at else None,
            "checked_at": self.checked_at.isoformat(),
            "detail": self.detail,
            "keys_total": self.keys_total,
            "counts": self.counts,
            "repaired": self.repaired,
            "found": self.found or self.status,
        }


@dataclass
class CheckReport:
    """The result of one check of every region."""

    primary: str
    regions: list[RegionReport]
    duration_s: float = 0.0

    @property
    def in_sync(self) -> bool:
        """Whether every region is in sync."""
        return all(r.status == "in_sync" for r in self.regions)

    def as_dict(self) -> dict[str, Any]:
        """``{"primary": ..., "regions": [...]}`` as documented in docs/replication.md."""
        return {
            "primary": self.primary,
            "in_sync": self.in_sync,
            "duration_s": round(self.duration_s, 3),
            "regions": [r.as_dict() for r in self.regions],
        }


def grade(
    sources: Sources, copies: Mapping[tuple[str, int], ReplicaCopy]
) -> tuple[dict[tuple[str, int], str], list[tuple[str, int]]]:
    """Grade each source by its copy, without unwrapping. Returns (faults, copies to unwrap)."""
    faults: dict[tuple[str, int], str] = {}
    to_unwrap: list[tuple[str, int]] = []
    for key, src in sources.items():
        c = copies.get(key)
        if c is None:
            faults[key] = "missing"
        elif (
            c.kek_version != src.kek_version
            or c.state != src.state
            or c.dates != src.dates
            or c.imported is not src.imported
        ):
            # The dates too: a cancelled destruction, or a new window, changes no state, and a
            # promotion carries the copy's dates over (and, with the primary down, trusts them),
            # as it does the imported mark (None in a copy written before migration 0019).
            faults[key] = "stale"
        elif not hmac.compare_digest(c.fingerprint, src.fingerprint):
            faults[key] = "drifted"
        else:
            to_unwrap.append(key)
    for key in copies.keys() - sources.keys():
        faults[key] = "stale"  # a DEK the primary no longer keeps usable: must go
    return faults, to_unwrap


async def faults_of(
    region: Region, sources: Sources, copies: Mapping[tuple[str, int], ReplicaCopy]
) -> dict[tuple[str, int], str]:
    """Every faulty copy's grade, unwrapping those that look right with the region's key.

    Raises:
        ConfigurationError, KekError: the region's key cannot be opened.
        KekUnavailable: the region's key provider cannot be reached.
    """
    kek = await region.kek()
    faults, to_unwrap = grade(sources, copies)
    faults.update(dict.fromkeys(await corrupt_copies(kek, copies, to_unwrap), "corrupt"))
    return faults


async def grade_region(region: Region, sources: Sources, scope: str | None) -> RegionReport:
    """Grade one region's copies against ``sources`` (see the module docstring); no repair.

    Never raises for the region's own faults: an outage is ``unreachable`` with its cause.
    """
    now = datetime.now(UTC)

    def unreachable(what: str, exc: BaseException) -> RegionReport:
        return RegionReport(
            region.name, "unreachable", None, f"{what}: {error_text(exc)}", now, keys_total=len(sources)
        )

    try:
        copies = await region.copies(scope)
        promoted = await region.promotion()
    except Exception as exc:  # down, missing database, no schema: all "cannot be used now"
        return unreachable("database", exc)
    if promoted is not None:
        return RegionReport(
            region.name,
            "drifted",
            None,
            f"promoted to primary at {promoted['promoted_at'].isoformat()}: it is no longer a replica "
            "of this primary; update KEYROTOR_PRIMARY_REGION/KEYROTOR_REGIONS",
            now,
            keys_total=len(sources),
        )
    try:
        faults = await faults_of(region, sources, copies)
    except (KekUnavailable, KekError) as exc:
        return unreachable("wrapping key", exc)
    counts = dict(Counter(faults.values()))
    counts["in_sync"] = len(sources) - sum(1 for k in faults if k in sources)
    status = max(faults.values(), key=SEVERITY.__getitem__, default="in_sync")
    versions = [copies[k].kek_version for k in sources if k in copies]
    kek_version = min(versions) if versions else None
    detail = _detail(status, faults, counts, len(sources))
    return RegionReport(region.name, status, kek_version, detail, now, keys_total=len(sources), counts=counts)


def _detail(status: str, faults: Mapping[tuple[str, int], str], counts: Mapping[str, int], n: int) -> str:
    """A region's grade in words: counts by grade, worst first, and the first faulty copies."""
    if status == "in_sync":
        return f"{n} DEK copies in sync"
    parts = [
        f"{c} {s}" for s, c in sorted(counts.items(), key=lambda kv: -SEVERITY[kv[0]]) if s != "in_sync" and c
    ]
    detail = f"{', '.join(parts)} of {n} DEK copies"
    first = sorted(k for k, s in faults.items() if s == status)[:3]
    return detail + " (e.g. " + ", ".join(f"{s} v{v}" for s, v in first) + ")"
