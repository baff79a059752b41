"""What every remote KEK call goes through: rate budget, circuit breaker, timeout, retries, metrics.

One :class:`Resilience` per provider endpoint (the Secrets Manager provider has one per region, so
an outage of the primary region does not open the breaker of its failover region). A call::

    circuit breaker  ->  rate budget  ->  per-attempt timeout  ->  the request
         ^                                                          |
         '---- retry with jittered exponential backoff (tenacity) on a transient failure

- Transient failures (throttling, 5xx, connection errors, timeouts) become
  :class:`~keyrotor.errors.KekUnavailable` and are retried; permanent ones (access denied,
  invalid ciphertext, disabled or deleted key, context mismatch) become
  :class:`~keyrotor.errors.KekError` and are not. Each provider supplies the translation of its
  client's exceptions (a :data:`Translator`); the messages name the provider and the cause and
  never contain key bytes, plaintext or wrapped DEKs.
- The circuit breaker opens after ``breaker_threshold`` consecutive transient failures: for
  ``breaker_cooldown_s`` every call fails at once with :class:`CircuitOpen` (a
  ``KekUnavailable``) without a request. Then it is half-open: one probe request goes through;
  its success closes the circuit, its failure opens it for another cool-down. A permanent error
  proves the provider answers, so it counts as a success for the breaker.
- The rate budget (a :class:`CallBudget`) is spent once per attempt, just before its request is
  sent: a call that is retried three times spends four units, so the budget counts requests
  the provider receives, which is what its quota counts. A circuit that fails fast spends none.
  KMS request quotas are per account and region, shared by every process and provider using
  them: the worker passes one :class:`~keyrotor.kek.budget.SharedRateBudget` (in Redis) to every
  provider; in one process an :class:`aiolimiter.AsyncLimiter` does. A budget that cannot be
  read (:class:`~keyrotor.errors.QueueUnavailable`: Redis is down) sends nothing and is not
  retried here: the budget retries its own round trips, and the job retries later.
- Non-idempotent operations (KMS ``RotateKeyOnDemand``, transit ``rotate``) are called with
  ``retry=False``: a timed-out request may have been carried out, and a blind retry would rotate
  twice.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Protocol, TypeVar

import structlog
from aiolimiter import AsyncLimiter
from tenacity import AsyncRetrying, retry_if_exception, stop_after_attempt, wait_random_exponential

from keyrotor.errors import (
    ConfigurationError,
    KekUnavailable,
    KeyrotorError,
    QueueUnavailable,
    TransientError,
)
from keyrotor.kek.budget import SharedRateBudget, Slot
from keyrotor.kek.metrics import AttemptOutcome, CallObserver, CallOutcome, CircuitState, PrometheusObserver

T = TypeVar("T")

log = structlog.get_logger("keyrotor.kek.resilience")


class CallBudget(Protocol):
    """A rate budget :class:`Resilience` spends one unit of before each request it sends: an
    :class:`aiolimiter.AsyncLimiter` (one process) or a
    :class:`~keyrotor.kek.budget.SharedRateBudget` (every worker of a queue)."""

    async def acquire(self) -> object:
        """Wait until one unit is ours (a shared budget returns the seconds waited)."""
        ...


@dataclass(frozen=True)
class Concealed:
    """A translation to raise with neither cause nor context: the client's exception quotes the
    request's parameters (botocore's ParamValidationError), which can be a DEK or key material,
    and a cause is printed with every traceback that shows the error."""

    error: KeyrotorError


Translator = Callable[[BaseException, str], KeyrotorError | Concealed | None]
"""Maps a client exception raised during ``operation`` to a keyrotor error (chained to it, or
:class:`Concealed`), or None if unknown.

