"""Prometheus metrics the library emits (prometheus_client's default registry).

Labels are bounded and never secret: ``scope`` (a validated identifier such as ``anthropic`` or
``tenant-42/openai``, checked by :func:`keyrotor.policy.check_scope` before any run exists),
``version`` (a DEK version number), ``reason`` (an error class name), ``region``. Never a key
id, a ciphertext, a value or anything derived from key material.

Defined elsewhere and served by the same registry: KEK provider calls, latency, errors and
circuit state (:mod:`keyrotor.kek.metrics`), and the audit queue (:mod:`keyrotor.audit_writer`).
The worker adds the arq queue depth and job outcomes (:mod:`worker.http`, :mod:`worker.main`).

The re-encryption rate is derived, not a gauge: ``rate(keyrotor_rows_reencrypted_total[1m])``
(a gauge sampled at scrape time would miss bursts between scrapes).
"""

from __future__ import annotations

import weakref
from collections.abc import Iterable, Iterator
from typing import Any

from prometheus_client import REGISTRY, Counter, Gauge, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector
from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from keyrotor.cache import DekCache

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
DECRYPT_FAILURES = Counter(
    "keyrotor_decrypt_failures_total",
    "Values that failed to decrypt (KeyManager.decrypt and rotation batches), by error class.",
    ["reason"],
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
    ROTATIONS_COMPLETED.labels(scope).inc()
    if seconds is not None and seconds >= 0:
        ROTATION_SECONDS.labels(scope).observe(seconds)


async def refresh_rows_per_version(sessions: async_sessionmaker[AsyncSession]) -> int:
    """Recount rows per (scope, DEK version) of the ``secrets`` table into the gauge.

    One grouped query over the indexed ``(scope_id, dek_version)``; versions that no longer
    have rows disappear from the gauge. Returns how many series were set.
    """
    async with sessions() as session:
        rows = (
            await session.execute(
                text(
                    "SELECT k.name, s.dek_version, count(*) FROM secrets s "
                    "JOIN key_scopes k ON k.id = s.scope_id GROUP BY k.name, s.dek_version"
                )
            )
        ).all()
    ROWS_PER_VERSION.clear()
    for scope, version, n in rows:
        ROWS_PER_VERSION.labels(scope, str(version)).set(n)
    return len(rows)
