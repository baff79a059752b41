"""How many values each DEK has encrypted: counted in memory, added to the database in batches.

A DEK may encrypt only so many values with random 96-bit nonces (``KEYROTOR_MAX_ENCRYPTIONS_PER_DEK``,
default 2**30, well under the 2**32 bound), so a scope rotates early once its active DEK reaches
its limit. Counting must cost the encrypt path nothing: :meth:`UsageCounter.add` is one dict
update; a background task adds the counts to ``data_keys.encryptions`` every
``KEYROTOR_USAGE_FLUSH_INTERVAL_SECONDS`` and at close, in one statement for every key.

A flush that brings an active DEK to its limit also sets its scope's ``next_rotation_at`` to now
(if it was later), so the scheduler finds the scope through its index on ``next_rotation_at``,
like any other due scope, and never has to scan the usage counters.

The same counter keeps the census of where values live (:mod:`keyrotor.locations`): the first
encrypt of a process to a (scope, DEK version, location) writes its ``key_locations`` row and
commits before the ciphertext is returned (:meth:`UsageCounter.record`); every later one is a
dict update (:meth:`UsageCounter.count`), and the per-location counts go to
``key_locations.encryptions``/``last_seen`` with the same flush. The per-process set of seen
locations is bounded (``SEEN_MAX``); evicting one only costs a repeat write.

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
from typing import Any

import structlog
from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from keyrotor.locations import RECORD_SQL
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

# Per-location counts, batched. An upsert, so a row that was evicted from (or never entered) the
# seen set still lands; rows are taken in key order so concurrent flushes never deadlock, and a
# scope deleted meanwhile drops its counts instead of failing every flush.
_ADD_LOCATIONS = text(
    "INSERT INTO key_locations AS k (scope_id, dek_version, location, encryptions) "
    "SELECT u.sid, u.ver, u.loc, u.n FROM unnest(CAST(:sids AS bigint[]), CAST(:vers AS int[]), "
    "CAST(:locs AS text[]), CAST(:ns AS bigint[])) AS u(sid, ver, loc, n) "
    "JOIN key_scopes s ON s.id = u.sid ORDER BY u.sid, u.ver, u.loc "
    "ON CONFLICT (scope_id, dek_version, location) DO UPDATE "
    "SET encryptions = k.encryptions + excluded.encryptions, last_seen = now()"
)

SEEN_MAX = 65_536
"""Locations a process remembers as recorded; the oldest is forgotten first."""

Located = tuple[int, int, str]
"""``(scope id, DEK version, location)``."""

_NO_LAST = (0, 0, "", -2)  # str.rfind never returns -2


class UsageCounter:
    """Encryptions per ``(scope id, DEK version)`` and per location since the last flush, and
    the locations this process has recorded (:meth:`count`, :meth:`record`).

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
        # Recorded locations (the seen set, in insertion order) -> encryptions since the last
        # flush, not yet split into data_keys and key_locations counts (see _split).
        self._located: dict[Located, int] = {}
        self._loc_counts: dict[Located, int] = {}  # key_locations counts waiting for a flush
        self._recording: dict[Located, asyncio.Task[None]] = {}
        # The location count_context counted last (with the index of its context's last ':')
        # and its encryptions since; the sentinel matches no context.
        self._last: tuple[int, int, str, int] = _NO_LAST
        self._last_n = 0
        self._task: asyncio.Task[None] | None = None
        self._lock = asyncio.Lock()

    def add(self, scope_id: int, version: int, n: int = 1) -> None:
        """Count ``n`` encryptions under DEK ``version`` of the scope (no I/O)."""
        key = (scope_id, version)
        self._counts[key] = self._counts.get(key, 0) + n

    def count(self, scope_id: int, version: int, location: str, n: int = 1) -> bool:
        """Count ``n`` encryptions to ``location`` (no I/O) if this process recorded it already.

        Returns False when the location is new to this process: the caller must then
        ``await record(...)`` before it hands out the ciphertext.
        """
        key = (scope_id, version, location)
        seen = self._located.get(key)
        if seen is None:
            return False
        self._located[key] = seen + n
        return True

    def count_context(self, scope_id: int, version: int, context: str) -> str | None:
        """Count one encryption sealed with ``context`` (no I/O) if its location is recorded.

        The encrypt path's form of :meth:`count`: returns None when counted, else the location
        (new to this process) the caller must ``await record(...)`` before it hands out the
        ciphertext.
        """
        # Runs on every encrypt (bench_keymanager measures it). Encrypts of a process mostly go
        # to the location of the previous one: that case builds no string and no key.
        last = self._last
        if (
            context.rfind(":") == last[3]
            and scope_id == last[0]
            and version == last[1]
            and context.startswith(last[2])
        ):
            self._last_n += 1
            return None
        head, sep, _ = context.rpartition(":")  # location_of, inlined
        key = (scope_id, version, head if sep else context)
        self._fold_last()  # first: ``key`` may be the last one (``abc`` after ``abc:1``)
        seen = self._located.get(key)
        if seen is None:
            return key[2]
        self._located[key] = seen + 1
        if sep:  # a context without ':' is its own location: a prefix test would not do
            self._last = (scope_id, version, head, len(head))
        return None

    def _fold_last(self) -> None:
        """Add the fast path's count to its location's."""
        n, self._last_n = self._last_n, 0
        if n:
            key = self._last[:3]
            if key in self._located:
                self._located[key] += n
            else:
                self._split_one(key, n)

    async def record(self, scope_id: int, version: int, location: str, n: int = 1) -> None:
        """First sighting of a location: write its ``key_locations`` row, commit, count ``n``.

        Concurrent first sightings of the same location share one write.

        Raises:
            StoreUnavailable: the database is unavailable (nothing was counted).
        """
        key = (scope_id, version, location)
        task = self._recording.get(key)
        if task is None:
            task = asyncio.get_running_loop().create_task(self._write_first(key))
            self._recording[key] = task

            def done(t: asyncio.Task[None]) -> None:
                self._recording.pop(key, None)
                if not t.cancelled():
                    t.exception()  # the callers got it (or were cancelled): not "never retrieved"

            task.add_done_callback(done)
        await asyncio.shield(task)
        if not self.count(scope_id, version, location, n):  # forgotten already: count it anyway
            self._remember(key, n)

    async def _write_first(self, key: Located) -> None:
        async with db.transaction(self._sessions()) as session:
            await session.execute(RECORD_SQL, {"s": key[0], "v": key[1], "l": key[2]})
        self._remember(key, 0)

    def _remember(self, key: Located, n: int) -> None:
        located = self._located
        if key not in located:
            self._fold_last()
            while len(located) >= SEEN_MAX:
                old = next(iter(located))
                self._split_one(old, located.pop(old))
                if old == self._last[:3]:
                    self._last = _NO_LAST
        located[key] = located.get(key, 0) + n

    def _split_one(self, key: Located, n: int) -> None:
        if n:
            ver = key[:2]
            self._counts[ver] = self._counts.get(ver, 0) + n
            self._loc_counts[key] = self._loc_counts.get(key, 0) + n

    def _split(self) -> None:
        """Move the counts of the seen locations into the two batches the flush writes."""
        self._fold_last()
        located = self._located
        for key, n in located.items():
            if n:
                self._split_one(key, n)
                located[key] = 0

    @property
    def pending(self) -> dict[tuple[int, int], int]:
        """Counts not flushed yet (a copy)."""
        self._split()
        return dict(self._counts)

    @property
    def pending_locations(self) -> dict[Located, int]:
        """Per-location counts not flushed yet (a copy)."""
        self._split()
        return dict(self._loc_counts)

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
            self._split()
            lost = sum(self._counts.values())
            self._counts.clear()
            self._loc_counts.clear()
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
        """Add the counts to ``data_keys.encryptions`` and ``key_locations``; mark scopes whose
        active DEK reached its limit as due now. Returns those ``(scope, version)``.

        Raises:
            StoreUnavailable: the database is unavailable (the counts are kept for next time).
        """
        async with self._lock:
            self._split()
            counts, self._counts = self._counts, {}
            locs, self._loc_counts = self._loc_counts, {}
            try:
                totals = await self._add(counts)
            except BaseException:
                self._restore(counts, locs)
                raise
            try:
                await self._add_locations(locs)
            except BaseException:
                self._restore({}, locs)
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

    def _restore(self, counts: dict[tuple[int, int], int], locs: dict[Located, int]) -> None:
        """Keep counts a failed flush did not write for the next one."""
        for ver, n in counts.items():
            self._counts[ver] = self._counts.get(ver, 0) + n
        for key, n in locs.items():
            self._loc_counts[key] = self._loc_counts.get(key, 0) + n

    async def _add(self, counts: dict[tuple[int, int], int]) -> list[Any]:
        if not counts:
            return []
        keys = sorted(counts)
        async with db.transaction(self._sessions()) as session:
            return list(
                (
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
            )

    async def _add_locations(self, locs: dict[Located, int]) -> None:
        # A transaction of its own, after the data_keys one: never holds both kinds of row lock.
        if not locs:
            return
        keys = sorted(locs)
        async with db.transaction(self._sessions()) as session:
            await session.execute(
                _ADD_LOCATIONS,
                {
                    "sids": [k[0] for k in keys],
                    "vers": [k[1] for k in keys],
                    "locs": [k[2] for k in keys],
                    "ns": [locs[k] for k in keys],
                },
            )
