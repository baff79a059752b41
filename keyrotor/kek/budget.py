"""One rate budget shared by every process on a Redis: GCRA, run atomically in Redis.

``KEYROTOR_KEK_CALLS_PER_SECOND`` is a KMS quota, and KMS quotas are per account and region:
every worker spends the same one. So the budget lives in Redis, under a key named after the
deployment's queue (``<KEYROTOR_QUEUE_NAME>:kek-budget``), and every worker process that shares
that Redis and queue name draws on it; two deployments on one Redis (different queue names)
have a budget each.

The algorithm is GCRA (the generic cell rate algorithm, a token bucket expressed as one
timestamp) with reservations. Redis keeps the *theoretical arrival time* (TAT): the moment the
budget is next free. ``acquire(n)`` runs one Lua script that reads Redis's own clock, takes the
slot ``start = max(TAT, now)``, moves TAT to ``start + n / rate`` and returns ``start - now``;
the caller sleeps that long and then makes its call. Consequences:

- It is a true rate, with no window boundary: acquisitions start at least ``n / rate`` seconds
  apart, so in any interval of ``T`` seconds they total at most ``rate * T`` plus the largest
  single acquisition (one unit for a single request to the provider). Idle time is not saved up: there is no
  burst after a pause.
- Fractional rates work as they read: ``0.5`` is one call every 2 s.
- Callers are served in the order Redis saw them (FIFO), whichever process they are in, and
  nobody polls: one round trip per acquisition.
- One clock: Redis's ``TIME``. Clocks of the worker machines may disagree; the schedule does not
  depend on them, only on the (sub-millisecond, on a LAN) difference of reply latencies. A
  reservation also says when its slot starts on that clock (:class:`Slot`): the callers log it,
  so the schedule every worker was given can be checked exactly, however late a busy process
  woke up to use its slot.
- A caller cancelled while it sleeps forfeits its slot: the budget is under-spent, never
  over-spent.
- Fail safe: when Redis cannot be reached after a few quick retries, :meth:`acquire` raises
  :class:`~keyrotor.errors.QueueUnavailable` (transient: the job retries with backoff). A call
  is never made without its budget. A reservation whose reply was lost is not retried into a
  double spend of the quota: the lost slot is simply unused.

Why not a library: ``aiolimiter`` (a leaky bucket) lives in one process's memory. ``limits``
(5.x) has Redis storage with async clients, but its exact strategy (moving window) keeps a log
stamped with each *client's* clock, admits a whole window's quota in one burst, has no "wait for
my turn" (only hit-or-refuse, so callers would poll and could starve) and takes whole numbers of
calls per whole seconds (``0.3``/s would have to become 3 per 10 s, a burst of 3); its fixed
window allows twice the rate across a boundary and its sliding window counter is an
approximation. The Redis-backed limiters on PyPI besides it are small 0.x projects. The script
below is 15 lines.
"""

from __future__ import annotations

import asyncio
import math
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any, Protocol

import structlog
from redis.asyncio import Redis
from redis.exceptions import RedisError

from keyrotor.errors import ConfigurationError, QueueUnavailable

log = structlog.get_logger("keyrotor.kek.budget")

# The highest rate: the schedule counts microseconds, so one unit must cost at least one.
MAX_RATE = 1_000_000.0

# KEYS[1]: the TAT, in microseconds of the Redis clock. ARGV[1]: microseconds one unit costs;
# ARGV[2]: units. Returns the microseconds the caller waits before its slot (0: at once) and
# the slot's start, in microseconds of the Redis clock (since the epoch).
# TIME in a script that writes is allowed since Redis 5 (scripts replicate by effects); the
# replicate_commands call makes Redis 3.2/4 do the same and is a no-op on newer servers.
_GCRA = """
if redis.replicate_commands then redis.replicate_commands() end
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000000 + tonumber(t[2])
local tat = tonumber(redis.call('GET', KEYS[1]) or '0')
if tat < now then tat = now end
local new_tat = tat + tonumber(ARGV[1]) * tonumber(ARGV[2])
-- A TAT in the past means a free budget: the key only needs to outlive new_tat (plus slack).
local ttl_ms = math.floor((new_tat - now) / 1000) + 1000
redis.call('SET', KEYS[1], string.format('%.0f', new_tat), 'PX', ttl_ms)
return {string.format('%.0f', tat - now), string.format('%.0f', tat)}
"""


def check_rate(rate: object, *, name: str = "KEYROTOR_KEK_CALLS_PER_SECOND") -> float:
    """``rate`` as a float if it is a usable budget (finite, > 0, <= :data:`MAX_RATE`).

    Raises:
        ConfigurationError: one line naming ``name`` and what is wrong.
    """
    if isinstance(rate, bool) or not isinstance(rate, int | float):
        raise ConfigurationError(f"{name} must be a number of calls a second, got {type(rate).__name__}")
    value = float(rate)
    if not math.isfinite(value) or value <= 0 or value > MAX_RATE:
        raise ConfigurationError(f"{name} must be a finite number above 0 and at most {MAX_RATE:.0f}")
    return value


