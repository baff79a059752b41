"""Prometheus metrics for KEK provider calls.

Labels are only ``provider`` (``aws-kms``, ``aws-sm``, ``vault``), ``operation`` (``encrypt``,
``decrypt``, ``rewrap``, ``rotate``, …) and ``outcome``; never key ids, scopes or anything derived
from key material, so the label sets stay small and nothing secret reaches a scrape.

``outcome`` of a call: ``ok``, ``unavailable`` (transient failure after the retries),
``error`` (permanent failure), ``circuit_open`` (failed fast, no request sent) or ``no_budget``
(the shared rate budget could not be read from Redis, no request sent). ``outcome`` of a
failed attempt: ``throttled``, ``timeout``, ``unavailable`` or ``error``.

:class:`PrometheusObserver` is the default :class:`CallObserver`; tests or an application with
another metrics system pass their own observer to :class:`keyrotor.kek.resilience.Resilience`.
"""

from __future__ import annotations

from typing import Literal, Protocol

from prometheus_client import Counter, Gauge, Histogram

CallOutcome = Literal["ok", "unavailable", "error", "circuit_open", "no_budget"]
AttemptOutcome = Literal["throttled", "timeout", "unavailable", "error"]
CircuitState = Literal["closed", "open", "half_open"]

KEK_CALLS = Counter(
    "keyrotor_kek_calls_total",
    "KEK provider calls (after retries), by outcome.",
    ["provider", "operation", "outcome"],
)
KEK_CALL_SECONDS = Histogram(
    "keyrotor_kek_call_duration_seconds",
    "Duration of KEK provider calls including retries and rate-budget waits.",
    ["provider", "operation", "outcome"],
    buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0),
)
KEK_ATTEMPT_FAILURES = Counter(
    "keyrotor_kek_attempt_failures_total",
    "Failed attempts of KEK provider calls, including attempts that were retried.",
    ["provider", "operation", "outcome"],
)
KEK_FAILOVERS = Counter(
    "keyrotor_kek_failovers_total",
    "Reads served by a failover region because the primary region was unavailable.",
    ["provider", "operation"],
)
KEK_CIRCUIT_OPEN = Gauge(
    "keyrotor_kek_circuit_open",
    "1 while a circuit breaker of the provider is open or half-open, else 0.",
    ["provider"],
)


class CallObserver(Protocol):
    """Receives one event per call, per failed attempt and per circuit-breaker change."""

    def call_finished(self, provider: str, operation: str, outcome: CallOutcome, seconds: float) -> None: ...

    def attempt_failed(self, provider: str, operation: str, outcome: AttemptOutcome) -> None: ...

    def circuit_changed(self, provider: str, state: CircuitState) -> None: ...

    def failed_over(self, provider: str, operation: str) -> None: ...


class PrometheusObserver:
    """Records the events in the module's prometheus_client metrics (the default registry)."""

    def call_finished(self, provider: str, operation: str, outcome: CallOutcome, seconds: float) -> None:
        KEK_CALLS.labels(provider, operation, outcome).inc()
        KEK_CALL_SECONDS.labels(provider, operation, outcome).observe(seconds)

    def attempt_failed(self, provider: str, operation: str, outcome: AttemptOutcome) -> None:
        KEK_ATTEMPT_FAILURES.labels(provider, operation, outcome).inc()

    def circuit_changed(self, provider: str, state: CircuitState) -> None:
        KEK_CIRCUIT_OPEN.labels(provider).set(0 if state == "closed" else 1)

    def failed_over(self, provider: str, operation: str) -> None:
        KEK_FAILOVERS.labels(provider, operation).inc()
