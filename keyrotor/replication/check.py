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
``stale``        a copy follows an older KEK version or state of the primary's DEK, or the
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
cannot be destroyed without first being retired for at least a week, long past any copy's
next check. Destruction deletes the regions' copies in its own job (:meth:`Replication.drop_destroyed`,
best effort), and the replication it enqueues deletes whatever that missed.

No plaintext key material ever goes to a log, an error, a job argument or result, or a metric
label: only scope names, versions, counts, region names and error class names.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import logging
import time
from collections import Counter
from collections.abc import Awaitable, Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from prometheus_client import Counter as PromCounter
from prometheus_client import Gauge, Histogram
from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from keyrotor import metrics
from keyrotor.audit.log import AuditEvent, write_event
from keyrotor.errors import (
    ConfigurationError,
    Conflict,
    KekError,
    KekUnavailable,
    NotFound,
    StoreUnavailable,
)
from keyrotor.kek.base import KekProvider, WrapContext, WrappedDek
from keyrotor.replication.regions import (
    Region,
    RegionConfig,
    ReplicaCopy,
    bounded_map,
    corrupt_copies,
    env_prefix,
    error_text,
    fingerprint,
    init_regions,
    open_region_kek,
    parse_regions,
    region_settings,
    unwrap_many,
)
from keyrotor.settings import Settings
from keyrotor.store import db

log = logging.getLogger("keyrotor.replication.check")

STATUSES = ("in_sync", "stale", "drifted", "corrupt", "missing", "unreachable")
# A region's grade is its worst copy's; unreachable trumps everything.
_SEVERITY = {"in_sync": 0, "stale": 1, "missing": 2, "drifted": 3, "corrupt": 4, "unreachable": 5}
_WRITE_BATCH = 1_000

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
FAILOVER_ACTIVE = Gauge(
    "keyrotor_failover_active", "1 while DEK reads bypass the unavailable primary region."
)
FAILOVER_READS = PromCounter(
    "keyrotor_failover_unwraps_total", "DEKs unwrapped through a secondary region's copy.", ["region"]
)

# The states a regional copy must have been copied in for a failover read to serve it.
FAILOVER_STATES = ("pending", "active", "grace")


@dataclass(frozen=True, slots=True)
class _Source:
    """A usable DEK of the primary, as the check sees it (no key material)."""

    scope: str
    version: int
    state: str
    kek_version: int
    wrapped: WrappedDek
    fingerprint: str


# --- reports -------------------------------------------------------------------------------


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


def _grade(
    sources: Mapping[tuple[str, int], _Source], copies: Mapping[tuple[str, int], ReplicaCopy]
) -> tuple[dict[tuple[str, int], str], list[tuple[str, int]]]:
    """Grade each source by its copy, without unwrapping. Returns (faults, copies to unwrap)."""
    faults: dict[tuple[str, int], str] = {}
    to_unwrap: list[tuple[str, int]] = []
    for key, src in sources.items():
        c = copies.get(key)
        if c is None:
            faults[key] = "missing"
        elif c.kek_version != src.kek_version or c.state != src.state:
            faults[key] = "stale"
        elif not hmac.compare_digest(c.fingerprint, src.fingerprint):
            faults[key] = "drifted"
        else:
            to_unwrap.append(key)
    for key in copies.keys() - sources.keys():
        faults[key] = "stale"  # a DEK the primary no longer keeps usable: must go
    return faults, to_unwrap


# --- the engine ----------------------------------------------------------------------------


