"""How many values each DEK has encrypted: counted in memory, added to the database in batches.

A DEK may encrypt only so many values with random 96-bit nonces (``KEYROTOR_MAX_ENCRYPTIONS_PER_DEK``,
default 2**30, well under the 2**32 bound), so a scope rotates early once its active DEK reaches
its limit. Counting must cost the encrypt path nothing: :meth:`UsageCounter.add` is one dict
update; a background task adds the counts to ``data_keys.encryptions`` every
``KEYROTOR_USAGE_FLUSH_INTERVAL_SECONDS`` and at close, in one statement for every key.

A flush that brings an active DEK to its limit also sets its scope's ``next_rotation_at`` to now
(if it was later), so the scheduler finds the scope through its index on ``next_rotation_at``,
like any other due scope, and never has to scan the usage counters.

Counts of a process that dies between flushes are lost (at most one interval's worth): the limit
is a safety margin far below the real bound, not an exact quota. A rotation adds the rows it
re-encrypted to the new DEK's count in its completion transaction (:mod:`keyrotor.rotation`);
legacy migration counts through this counter like any encrypt.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable
from datetime import UTC, datetime

import structlog
from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from keyrotor.store import db

log = structlog.get_logger("keyrotor.usage")

# Rows are locked in id order, so two processes flushing overlapping keys never deadlock.
_ADD = text(
    "WITH u AS (SELECT * FROM unnest(CAST(:sids AS bigint[]), CAST(:vers AS int[]), CAST(:ns AS bigint[])) "
    "AS u(sid, ver, n)), "
    "locked AS (SELECT d.id, u.n, s.active_version = d.version AND s.rotation_enabled AS rotates, "
    "coalesce(s.max_encryptions, :default_max) AS lim "
    "FROM data_keys d JOIN u ON d.scope_id = u.sid AND d.version = u.ver "
    "JOIN key_scopes s ON s.id = d.scope_id ORDER BY d.id FOR UPDATE OF d) "
    "UPDATE data_keys d SET encryptions = d.encryptions + locked.n FROM locked WHERE d.id = locked.id "
    "RETURNING d.scope_id, d.version, d.encryptions, locked.rotates AND d.encryptions >= locked.lim"
)
# In a transaction of its own (after the counts committed): locking the scope row while holding
# data_keys rows could deadlock with a rotation, which locks them the other way round.
_MARK_DUE = text(
    "UPDATE key_scopes s SET next_rotation_at = :now, updated_at = now() "
    "FROM unnest(CAST(:sids AS bigint[]), CAST(:vers AS int[]), CAST(:ns AS bigint[])) AS u(sid, ver, n) "
    "WHERE s.id = u.sid AND s.active_version = u.ver AND s.rotation_enabled "
    "AND u.n >= coalesce(s.max_encryptions, :default_max) "
    "AND (s.next_rotation_at IS NULL OR s.next_rotation_at > :now) "
    "RETURNING s.name, s.active_version"
)


class UsageCounter:
    """Encryptions per ``(scope id, DEK version)`` since the last flush.

    Args:
        sessions: returns the session factory (called at flush time, so the counter can be
            built before the engine exists).
        default_max: the global limit (``KEYROTOR_MAX_ENCRYPTIONS_PER_DEK``).
        interval_s: seconds between background flushes.
    """

    def __init__(
        self,
        sessions: Callable[[], async_sessionmaker[AsyncSession]],
        *,
        default_max: int,
        interval_s: float,
    ) -> None:
        self._sessions = sessions
        self._default_max = default_max
        self._interval_s = interval_s
        self._counts: dict[tuple[int, int], int] = {}
        self._task: asyncio.Task[None] | None = None
        self._lock = asyncio.Lock()

    def add(self, scope_id: int, version: int, n: int = 1) -> None:
        """Count ``n`` encryptions under DEK ``version`` of the scope (no I/O)."""
        key = (scope_id, version)
        self._counts[key] = self._counts.get(key, 0) + n

    @property
    def pending(self) -> dict[tuple[int, int], int]:
        """Counts not flushed yet (a copy)."""
        return dict(self._counts)

    def start(self) -> None:
        """Start the background flush task (idempotent)."""
        if self._task is None or self._task.done():
            self._task = asyncio.get_running_loop().create_task(self._loop(), name="keyrotor-usage")

    async def close(self) -> None:
        """Stop the background task and flush what is left (an outage is logged, not raised)."""
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        try:
            await self.flush()
        except Exception as exc:
            lost = sum(self._counts.values())
            self._counts.clear()
            log.warning("usage_flush_failed_at_close", error=f"{type(exc).__name__}: {exc}", lost=lost)

    async def _loop(self) -> None:
        while True:
            await asyncio.sleep(self._interval_s)
            try:
                await self.flush()
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # an outage: the counts stay and go with the next flush
                log.warning("usage_flush_failed", error=f"{type(exc).__name__}: {exc}")

    async def flush(self, now: datetime | None = None) -> list[tuple[str, int]]:
        """Add the counts to ``data_keys.encryptions``; mark scopes whose active DEK reached
        its limit as due now. Returns those ``(scope, version)``.

        Raises:
            StoreUnavailable: the database is unavailable (the counts are kept for next time).
        """
        async with self._lock:
            counts, self._counts = self._counts, {}
            if not counts:
                return []
            keys = sorted(counts)
            try:
                async with db.transaction(self._sessions()) as session:
                    totals = (
                        await session.execute(
                            _ADD,
                            {
                                "sids": [k[0] for k in keys],
                                "vers": [k[1] for k in keys],
                                "ns": [counts[k] for k in keys],
                                "default_max": self._default_max,
                            },
                        )
                    ).all()
            except BaseException:
                for key, n in counts.items():  # keep them for the next flush
                    self._counts[key] = self._counts.get(key, 0) + n
                raise
            over = [(sid, ver, n) for sid, ver, n, at_limit in totals if at_limit]
            if not over:
                return []
            async with db.transaction(self._sessions()) as session:
                marked = (
                    await session.execute(
                        _MARK_DUE,
                        {
                            "sids": [o[0] for o in over],
                            "vers": [o[1] for o in over],
                            "ns": [o[2] for o in over],
                            "default_max": self._default_max,
                            "now": now or datetime.now(UTC),
                        },
                    )
                ).all()
        for scope, version in marked:
            log.info("dek_usage_limit_reached", scope=scope, version=version)
        return [(str(scope), int(version)) for scope, version in marked]
