"""Prometheus metrics the library emits (prometheus_client's default registry).

Labels are bounded and never secret: ``scope`` (a validated identifier such as ``anthropic`` or
``tenant-42/openai``, checked by :func:`keyrotor.schedule.rules.check_scope` before any run exists;
``KEYROTOR_METRICS_SCOPE_LABELS=hashed`` shows ``h:`` and 12 hex digits of its SHA-256 instead,
``off`` one ``-`` for all scopes: see :func:`scope_label`),
``version`` (a DEK version number), ``reason`` (an error class name), ``region``. Never a key
id, a ciphertext, a value or anything derived from key material.

Defined elsewhere and served by the same registry: KEK provider calls, latency, errors and
circuit state (:mod:`keyrotor.kek.metrics`), and the audit queue and its writes
(:mod:`keyrotor.audit.writer`, :mod:`keyrotor.audit.append`).
The worker adds the arq queue depth and job outcomes (:mod:`keyrotor.worker.http`,
:mod:`keyrotor.worker.main`).

The re-encryption rate is derived, not a gauge: ``rate(keyrotor_rows_reencrypted_total[1m])``
(a gauge sampled at scrape time would miss bursts between scrapes).
"""

from __future__ import annotations

import hashlib
import weakref
from collections.abc import Iterable, Iterator
from typing import Any

from prometheus_client import REGISTRY, Counter, Gauge, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from keyrotor.cache import DekCache
from keyrotor.census import report as census
from keyrotor.store import census as store

SCOPE_LABEL_MODES = ("plain", "hashed", "off")
_scope_mode = "plain"
_hashed: dict[str, str] = {}


def configure_scope_labels(mode: str) -> None:
    """Choose how scope names appear in labels (``KEYROTOR_METRICS_SCOPE_LABELS``).

    ``plain``: the name. ``hashed``: ``h:`` + 12 hex digits of SHA-256(name), stable across
    processes, so dashboards still split by scope without showing tenant ids to whoever can
    read ``/metrics``; a name that can be guessed can still be confirmed by hashing the guess.
    ``off``: ``-`` for every scope (totals only).

    Raises:
        ValueError: an unknown mode (settings validation refuses it first).
    """
    global _scope_mode
    if mode not in SCOPE_LABEL_MODES:
        raise ValueError(f"scope label mode must be one of {SCOPE_LABEL_MODES}, not {mode!r}")
    _scope_mode = mode


def scope_label(scope: str) -> str:
    """The ``scope`` label value for ``scope`` under the configured mode."""
    if _scope_mode == "plain":
        return scope
    if _scope_mode == "off":
        return "-"
    label = _hashed.get(scope)
    if label is None:
        label = "h:" + hashlib.sha256(scope.encode()).hexdigest()[:12]
        if len(_hashed) < 100_000:
            _hashed[scope] = label
    return label


ROTATIONS_STARTED = Counter(
    "keyrotor_rotations_started_total", "DEK rotations that generated and stored a new DEK.", ["scope"]
)
ROTATIONS_COMPLETED = Counter(
    "keyrotor_rotations_completed_total", "DEK rotations completed (every row re-encrypted).", ["scope"]
)
ROTATIONS_FAILED = Counter(
    "keyrotor_rotations_failed_total", "Rotation runs marked failed (a permanent error).", ["scope", "kind"]
)
ROTATION_SECONDS = Histogram(
    "keyrotor_rotation_duration_seconds",
    "Time from a DEK rotation run's creation to its completion.",
    ["scope"],
    buckets=(0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600, 1800, 3600, 7200),
)
ROWS_REENCRYPTED = Counter(
    "keyrotor_rows_reencrypted_total",
    "Rows re-encrypted under a new DEK (written by compare-and-swap; a rolled-back batch counts too).",
    ["scope"],
)
ROWS_PER_VERSION = Gauge(
    "keyrotor_rows_per_dek_version",
    "Rows of keyrotor's secrets table per scope and DEK version (refreshed by the scheduler's scan).",
    ["scope", "version"],
)
UNREGISTERED_LOCATIONS = Gauge(
    "keyrotor_unregistered_locations",
    "Locations (scope, encrypt context up to its last ':') holding values of DEK versions not "
    "destroyed that no registered column covers and no operator acknowledged: their versions "
    "are never destroyed (`keyrotor columns list`). Refreshed by the scheduler's scan.",
)
DECRYPT_FAILURES = Counter(
    "keyrotor_decrypt_failures_total",
    "Values that failed to decrypt (KeyManager.decrypt and rotation batches), by error class.",
    ["reason"],
)
RETIRED_KEY_USES = Counter(
    "keyrotor_retired_key_uses_total",
    "Decrypts that needed a retired DEK version (each cancels that version's pending destruction).",
    ["scope", "version"],
)
DEK_REFRESHES = Counter(
    "keyrotor_dek_cache_refreshes_total",
    "Background refreshes of cached DEKs near their expiry (refresh-ahead), by outcome.",
    ["outcome"],
)
REPLICA_STATUS = Gauge(
    "keyrotor_replica_status",
    "1 if the region's KEK replica matched at its last check, 0 if not (filled by replication).",
    ["region"],
)