Unknown exceptions (programming errors) propagate unchanged and are not retried.
"""


class Throttled(KekUnavailable):
    """The KEK provider throttled the request (rate quota exceeded)."""


class CircuitOpen(KekUnavailable):
    """The KEK provider failed repeatedly; calls fail fast until its cool-down ends."""


@dataclass(frozen=True)
class ResiliencePolicy:
    """Timeouts, retries, circuit breaker and rate budget of one provider.

    ``rate_limit`` requests per ``rate_period_s`` (None: no client-side budget). The defaults
    suit a worker; tests shrink them.
    """

    timeout_s: float = 5.0
    max_attempts: int = 4
    backoff_initial_s: float = 0.1
    backoff_max_s: float = 2.0
    breaker_threshold: int = 5
    breaker_cooldown_s: float = 30.0
    rate_limit: float | None = None
    rate_period_s: float = 1.0

    def __post_init__(self) -> None:
        positive = {
            "timeout_s": self.timeout_s,
            "backoff_max_s": self.backoff_max_s,
            "breaker_cooldown_s": self.breaker_cooldown_s,
            "rate_period_s": self.rate_period_s,
        }
        for name, value in positive.items():
            if value <= 0:
                raise ConfigurationError(f"resilience policy: {name} must be > 0, got {value}")
        if self.max_attempts < 1 or self.breaker_threshold < 1:
            raise ConfigurationError("resilience policy: max_attempts and breaker_threshold must be >= 1")
        if self.backoff_initial_s < 0:
            raise ConfigurationError("resilience policy: backoff_initial_s must be >= 0")
        if self.rate_limit is not None and self.rate_limit <= 0:
            raise ConfigurationError(f"resilience policy: rate_limit must be > 0, got {self.rate_limit}")

    def new_limiter(self) -> AsyncLimiter | None:
        """A fresh limiter for this policy's budget (None if it has none)."""
        if self.rate_limit is None:
            return None
        return AsyncLimiter(self.rate_limit, self.rate_period_s)


class CircuitBreaker:
    """Closed -> open after ``threshold`` consecutive transient failures -> half-open after
    ``cooldown_s`` (one probe at a time) -> closed on the probe's success, open on its failure.

    Not thread-safe: use it from one event loop.
    """

    def __init__(
        self,
        name: str,
        *,
        threshold: int,
        cooldown_s: float,
        clock: Callable[[], float] = time.monotonic,
        on_change: Callable[[CircuitState], None] | None = None,
    ) -> None:
        self.name = name
        self.threshold = threshold
        self.cooldown_s = cooldown_s
        self._clock = clock
        self._on_change = on_change
        self._state: CircuitState = "closed"
        self._failures = 0
        self._opened_at = 0.0
        self._probe_in_flight = False

    @property
    def state(self) -> CircuitState:
        return self._state

    @property
    def consecutive_failures(self) -> int:
        return self._failures

    def _set(self, state: CircuitState) -> None:
        if state != self._state:
            self._state = state
            if self._on_change is not None:
                self._on_change(state)

    def acquire(self) -> bool:
        """Let a call through or raise :class:`CircuitOpen`. Returns True if it is the half-open probe."""
        if self._state == "closed":
            return False
        if self._state == "open":
            remaining = self._opened_at + self.cooldown_s - self._clock()
            if remaining > 0:
                raise CircuitOpen(
                    f"{self.name}: circuit open after {self._failures} consecutive transient failures, "
                    f"failing fast for another {remaining:.1f}s"
                )
            self._set("half_open")
        if self._probe_in_flight:
            raise CircuitOpen(f"{self.name}: circuit half-open, waiting for the probe request to finish")
        self._probe_in_flight = True
        return True

    def record_success(self, probe: bool) -> None:
        """The provider answered (with a result or a permanent error)."""
        if probe:
            self._probe_in_flight = False
        self._failures = 0
        self._set("closed")

    def record_failure(self, probe: bool) -> None:
        """A transient failure (timeout, throttling, 5xx, connection error)."""
        if probe:
            self._probe_in_flight = False
        self._failures += 1
        if self._state == "half_open" or self._failures >= self.threshold:
            self._opened_at = self._clock()
            self._set("open")

    def abandon(self, probe: bool) -> None:
        """The call ended without an answer either way (cancelled, or a local bug)."""
        if probe:
            self._probe_in_flight = False


def _retryable(exc: BaseException) -> bool:
    # Only the provider's own transient failures: not an open circuit (failing fast is its
    # point), nor a budget that Redis cannot serve (it retried already; nothing was sent).
    return isinstance(exc, KekUnavailable) and not isinstance(exc, CircuitOpen)


