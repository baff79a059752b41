"""Multi-region KEK replication: copies of the primary's DEKs in every secondary region,
the consistency check that grades them, repair, failover reads and promotion.

What is copied. Every DEK version of the primary that still decrypts (``pending``, ``active``,
``grace``, and ``retired``, which decrypts until it is destroyed) is unwrapped with the
primary's KEK and wrapped again under the region's own wrapping key (any provider: local
keyring, AWS KMS in that region, Vault), bound to the same scope and DEK version
(:class:`~keyrotor.kek.base.WrapContext`). One scheme serves every primary provider, including
those whose KEK never leaves KMS or Vault. Each copy records the KEK version of the primary's
copy it follows and a fingerprint: a key check value, ``HMAC-SHA256(dek,
"keyrotor/replica-fingerprint/v1")`` truncated to 128 bits, which reveals nothing of the DEK.

Where. A region is its own Postgres database with keyrotor's schema; copies live in its
``replica_keys`` table. The primary keeps the result of each region's last check in
``kek_replicas`` and writes a ``replica_check`` audit event per region and check.

Grading (one region, in this order; the region gets its worst copy's grade):

``unreachable``  its database or its wrapping key cannot be used now;
``missing``      a usable primary DEK has no copy;
``stale``        a copy follows an older KEK version, state or date of the primary's DEK, or the
                 region still holds a DEK the primary destroyed;
``drifted``      a copy's recorded fingerprint differs from the primary's;
``corrupt``      a copy does not unwrap with the region's key, or unwraps to other bytes than
                 its fingerprint says;
``in_sync``      every copy is present, current, and proven to unwrap to the primary's DEK.

Repair writes only verified copies: the new copy is unwrapped again with the region's key and
compared with the primary's DEK before it is written, and it replaces the old copy by
compare-and-swap (a row changed meanwhile is left alone and graded at the next check).

Failover. :meth:`Replication.fetch` is KeyManager's DEK-unwrap path when regions are
configured: the primary first (bounded by ``KEYROTOR_FAILOVER_TIMEOUT_SECONDS``); if its store
or KEK provider is unavailable, the first healthy secondary's copy, with a ``failover`` audit
event when reads leave the primary and another when they return. Only copies of versions that
were ``pending``, ``active`` or ``grace`` when last copied are served (:data:`FAILOVER_STATES`):
a ``retired`` version may have been destroyed on the primary since, and its uses must be
recorded there (they cancel its destruction), so it waits for the primary. A grace version
cannot be destroyed without first being retired for at least a week, so a copy is served only
while it is proven recent (:data:`~keyrotor.replication.failover.FAILOVER_MAX_PROOF_AGE_S`): written,
or its region found fully in sync (recorded in the region's own ``kek_replicas`` row), within six
days; a region away for a whole destruction window cannot serve the destroyed key.
Destruction deletes the regions' copies in its own job (:meth:`Replication.drop_destroyed`,
best effort), and the replication it enqueues deletes whatever that missed.

No plaintext key material ever goes to a log, an error, a job argument or result, or a metric
label: only scope names, versions, counts, region names and error class names.
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections.abc import Awaitable, Callable, Iterable, Mapping, Sequence
from contextlib import AbstractAsyncContextManager, nullcontext
from datetime import UTC, datetime
from typing import Any

from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from prometheus_client import Counter as PromCounter
from prometheus_client import Gauge, Histogram
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from keyrotor import metrics
from keyrotor.audit.log import AuditEvent, write_event
from keyrotor.errors import ConfigurationError, Conflict, KekUnavailable, NotFound, StoreUnavailable
from keyrotor.kek.base import KekProvider
from keyrotor.kek.factory import local_keyring
from keyrotor.replication import promotion
from keyrotor.replication.failover import (
    FAILOVER_ACTIVE,
    FAILOVER_READS,
    FAILOVER_STATES,
    Failover,
    FailoverEmit,
)
from keyrotor.replication.grading import STATUSES, CheckReport, RegionReport, Sources, grade_region
from keyrotor.replication.primary import PrimaryKeys
from keyrotor.replication.record import forget, record_interrupted, repairing
from keyrotor.replication.regions import (
    Region,
    RegionConfig,
    env_prefix,
    error_text,
    fingerprint,
    init_regions,
    open_region_kek,
    parse_regions,
    region_settings,
)
from keyrotor.replication.repair import repair_region
from keyrotor.settings import Settings
from keyrotor.store import db
from keyrotor.store import repair_record as repair_log
from keyrotor.store import replication as store
from keyrotor.store.replication import CheckRecord, ReplicaCopy

log = logging.getLogger("keyrotor.replication.check")

REPLICA_STATE = Gauge(
    "keyrotor_replica_state",
    "1 for the status a region's replicas had at their last check (one series a status).",
    ["region", "status"],
)
REPLICA_KEYS = Gauge(
    "keyrotor_replica_keys", "DEK copies of a region by grade at its last check.", ["region", "status"]
)
REPLICA_DRIFT = PromCounter(
    "keyrotor_replica_faults_total",
    "Regions found not in sync by a replica check, by status.",
    ["region", "status"],
)
REPLICA_REPAIRED = PromCounter(
    "keyrotor_replica_repaired_total", "DEK copies written or removed by replica repair.", ["region"]
)
REPLICA_CHECK_SECONDS = Histogram(
    "keyrotor_replica_check_duration_seconds",
    "Duration of a replica check of every region (with repair, if asked).",
    buckets=(0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300),
)


class Replication:
    """The primary's view of its secondary regions: check, repair, promote, and failover reads.

    Args:
        settings: configuration (``KEYROTOR_PRIMARY_REGION``, ``KEYROTOR_REGIONS``...).
        sessions: the primary's session factory.
        kek: the primary's KEK provider (None if it could not be opened: an outage).
        regions: the secondaries (see :meth:`open`).
        on_failover: called with ``(success, metadata, error)`` when reads leave the primary
            (``success`` False) and when they return (True); KeyManager records it as a
            ``failover`` audit event.
    """

    def __init__(
        self,
        settings: Settings,
        sessions: async_sessionmaker[AsyncSession],
        kek: KekProvider | None,
        regions: Sequence[Region],
        *,
        on_failover: FailoverEmit | None = None,
    ) -> None:
        self.settings = settings
        self.primary = settings.primary_region
        self.sessions = sessions
        self.regions = list(regions)
        self.primary_keys = PrimaryKeys(self.primary, sessions, kek)
        self.failover = Failover(
            self.primary,
            self.regions,
            timeout_s=settings.failover_timeout_s,
            retry_s=settings.failover_retry_s,
            on_failover=on_failover,
        )
        self._tasks: set[asyncio.Task[Any]] = set()

    @classmethod
    def open(
        cls,
        settings: Settings,
        sessions: async_sessionmaker[AsyncSession],
        kek: KekProvider | None,
        environ: Mapping[str, str] | None = None,
        *,
        on_failover: FailoverEmit | None = None,
    ) -> Replication:
        """Build from configuration; regions' keys open on first use.

        Raises:
            ConfigurationError: ``KEYROTOR_REGIONS`` or a region's variables are invalid.
        """
        regions = []
        for cfg in parse_regions(settings, environ):
            rs = region_settings(cfg)  # fail fast on bad variables
            local: KekProvider | None = None
            if rs.secrets_provider == "local" and not rs.kek_read_providers:
                # Built now (no I/O): a missing or weak regional key stops start-up, not a failover.
                try:
                    local = local_keyring(rs)
                except ConfigurationError as exc:
                    raise ConfigurationError(f"region {cfg.name} ({cfg.prefix}*): {exc}") from None
            regions.append(Region(cfg, settings, local, owns_kek=True))
        return cls(settings, sessions, kek, regions, on_failover=on_failover)

    @property
    def kek(self) -> KekProvider:
        """The primary's KEK provider.

        Raises:
            KekUnavailable: it could not be opened (the primary region's outage).
        """
        return self.primary_keys.kek

    @property
    def failing_over(self) -> bool:
        """Whether DEK reads bypass the unavailable primary now."""
        return self.failover.failing_over

    def region(self, name: str) -> Region:
        """The configured secondary named ``name``.

        Raises:
            NotFound: no such secondary.
        """
        for r in self.regions:
            if r.name == name:
                return r
        raise NotFound(
            f"no secondary region {name!r} (KEYROTOR_REGIONS names {[r.name for r in self.regions]})"
        )

    async def aclose(self) -> None:
        """Wait for background replications, then close every region."""
        if self._tasks:
            await asyncio.gather(*self._tasks, return_exceptions=True)
        for r in self.regions:
            await r.aclose()

    # --- check and repair ------------------------------------------------------------------

    async def check(
        self,
        *,
        repair: bool,
        scope: str | None = None,
        regions: Iterable[str] | None = None,
        actor: str = "system",
        record: bool = True,
    ) -> CheckReport:
        """Check every region (or those named), repairing if asked; record and report the result.

        Args:
            repair: re-replicate stale, missing, drifted and corrupt copies (verified first).
            scope: only this scope's DEKs (replication after a rotation), else all.
            regions: only these regions (default: all configured).
            actor: who asked, for the ``replica_check`` audit events.
            record: write ``kek_replicas`` rows and audit events in the primary.

        Raises:
            StoreUnavailable, KekUnavailable: the primary itself cannot be read (nothing to compare with).
        """
        started = time.perf_counter()
        targets = self.regions if regions is None else [self.region(n) for n in regions]
        sources = await self.primary_keys.sources(scope)
        previous = await self._previous() if record else {}
        if record:  # the repairs of a check that died before its events (keyrotor.replication.record)
            await record_interrupted(self.sessions, self.regions, self.primary)
        journal: AbstractAsyncContextManager[str | None] = (
            repairing(self.sessions, targets, scope, actor) if record and repair else nullcontext()
        )
        async with journal as repair_id:
            reports = list(
                await asyncio.gather(
                    *(
                        self._check_region(r, sources, repair=repair, scope=scope, rid=repair_id)
                        for r in targets
                    )
                )
            )
            for rep in reports:
                rep.last_ok_at = rep.checked_at if rep.status == "in_sync" else previous.get(rep.region)
                if scope is not None and rep.status == "in_sync":
                    rep.last_ok_at = previous.get(rep.region)  # one scope's sync proves nothing of the rest
            if record:
                await self._record(reports, actor=actor, scope=scope, repair_id=repair_id)
        duration = time.perf_counter() - started
        REPLICA_CHECK_SECONDS.observe(duration)
        return CheckReport(self.primary, reports, duration)

    async def _previous(self) -> dict[str, datetime | None]:
        async with db.transaction(self.sessions) as session:
            return await store.last_ok_times(session)

    async def _check_region(
        self, region: Region, sources: Sources, *, repair: bool, scope: str | None, rid: str | None = None
    ) -> RegionReport:
        try:
            report = await grade_region(region, sources, scope)
        except Exception as exc:  # one region's failure must not hide the others' results
            log.error("replica check of region %s failed: %s", region.name, error_text(exc))
            return RegionReport(
                region.name, "unreachable", None, f"check failed: {error_text(exc)}", datetime.now(UTC)
            )
        if repair and report.status not in ("in_sync", "unreachable"):
            found = report.status
            try:
                # Read again: a DEK made since the check began (and maybe replicated already)
                # is then repaired and graded as what it is, not as a copy of a destroyed one.
                sources = await self.primary_keys.sources(scope)
                repaired = await repair_region(self.primary_keys, region, sources, scope, rid)
            except Conflict as exc:
                report.detail += f"; not repaired: {exc}"
                return report
            except Exception as exc:
                if not isinstance(exc, StoreUnavailable | KekUnavailable):
                    log.error("replica repair of region %s failed: %s", region.name, error_text(exc))
                report.detail += f"; repair failed: {error_text(exc)}"
                return report
            report = await grade_region(region, sources, scope)  # prove the repair
            report.found, report.repaired = found, repaired
            REPLICA_REPAIRED.labels(region.name).inc(repaired)
        if scope is None and report.status == "in_sync":
            await self._mark_verified(region, report)
        return report

    async def _mark_verified(self, region: Region, report: RegionReport) -> None:
        """Tell the region its copies were all proven in sync now: failover reads serve only
        copies proven recently (:data:`~keyrotor.replication.failover.FAILOVER_MAX_PROOF_AGE_S`).
        A failure leaves the older proof in place, so its copies age out of failover sooner."""
        try:
            await region.mark_verified(primary=self.primary, keys=report.keys_total)
        except Exception as exc:
            log.warning("region %s: its in-sync proof was not recorded: %s", region.name, error_text(exc))

    async def _record(
        self, reports: Sequence[RegionReport], *, actor: str, scope: str | None, repair_id: str | None
    ) -> None:
        for rep in reports:
            _publish(rep, scope)
        async with db.transaction(self.sessions) as session:
            for rep in reports:
                if scope is not None and rep.status == "in_sync":
                    # A one-scope replication refreshes nothing else: keep the last full check's status.
                    continue
                await store.record_check(session, _check_record(rep))
            await write_event(session, *(self._audit_event(rep, actor, scope) for rep in reports))
            if repair_id is not None:  # recorded: no later check records these repairs again
                await repair_log.close_intents(session, repair_id)
        for rep in (r for r in reports if r.repaired):
            await forget(self.region(rep.region), repair_id or "")

    def _audit_event(self, rep: RegionReport, actor: str, scope: str | None) -> AuditEvent:
        return AuditEvent(
            "replica_check",
            scope=scope,
            success=rep.status == "in_sync",
            actor=actor,
            error_message=None if rep.status == "in_sync" else rep.detail,
            metadata={
                "region": rep.region,
                "primary": self.primary,
                "status": rep.status,
                "found": rep.found or rep.status,
                "repaired": rep.repaired,
                "kek_version": rep.kek_version,
                "keys": rep.keys_total,
            },
        )

    async def publish_stored(self) -> None:
        """Set the replica gauges from the last recorded checks (a process starting between checks)."""
        for row in merge_status([r.name for r in self.regions], await stored_status(self.sessions)):
            _set_gauges(row["region"], row["status"], row["counts"])

    # --- follow-ups from the KeyManager ------------------------------------------------------

    def follow(self, scope: str) -> None:
        """Replicate one scope's DEKs to every region now, in the background (a new scope's DEK).

        Failures are logged; the next check (hourly, or after any rotation) repairs what is missing.
        """
        task = asyncio.get_running_loop().create_task(self._follow(scope), name=f"keyrotor-replicate-{scope}")
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _follow(self, scope: str) -> None:
        try:
            await self.check(repair=True, scope=scope)
        except Exception as exc:
            log.warning("replication of scope %s failed: %s", scope, error_text(exc))

    async def drop_destroyed(self, scope: str, version: int) -> list[str]:
        """Delete every region's copy of a DEK version the primary just destroyed. Best effort:
        a region that cannot be reached is logged and left to the replication job that follows
        the destruction. Returns the regions that hold no copy any more."""
        done = []
        for region in self.regions:
            try:
                await asyncio.wait_for(region.drop_copy(scope, version), self.settings.failover_timeout_s)
            except Exception as exc:
                log.warning(
                    "region %s keeps its copy of destroyed %s v%d until the next replication: %s",
                    region.name,
                    scope,
                    version,
                    error_text(exc),
                )
                continue
            done.append(region.name)
        return done

    # --- failover reads and promotion -------------------------------------------------------

    async def fetch(
        self, scope: str, version: int, primary: Callable[[str, int], Awaitable[AESGCM]]
    ) -> AESGCM:
        """Unwrap a DEK through the primary, or a secondary's copy while the primary is
        unavailable (see :meth:`keyrotor.replication.failover.Failover.fetch`)."""
        return await self.failover.fetch(scope, version, primary)

    async def promote(self, name: str, *, by: str = "system") -> dict[str, Any]:
        """Promote secondary ``name`` to primary (see :func:`keyrotor.replication.promotion.promote`).

        Raises:
            NotFound: no such region; and what :func:`~keyrotor.replication.promotion.promote` raises.
        """
        return await promotion.promote(self.primary_keys, self.region(name), self.settings, by=by)


def _publish(rep: RegionReport, scope: str | None) -> None:
    """A region's result to the gauges, and to the drift counter and the log if it is a fault."""
    if scope is None or rep.status != "in_sync":  # one scope's success says nothing of the rest
        _set_gauges(rep.region, rep.status, rep.counts)
    # A follow-up replication (one scope, after a key change) finds its new DEK missing by
    # design: only a full check's findings, or a failure to converge, are drift.
    found_fault = scope is None and rep.found is not None and rep.found != "in_sync"
    if rep.status != "in_sync" or found_fault:
        REPLICA_DRIFT.labels(rep.region, rep.found or rep.status).inc()
        log.warning(
            "replica region %s is %s (found %s, repaired %d): %s",
            rep.region,
            rep.status,
            rep.found or rep.status,
            rep.repaired,
            rep.detail,
        )