_CACHES: weakref.WeakSet[DekCache] = weakref.WeakSet()


class _CacheCollector(Collector):
    """Reads the hit/miss counters of every tracked :class:`DekCache` at scrape time."""

    def collect(self) -> Iterable[Any]:
        caches = list(_CACHES)
        hits = CounterMetricFamily("keyrotor_dek_cache_hits", "DEK cache hits in this process.")
        misses = CounterMetricFamily("keyrotor_dek_cache_misses", "DEK cache misses in this process.")
        entries = GaugeMetricFamily("keyrotor_dek_cache_entries", "Unwrapped DEKs cached in this process.")
        hits.add_metric([], float(sum(c.stats.hits for c in caches)))
        misses.add_metric([], float(sum(c.stats.misses for c in caches)))
        entries.add_metric([], float(sum(len(c) for c in caches)))
        return iter((hits, misses, entries))

    def describe(self) -> Iterator[Any]:
        return iter(())  # collected lazily; nothing to check at registration


REGISTRY.register(_CacheCollector())


def track_cache(cache: DekCache) -> None:
    """Report ``cache``'s hits and misses (held weakly: a dropped cache stops being counted)."""
    _CACHES.add(cache)


def decrypt_failed(exc: BaseException) -> None:
    """Count one failed decryption, labelled by the error's class (never its message)."""
    DECRYPT_FAILURES.labels(type(exc).__name__).inc()


def dek_refreshed(ok: bool) -> None:
    """Count one background refresh of a cached DEK."""
    DEK_REFRESHES.labels("ok" if ok else "failed").inc()


def rotation_completed(scope: str, seconds: float | None) -> None:
    """Count a completed DEK rotation and observe its duration."""
    ROTATIONS_COMPLETED.labels(scope_label(scope)).inc()
    if seconds is not None and seconds >= 0:
        ROTATION_SECONDS.labels(scope_label(scope)).observe(seconds)


OTHER_SCOPES = "(other)"
"""The ``scope`` label of the rows of every scope beyond ``KEYROTOR_ROWS_METRIC_MAX_SCOPES``."""


async def refresh_rows_per_version(
    sessions: async_sessionmaker[AsyncSession], *, max_scopes: int = 200
) -> int:
    """Recount rows per (scope, DEK version) of the ``secrets`` table into the gauge.

    One grouped query over the table (no index holds ``dek_version``: migration 0013). The
    ``max_scopes`` scopes with the most rows get a series per version; the others are summed per version under
    ``scope="(other)"``, which bounds the gauge's cardinality with a scope per tenant. Versions
    that no longer have rows disappear from the gauge. Returns how many series were set.
    """
    async with sessions() as session:
        groups = await store.secrets_per_version(session)
        totals: dict[int, int] = {}
        for scope_id, _version, n in groups:
            totals[scope_id] = totals.get(scope_id, 0) + n
        shown = sorted(totals, key=lambda sid: (-totals[sid], sid))[:max_scopes]
        names = await store.scope_names(session, shown) if shown else {}
    series: dict[tuple[str, str], int] = {}
    for scope_id, version, n in groups:
        name = names.get(scope_id)
        key = (OTHER_SCOPES if name is None else scope_label(name), str(version))
        series[key] = series.get(key, 0) + n
    ROWS_PER_VERSION.clear()
    for (scope, version), n in series.items():
        ROWS_PER_VERSION.labels(scope, version).set(n)
    return len(series)


async def refresh_unregistered_locations(sessions: async_sessionmaker[AsyncSession]) -> int:
    """Count the unregistered locations (keyrotor.census.report) into ``keyrotor_unregistered_locations``."""
    async with sessions() as session:
        n = len(await census.unregistered_locations(session))
    UNREGISTERED_LOCATIONS.set(n)
    return n