@dataclass(frozen=True, slots=True)
class Slot:
    """A reservation of the budget.

    Attributes:
        starts_at: when the slot starts, in seconds since the epoch on Redis's clock (the one
            clock of the schedule; on Redis's own machine, the same as ``time.time()``).
        wait_s: how long the caller was told to wait for it, from Redis's reply.
    """

    starts_at: float
    wait_s: float


class RateBudget(Protocol):
    """A rate budget a :class:`~keyrotor.kek.throttle.ThrottledKek` spends."""

    @property
    def rate(self) -> float:
        """Units a second."""
        ...

    async def acquire(self, units: int = 1) -> float:
        """Wait until ``units`` of budget are ours; returns the seconds waited."""
        ...

    async def acquire_slot(self, units: int = 1) -> Slot:
        """Wait until ``units`` of budget are ours; returns the slot they were granted."""
        ...


class SharedRateBudget:
    """A rate budget shared by every process whose budget has the same ``key`` on one Redis.

    Args:
        redis: a redis-py asyncio client (the worker passes its arq pool).
        key: the Redis key of the budget (see :func:`kek_budget_key`).
        rate: units a second (finite, > 0); fractional rates are fine.
        attempts: tries of the Redis round trip before :class:`QueueUnavailable`.
        retry_delay_s: first pause between tries (doubles each time).
        sleep: how to wait (tests pass their own clock; default ``asyncio.sleep``).

    Raises:
        ConfigurationError: ``rate`` is not a usable budget.
    """

    def __init__(
        self,
        redis: Redis,
        key: str,
        rate: float,
        *,
        attempts: int = 3,
        retry_delay_s: float = 0.2,
        sleep: Callable[[float], Awaitable[Any]] = asyncio.sleep,
    ) -> None:
        self._rate = check_rate(rate)
        self.key = key
        self._unit_us = max(1, round(1_000_000 / self._rate))
        self._script = redis.register_script(_GCRA)
        self._attempts = max(1, attempts)
        self._retry_delay_s = retry_delay_s
        self._sleep = sleep

    def __repr__(self) -> str:
        return f"SharedRateBudget(key={self.key!r}, rate={self._rate})"

    @property
    def rate(self) -> float:
        """Units a second."""
        return self._rate

    async def reserve(self, units: int = 1) -> float:
        """Take the next slot of ``units`` and return how many seconds from now it starts.

        Raises:
            ValueError: ``units`` is below 1.
            QueueUnavailable: Redis could not be reached (nothing may be spent).
        """
        return (await self.reserve_slot(units)).wait_s

    async def reserve_slot(self, units: int = 1) -> Slot:
        """Take the next slot of ``units``: when it starts (Redis's clock) and how long to wait.

        Raises:
            ValueError: ``units`` is below 1.
            QueueUnavailable: Redis could not be reached (nothing may be spent).
        """
        if units < 1:
            raise ValueError(f"units must be at least 1, got {units}")
        delay = self._retry_delay_s
        for attempt in range(1, self._attempts + 1):
            try:
                wait_us, start_us = await self._script(keys=[self.key], args=[self._unit_us, units])
                wait_s = max(0.0, float(wait_us) / 1_000_000)
                return Slot(starts_at=float(start_us) / 1_000_000, wait_s=wait_s)
            except (RedisError, OSError) as exc:
                if attempt == self._attempts:
                    raise QueueUnavailable(
                        f"the shared KEK call budget ({self.key}) cannot be read from Redis: "
                        f"{type(exc).__name__}; no KEK call is made without it"
                    ) from exc
                log.warning("kek_budget_retry", attempt=attempt, error=type(exc).__name__)
                await self._sleep(delay)
                delay *= 2
        raise AssertionError("unreachable")  # pragma: no cover

    async def acquire(self, units: int = 1) -> float:
        """Wait for ``units`` of the budget; returns the seconds waited.

        Raises:
            QueueUnavailable: Redis could not be reached (transient; the call must not be made).
        """
        return (await self.acquire_slot(units)).wait_s

    async def acquire_slot(self, units: int = 1) -> Slot:
        """Wait for ``units`` of the budget; returns the slot they were granted.

        Raises:
            QueueUnavailable: Redis could not be reached (transient; the call must not be made).
        """
        slot = await self.reserve_slot(units)
        if slot.wait_s > 0:
            await self._sleep(slot.wait_s)
        return slot


def kek_budget_key(queue_name: str) -> str:
    """The Redis key of a deployment's KEK call budget (one per ``KEYROTOR_QUEUE_NAME``)."""
    return f"{queue_name}:kek-budget"