def _check_record(rep: RegionReport) -> CheckRecord:
    return CheckRecord(
        region=rep.region,
        status=rep.status,
        kek_version=rep.kek_version,
        keys_total=rep.keys_total,
        counts=json.dumps(rep.counts, sort_keys=True),
        detail=rep.detail,
        checked_at=rep.checked_at,
        last_ok_at=rep.last_ok_at,
    )


def _set_gauges(region: str, status: str, counts: Mapping[str, int]) -> None:
    for s in STATUSES:
        REPLICA_STATE.labels(region, s).set(1.0 if s == status else 0.0)
        REPLICA_KEYS.labels(region, s).set(float(counts.get(s, 0)))
    metrics.REPLICA_STATUS.labels(region).set(1.0 if status == "in_sync" else 0.0)


async def stored_status(sessions: async_sessionmaker[AsyncSession]) -> list[dict[str, Any]]:
    """The last recorded check of each region (``kek_replicas``), for ``status`` and ``health``."""
    async with db.transaction(sessions) as session:
        return await store.stored_checks(session)


def merge_status(configured: Sequence[str], stored: Sequence[dict[str, Any]]) -> list[dict[str, Any]]:
    """Every configured region with its stored status (``missing`` with no check yet: never
    checked means never proven to hold a copy)."""
    by_name = {r["region"]: r for r in stored}
    out = []
    for name in configured:
        row = by_name.get(name)
        if row is None:
            row = {
                "region": name,
                "status": "missing",
                "kek_version": None,
                "keys_total": 0,
                "counts": {},
                "detail": "never checked: run `keyrotor replicas check --repair`",
                "checked_at": None,
                "last_ok_at": None,
            }
        out.append(row)
    return out


__all__ = [
    "FAILOVER_ACTIVE",
    "FAILOVER_READS",
    "FAILOVER_STATES",
    "STATUSES",
    "CheckReport",
    "Region",
    "RegionConfig",
    "RegionReport",
    "ReplicaCopy",
    "Replication",
    "env_prefix",
    "fingerprint",
    "init_regions",
    "merge_status",
    "open_region_kek",
    "parse_regions",
    "region_settings",
    "stored_status",
]