class Resilience:
    """Runs a provider's requests under its policy. See the module docstring.

    Args:
        provider: the provider name for metrics (``aws-kms``, ``aws-sm``, ``vault``).
        target: what messages name, e.g. ``aws-sm (eu-west-1)``; defaults to ``provider``.
        policy: timeouts, retries, breaker and rate budget.
        translate: maps the client's exceptions to keyrotor errors.
        limiter: a rate budget shared with other providers (spent once per attempt); default: a
            new one from ``policy``.
        observer: metrics hooks; default: :class:`~keyrotor.kek.metrics.PrometheusObserver`.
    """

    def __init__(
        self,
        provider: str,
        policy: ResiliencePolicy,
        translate: Translator,
        *,
        target: str | None = None,
        limiter: CallBudget | None = None,
        observer: CallObserver | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.provider = provider
        self.target = target or provider
        self.policy = policy
        self._translate = translate
        self.limiter: CallBudget | None = limiter if limiter is not None else policy.new_limiter()
        self.observer: CallObserver = observer if observer is not None else PrometheusObserver()
        self._clock = clock
        self.breaker = CircuitBreaker(
            self.target,
            threshold=policy.breaker_threshold,
            cooldown_s=policy.breaker_cooldown_s,
            clock=clock,
            on_change=lambda state: self.observer.circuit_changed(provider, state),
        )

    async def call(self, operation: str, fn: Callable[[], Awaitable[T]], *, retry: bool = True) -> T:
        """Run ``fn`` (one request) with rate budget, breaker, timeout and retries.

        Every attempt spends one unit of the rate budget before its request is sent.

        Args:
            operation: the operation name for metrics and messages (``encrypt``, ``rewrap``, …).
            fn: makes a fresh request each time it is called.
            retry: False for non-idempotent operations (one attempt only).

        Returns:
            What ``fn`` returns.

        Raises:
            KekUnavailable: transient failure after the retries (:class:`Throttled`, :class:`CircuitOpen`).
            KekError: the provider refused the request.
            QueueUnavailable: the shared rate budget cannot be read (nothing was sent).
        """
        retrying = AsyncRetrying(
            stop=stop_after_attempt(self.policy.max_attempts if retry else 1),
            wait=wait_random_exponential(
                multiplier=self.policy.backoff_initial_s, max=self.policy.backoff_max_s
            ),
            retry=retry_if_exception(_retryable),
            reraise=True,
        )
        started = self._clock()
        outcome: CallOutcome = "error"
        try:
            result: T = await retrying(self._attempt, operation, fn)
            outcome = "ok"
            return result
        except CircuitOpen:
            outcome = "circuit_open"
            raise
        except QueueUnavailable:
            outcome = "no_budget"
            raise
        except TransientError:
            outcome = "unavailable"
            raise
        finally:
            self.observer.call_finished(self.provider, operation, outcome, self._clock() - started)

    async def _spend(self, limiter: CallBudget, operation: str) -> None:
        """Spend one unit of ``limiter`` for a request about to be sent."""
        slot: Slot | None = None
        if isinstance(limiter, SharedRateBudget):
            slot = await limiter.acquire_slot()
        else:
            await limiter.acquire()
        # The moment the request is let through (``at``, this process's clock) and, from a shared
        # budget, the slot Redis granted it (``slot_at``, Redis's clock): what the two-worker
        # budget test reads (debug level, so nothing is logged by default).
        log.debug(
            "kek_budget_spent",
            provider=self.provider,
            operation=operation,
            units=1,
            waited_s=0.0 if slot is None else round(slot.wait_s, 4),
            slot_at=None if slot is None else slot.starts_at,
            at=time.time(),
        )

    async def _attempt(self, operation: str, fn: Callable[[], Awaitable[T]]) -> T:
        probe = self.breaker.acquire()
        settled = False
        concealed: KeyrotorError | None = None
        try:
            if self.limiter is not None:
                await self._spend(self.limiter, operation)
            try:
                async with asyncio.timeout(self.policy.timeout_s):
                    result = await fn()
            except KeyrotorError as err:
                settled = self._settle(operation, err, probe)
                raise
            except TimeoutError as exc:
                timeout = KekUnavailable(
                    f"{self.target} {operation}: no answer within {self.policy.timeout_s:g}s"
                )
                settled = self._settle(operation, timeout, probe, timed_out=True)
                raise timeout from exc
            except Exception as exc:
                translated = self._translate(exc, operation)
                if translated is None:
                    raise
                if not isinstance(translated, Concealed):
                    settled = self._settle(operation, translated, probe)
                    raise translated from exc
                concealed = translated.error
            if concealed is not None:
                # Raised here, after the except block: `from None` would still keep the client's
                # exception as __context__, reachable by anything that walks the chain.
                settled = self._settle(operation, concealed, probe)
                raise concealed
            self.breaker.record_success(probe)
            settled = True
            return result
        finally:
            if not settled:
                self.breaker.abandon(probe)

    def _settle(self, operation: str, err: KeyrotorError, probe: bool, *, timed_out: bool = False) -> bool:
        outcome: AttemptOutcome
        if isinstance(err, TransientError):
            self.breaker.record_failure(probe)
            outcome = "timeout" if timed_out else "throttled" if isinstance(err, Throttled) else "unavailable"
        else:
            self.breaker.record_success(probe)
            outcome = "error"
        self.observer.attempt_failed(self.provider, operation, outcome)
        return True