FailoverEmit = Callable[[bool, dict[str, Any], str | None], Awaitable[None]]


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
        self._kek = kek
        self.regions = list(regions)
        self.on_failover = on_failover
        self.failing_over = False
        self._primary_down_until = 0.0
        self._fingerprints: dict[bytes, str] = {}  # sha256(wrapped blob, kek id) -> fingerprint
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
        from keyrotor.kek.factory import local_keyring

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
        if self._kek is None:
            raise KekUnavailable(f"the KEK provider of the primary region {self.primary} is unavailable")
        return self._kek

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

    # --- the primary's side -----------------------------------------------------------------

    async def sources(self, scope: str | None) -> dict[tuple[str, int], _Source]:
        """The primary's usable DEKs (all, or one scope's) with their fingerprints.

        Raises:
            StoreUnavailable, KekUnavailable: the primary cannot be read.
        """
        sql = (
            "SELECT k.name, d.version, d.state, d.kek_id, d.kek_version, d.encrypted_dek "
            "FROM data_keys d JOIN key_scopes k ON k.id = d.scope_id "
            "WHERE d.state IN ('pending', 'active', 'grace', 'retired')"
        )
        params: dict[str, Any] = {}
        if scope is not None:
            sql += " AND k.name = :scope"
            params["scope"] = scope
        async with db.transaction(self.sessions) as session:
            rows = (await session.execute(text(sql), params)).all()
        todo = []
        keys: list[tuple[Any, bytes]] = []
        for r in rows:
            cache_key = hashlib.sha256(r[3].encode() + b"\x00" + bytes(r[5])).digest()
            keys.append((r, cache_key))
            if cache_key not in self._fingerprints:
                todo.append((r, cache_key))

        unwrapped = await unwrap_many(
            self.kek, [(WrappedDek(r[3], r[4], bytes(r[5])), WrapContext(r[0], r[1])) for r, _ in todo]
        )
        for (_, cache_key), dek in zip(todo, unwrapped, strict=True):
            if isinstance(dek, BaseException):
                raise dek  # the primary's own DEKs must unwrap: its outage or misconfiguration
            self._fingerprints[cache_key] = fingerprint(dek)
        if len(self._fingerprints) > 4 * max(len(rows), 10_000):
            live = {k for _, k in keys}
            self._fingerprints = {k: v for k, v in self._fingerprints.items() if k in live}
        return {
            (r[0], r[1]): _Source(
                r[0], r[1], r[2], r[4], WrappedDek(r[3], r[4], bytes(r[5])), self._fingerprints[k]
            )
            for r, k in keys
        }

    async def _previous(self) -> dict[str, datetime | None]:
        async with db.transaction(self.sessions) as session:
            rows = (await session.execute(text("SELECT region, last_ok_at FROM kek_replicas"))).all()
        return {r[0]: r[1] for r in rows}

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
        sources = await self.sources(scope)
        previous = await self._previous() if record else {}
        reports = list(
            await asyncio.gather(
                *(self._check_region(r, sources, repair=repair, scope=scope) for r in targets)
            )
        )
        for rep in reports:
            rep.last_ok_at = rep.checked_at if rep.status == "in_sync" else previous.get(rep.region)
            if scope is not None and rep.status == "in_sync":
                rep.last_ok_at = previous.get(rep.region)  # one scope's sync proves nothing about the rest
        if record:
            await self._record(reports, actor=actor, scope=scope)
        duration = time.perf_counter() - started
        REPLICA_CHECK_SECONDS.observe(duration)
        return CheckReport(self.primary, reports, duration)

    async def _check_region(
        self, region: Region, sources: Mapping[tuple[str, int], _Source], *, repair: bool, scope: str | None
    ) -> RegionReport:
        try:
            report = await self.grade_region(region, sources, scope)
        except Exception as exc:  # one region's failure must not hide the others' results
            log.error("replica check of region %s failed: %s", region.name, error_text(exc))
            return RegionReport(
                region.name, "unreachable", None, f"check failed: {error_text(exc)}", datetime.now(UTC)
            )
        if repair and report.status not in ("in_sync", "unreachable"):
            found = report.status
            try:
                repaired = await self._repair(region, sources, scope)
            except Conflict as exc:
                report.detail += f"; not repaired: {exc}"
                return report
            except Exception as exc:
                if not isinstance(exc, StoreUnavailable | KekUnavailable):
                    log.error("replica repair of region %s failed: %s", region.name, error_text(exc))
                report.detail += f"; repair failed: {error_text(exc)}"
                return report
            report = await self.grade_region(region, sources, scope)  # prove the repair
            report.found, report.repaired = found, repaired
            REPLICA_REPAIRED.labels(region.name).inc(repaired)
        return report

    async def grade_region(
        self, region: Region, sources: Mapping[tuple[str, int], _Source], scope: str | None
    ) -> RegionReport:
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
            kek = await region.kek()
        except (KekUnavailable, KekError) as exc:
            return unreachable("wrapping key", exc)
        faults, to_unwrap = _grade(sources, copies)
        try:
            faults.update(dict.fromkeys(await corrupt_copies(kek, copies, to_unwrap), "corrupt"))
        except KekUnavailable as exc:
            return unreachable("wrapping key", exc)
        counts = dict(Counter(faults.values()))
        counts["in_sync"] = len(sources) - sum(1 for k in faults if k in sources)
        status = max(faults.values(), key=_SEVERITY.__getitem__, default="in_sync")
        versions = [copies[k].kek_version for k in sources if k in copies]
        kek_version = min(versions) if versions else None
        if status == "in_sync":
            detail = f"{len(sources)} DEK copies in sync"
        else:
            parts = [
                f"{n} {s}"
                for s, n in sorted(counts.items(), key=lambda kv: -_SEVERITY[kv[0]])
                if s != "in_sync" and n
            ]
            detail = f"{', '.join(parts)} of {len(sources)} DEK copies"
            first = sorted((k for k, s in faults.items() if s == status))[:3]
            detail += " (e.g. " + ", ".join(f"{s} v{v}" for s, v in first) + ")"
        return RegionReport(
            region.name, status, kek_version, detail, now, keys_total=len(sources), counts=counts
        )

    async def _repair(
        self, region: Region, sources: Mapping[tuple[str, int], _Source], scope: str | None
    ) -> int:
        """Re-replicate every faulty copy (verified before writing); drop copies the primary destroyed."""
        if await region.promotion() is not None:
            raise Conflict(f"region {region.name} was promoted to primary; refusing to overwrite its keys")
        copies = await region.copies(scope)
        kek = await region.kek()
        faults, to_unwrap = _grade(sources, copies)
        faults.update(dict.fromkeys(await corrupt_copies(kek, copies, to_unwrap), "corrupt"))
        rewrite = [k for k in faults if k in sources]
        drop = [copies[k] for k in faults if k not in sources]

        async def make(key: tuple[str, int]) -> dict[str, Any]:
            src = sources[key]
            ctx = WrapContext(*key)
            dek = await self.kek.unwrap(src.wrapped, ctx)
            if not hmac.compare_digest(fingerprint(dek), src.fingerprint):
                raise Conflict(f"primary DEK {key[0]} v{key[1]} changed during the check")
            new = await kek.wrap(dek, ctx)
            # Never write an unverified copy: it must unwrap, with the region's key, to this DEK.
            if not hmac.compare_digest(await kek.unwrap(new, ctx), dek):
                raise KekError(
                    f"region {region.name}: a fresh copy of {key[0]} v{key[1]} does not round-trip"
                )
            old = copies.get(key)
            return {
                "s": key[0],
                "v": key[1],
                "state": src.state,
                "kv": src.kek_version,
                "skid": src.wrapped.kek_id,
                "src": self.primary,
                "blob": new.blob,
                "rkid": new.kek_id,
                "rkv": new.kek_version,
                "fp": src.fingerprint,
                "old_id": old.id if old else None,
                "old_blob": old.wrapped if old else None,
                "old_fp": old.fingerprint if old else None,
            }

        made = await bounded_map(make, rewrite)
        rows: list[dict[str, Any]] = []
        for res in made:
            if isinstance(res, KekUnavailable | StoreUnavailable):
                raise res
            if isinstance(res, BaseException):
                log.warning("replica copy not written for region %s: %s", region.name, error_text(res))
                continue
            rows.append(res)
        inserts = [r for r in rows if r["old_id"] is None]
        updates = [r for r in rows if r["old_id"] is not None]
        written = 0
        for i in range(0, max(len(inserts), len(updates), len(drop)), _WRITE_BATCH):
            async with db.transaction(region.sessions) as session:
                ins, upd = inserts[i : i + _WRITE_BATCH], updates[i : i + _WRITE_BATCH]
                dr = drop[i : i + _WRITE_BATCH]
                if ins:
                    res = await session.execute(
                        text(
                            "INSERT INTO replica_keys (scope, dek_version, state, "
                            "kek_version, source_kek_id, "
                            "source_region, wrapped_dek, region_kek_id, region_kek_version, fingerprint) "
                            "SELECT * FROM unnest(CAST(:s AS text[]), CAST(:v AS int[]), "
                            "CAST(:state AS text[]), "
                            "CAST(:kv AS int[]), CAST(:skid AS text[]), CAST(:src AS "
                            "text[]), CAST(:blob AS bytea[]), "
                            "CAST(:rkid AS text[]), CAST(:rkv AS int[]), CAST(:fp AS text[])) "
                            "ON CONFLICT (scope, dek_version) DO NOTHING"
                        ),
                        {
                            c: [r[c] for r in ins]
                            for c in ("s", "v", "state", "kv", "skid", "src", "blob", "rkid", "rkv", "fp")
                        },
                    )
                    written += int(getattr(res, "rowcount", 0) or 0)
                if upd:
                    # Compare-and-swap: a copy changed since it was graded is left for the next check.
                    res = await session.execute(
                        text(
                            "UPDATE replica_keys r SET state = u.state, kek_version = u.kv, "
                            "source_kek_id = u.skid, "
                            "source_region = u.src, wrapped_dek = u.blob, region_kek_id = u.rkid, "
                            "region_kek_version = u.rkv, fingerprint = u.fp, replicated_at = now() "
                            "FROM unnest(CAST(:id AS bigint[]), CAST(:state AS text[]), CAST(:kv AS int[]), "
                            "CAST(:skid AS text[]), CAST(:src AS text[]), CAST(:blob AS bytea[]), "
                            "CAST(:rkid AS text[]), CAST(:rkv AS int[]), CAST(:fp AS text[]), "
                            "CAST(:old_blob AS bytea[]), CAST(:old_fp AS text[])) "
                            "AS u(id, state, kv, skid, src, blob, rkid, rkv, fp, old_blob, old_fp) "
                            "WHERE r.id = u.id AND r.wrapped_dek = u.old_blob AND r.fingerprint = u.old_fp"
                        ),
                        {
                            "id": [r["old_id"] for r in upd],
                            **{
                                c: [r[c] for r in upd]
                                for c in (
                                    "state",
                                    "kv",
                                    "skid",
                                    "src",
                                    "blob",
                                    "rkid",
                                    "rkv",
                                    "fp",
                                    "old_blob",
                                    "old_fp",
                                )
                            },
                        },
                    )
                    written += int(getattr(res, "rowcount", 0) or 0)
                if dr:
                    res = await session.execute(
                        text(
                            "DELETE FROM replica_keys r USING unnest(CAST(:id AS bigint[]), "
                            "CAST(:blob AS bytea[])) "
                            "AS d(id, blob) WHERE r.id = d.id AND r.wrapped_dek = d.blob"
                        ),
                        {"id": [c.id for c in dr], "blob": [c.wrapped for c in dr]},
                    )
                    written += int(getattr(res, "rowcount", 0) or 0)
        return written

    async def _record(self, reports: Sequence[RegionReport], *, actor: str, scope: str | None) -> None:
        for rep in reports:
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
        async with db.transaction(self.sessions) as session:
            for rep in reports:
                if scope is not None and rep.status == "in_sync":
                    # A one-scope replication refreshes nothing else: keep the last full check's status.
                    continue
                await session.execute(
                    text(
                        "INSERT INTO kek_replicas (region, status, kek_version, keys_total, counts, detail, "
                        "checked_at, last_ok_at) VALUES (:r, :st, :kv, :n, CAST(:c AS jsonb), :d, :at, :ok) "
                        "ON CONFLICT (region) DO UPDATE SET status = EXCLUDED.status, "
                        "kek_version = EXCLUDED.kek_version, keys_total = EXCLUDED.keys_total, "
                        "counts = EXCLUDED.counts, detail = EXCLUDED.detail, "
                        "checked_at = EXCLUDED.checked_at, "
                        "last_ok_at = COALESCE(EXCLUDED.last_ok_at, kek_replicas.last_ok_at)"
                    ),
                    {
                        "r": rep.region,
                        "st": rep.status,
                        "kv": rep.kek_version,
                        "n": rep.keys_total,
                        "c": _json(rep.counts),
                        "d": rep.detail,
                        "at": rep.checked_at,
                        "ok": rep.last_ok_at,
                    },
                )
            await write_event(
                session,
                *(
                    AuditEvent(
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
                    for rep in reports
                ),
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

    # --- failover reads ---------------------------------------------------------------------

    async def fetch(
        self, scope: str, version: int, primary: Callable[[str, int], Awaitable[AESGCM]]
    ) -> AESGCM:
        """Unwrap a DEK through the primary, or through the first healthy secondary if the
        primary's store or KEK provider is unavailable.

        Raises:
            whatever the primary raised, if no secondary could serve the DEK either;
            permanent errors of the primary (unknown scope or version, destroyed key) at once.
            (A version no region holds in one of :data:`FAILOVER_STATES` gets the primary's error.)
        """
        now = time.monotonic()
        cause: BaseException | None = None
        if now >= self._primary_down_until:
            try:
                cipher = await asyncio.wait_for(primary(scope, version), self.settings.failover_timeout_s)
            except (StoreUnavailable, KekUnavailable, TimeoutError) as exc:
                cause = exc
                self._primary_down_until = time.monotonic() + self.settings.failover_retry_s
                if not self.failing_over:
                    self.failing_over = True
                    FAILOVER_ACTIVE.set(1)
                    log.warning(
                        "primary region %s unavailable (%s): reading DEKs from secondaries",
                        self.primary,
                        error_text(exc),
                    )
                    await self._emit(
                        False,
                        {"from": self.primary, "state": "failover", "reason": type(exc).__name__},
                        error_text(exc),
                    )
            else:
                if self.failing_over:
                    self.failing_over = False
                    FAILOVER_ACTIVE.set(0)
                    log.warning("primary region %s is back: DEK reads return to it", self.primary)
                    await self._emit(True, {"to": self.primary, "state": "recovered"}, None)
                return cipher
        for region in self._failover_order():
            try:
                dek = await asyncio.wait_for(
                    region.unwrap_copy(scope, version, states=FAILOVER_STATES),
                    self.settings.failover_timeout_s,
                )
            except (StoreUnavailable, KekUnavailable, TimeoutError, KekError, OSError) as exc:
                region.down_until = time.monotonic() + self.settings.failover_retry_s
                log.warning(
                    "secondary region %s cannot serve %s v%d: %s",
                    region.name,
                    scope,
                    version,
                    error_text(exc),
                )
                continue
            if dek is None:
                continue
            FAILOVER_READS.labels(region.name).inc()
            return AESGCM(dek)
        if cause is None:  # the primary was skipped (recently down): ask it after all
            return await primary(scope, version)
        raise cause

    def _failover_order(self) -> list[Region]:
        now = time.monotonic()
        healthy = [r for r in self.regions if r.down_until <= now]
        return healthy + [r for r in self.regions if r.down_until > now]

    async def _emit(self, success: bool, metadata: dict[str, Any], error: str | None) -> None:
        if self.on_failover is None:
            return
        try:
            await self.on_failover(success, metadata, error)
        except Exception as exc:  # auditing must not turn a served read into a failure
            log.error("failover audit event not recorded: %s", type(exc).__name__)

    # --- promotion --------------------------------------------------------------------------
    async def promote(self, name: str, *, by: str = "system") -> dict[str, Any]:
        """Promote secondary ``name`` to primary (see :func:`keyrotor.replication.promotion.promote`)."""
        from keyrotor.replication.promotion import promote

        return await promote(self, name, by=by)


def _set_gauges(region: str, status: str, counts: Mapping[str, int]) -> None:
    for s in STATUSES:
        REPLICA_STATE.labels(region, s).set(1.0 if s == status else 0.0)
        REPLICA_KEYS.labels(region, s).set(float(counts.get(s, 0)))
    metrics.REPLICA_STATUS.labels(region).set(1.0 if status == "in_sync" else 0.0)


def _json(value: Any) -> str:
    import json

    return json.dumps(value, sort_keys=True)


async def stored_status(sessions: async_sessionmaker[AsyncSession]) -> list[dict[str, Any]]:
    """The last recorded check of each region (``kek_replicas``), for ``status`` and ``health``."""
    async with db.transaction(sessions) as session:
        rows = (
            await session.execute(
                text(
                    "SELECT region, status, kek_version, keys_total, counts, detail, checked_at, last_ok_at "
                    "FROM kek_replicas ORDER BY region"
                )
            )
        ).all()
    return [
        {
            "region": r[0],
            "status": r[1],
            "kek_version": r[2],
            "keys_total": r[3],
            "counts": r[4],
            "detail": r[5],
            "checked_at": r[6].isoformat(),
            "last_ok_at": r[7].isoformat() if r[7] else None,
        }
        for r in rows
    ]


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
