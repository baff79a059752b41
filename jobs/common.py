"""What every job shares: its dependencies from ``ctx`` and retry with backoff.

Job ids and enqueueing live in :mod:`keyrotor.queue.enqueue`.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import asyncpg
import structlog
from arq.worker import Retry
from redis.exceptions import RedisError
from sqlalchemy import exc as sa_exc
from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession, async_sessionmaker

from keyrotor.errors import TransientError
from keyrotor.kek.base import KekProvider
from keyrotor.keys import KeyManager
from keyrotor.rotation.context import RotationContext
from keyrotor.settings import Settings

log = structlog.get_logger("jobs")

# Postgres errors that a later attempt may not meet (SQLSTATE classes 40 and 55P03).
_RETRYABLE_PG = (
    asyncpg.exceptions.DeadlockDetectedError,
    asyncpg.exceptions.SerializationError,
    asyncpg.exceptions.LockNotAvailableError,
)


@dataclass(frozen=True)
class Deps:
    """The worker's long-lived clients, put in ``ctx["deps"]`` by ``on_startup``."""

    settings: Settings
    engine: AsyncEngine
    sessions: async_sessionmaker[AsyncSession]
    kek: KekProvider
    km: KeyManager
    rc: RotationContext


def deps(ctx: dict[str, Any]) -> Deps:
    """The dependencies of a job."""
    d: Deps = ctx["deps"]
    return d


def is_transient(exc: BaseException) -> bool:
    """Whether retrying later may succeed (outages, deadlocks, lock timeouts)."""
    if isinstance(exc, (TransientError, RedisError, ConnectionError, *_RETRYABLE_PG)):
        return True
    return isinstance(exc, sa_exc.DBAPIError) and isinstance(exc.orig, _RETRYABLE_PG)


def retry(ctx: dict[str, Any], exc: BaseException) -> Retry:
    """``arq.Retry`` with jittered exponential backoff by ``ctx["job_try"]``."""
    settings = deps(ctx).settings
    base = settings.retry_backoff_s * 2 ** min(ctx.get("job_try", 1) - 1, 16)
    defer = min(settings.retry_backoff_max_s, base) * random.uniform(0.5, 1.0)
    log.warning("job_retry", error=f"{type(exc).__name__}: {exc}", defer_s=round(defer, 2))
    return Retry(defer=timedelta(seconds=defer))
