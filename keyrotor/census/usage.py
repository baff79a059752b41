"""How many values each DEK may still encrypt: reserved in blocks before use; and the census.

AES-GCM with random 96-bit nonces must not encrypt more than 2**32 values under one key (NIST
SP 800-38D). Two limits keep every DEK well below that:

- the **limit** (``KEYROTOR_MAX_ENCRYPTIONS_PER_DEK``, default 2**30, at most 2**31; a scope's
  ``max_encryptions`` overrides it): once the active DEK reaches it, its scope is made due now
  (``next_rotation_at``), so the scheduler rotates it like any other due scope;
- the **hard stop**: an encrypt that would go past it raises :class:`~keyrotor.errors.KeyExhausted`.
  With rotation disabled it is the limit itself (nothing would ever replace the key); with
  rotation enabled it is twice the limit, at most :data:`HARD_CEILING` (2**31), which leaves
  the rotation that the limit started time to finish without refusing anyone.

At the hard stop encrypt refuses rather than move to a new DEK: creating and promoting DEKs is
the worker's job (the application role may insert only a scope's first key, and a DEK made by
the application would skip the replication, audit and announcement a rotation does), and a
refusal that says "rotate" is a state an operator can see and fix; a key silently replaced by
whichever process got there first is not.

Accounting errs on the safe side: ``data_keys.encryptions`` counts encryptions *reserved*, not
made. A process reserves a block in one ``UPDATE ... RETURNING`` (16 encryptions at first,
doubling to :data:`BLOCK_MAX`, never more than a quarter of what is left before the hard stop,
so one process cannot take the last encryptions from the others) and encrypts only within its
reservations; the encrypt path pays one integer decrement (:meth:`UsageCounter.take`) and a
database round trip once a block. What a process does not use, because it stops or crashes,
stays counted: the column never decreases (migration ``0007_usage_guards``), and the loss is at
most one block per process and DEK.

The same counter keeps the census of where values live (:mod:`keyrotor.census.locations`): the first
encrypt of a process to a (scope, DEK version, location) writes its ``key_locations`` row, with
its own count, and commits before the ciphertext is returned (:meth:`UsageCounter.record`), so a
process that dies before its next flush leaves no location holding values at 0; every later one is a
dict update (:meth:`UsageCounter.count`), and the per-location counts go to
``key_locations.encryptions``/``last_seen`` every ``KEYROTOR_USAGE_FLUSH_INTERVAL_SECONDS`` and
at close (a process that dies loses at most one interval of these counts: they describe where
values are, they do not bound anything). The per-process set of seen locations is bounded
(``SEEN_MAX``); evicting one only costs a repeat write. A rotation adds the rows it re-encrypted
to the new DEK's count in its completion transaction (:mod:`keyrotor.rotation.dek`).
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import Callable
from datetime import UTC, datetime

import structlog
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from keyrotor.errors import KeyExhausted, KeyVersionUnknown
from keyrotor.store import census as store
from keyrotor.store import db

log = structlog.get_logger("keyrotor.census.usage")

HARD_CEILING = 2**31
"""No DEK ever encrypts more values than this (half of NIST's 2**32 bound for random nonces)."""
BLOCK_FIRST = 16
"""The first block a process reserves for a DEK; each next one doubles, up to BLOCK_MAX."""
# A reservation is a transaction: blocks must be large enough that its cost, shared by the
# encrypts of a block, stays negligible next to an encrypt. A process that dies wastes at most
# one block, 1/16,384 of 2**30.
BLOCK_MAX = 65_536

SEEN_MAX = 65_536
"""Locations a process remembers as recorded; the oldest is forgotten first."""

CLOSE_WAIT_S = 10.0
"""How long ``close()`` waits for a flush under way before it cancels it."""

Located = tuple[int, int, str]
"""``(scope id, DEK version, location)``."""

_NO_LAST = (0, 0, "", -2)  # str.rfind never returns -2


class UsageCounter:
    """Encryptions this process reserved per ``(scope id, DEK version)`` and has not made yet
    (:meth:`take`, :meth:`acquire`); encryptions per location since the last flush, and the
    locations this process has recorded (:meth:`count`, :meth:`record`).

    Args:
        sessions: returns the session factory (called at flush time, so the counter can be
            built before the engine exists).
        default_max: the global limit (``KEYROTOR_MAX_ENCRYPTIONS_PER_DEK``).
        interval_s: seconds between background flushes of the per-location counts.
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
        self._left: dict[tuple[int, int], int] = {}  # reserved, not used yet
        self._block: dict[tuple[int, int], int] = {}  # the next block to ask for
        self._reserving: dict[tuple[int, int], asyncio.Lock] = {}
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
        self._stopping = asyncio.Event()
        self._lock = asyncio.Lock()

    def take(self, scope_id: int, version: int) -> bool:
        """Use one reserved encryption of DEK ``version`` (no I/O). False when none is left: the
        caller must then ``await acquire(...)`` before it encrypts."""
        key = (scope_id, version)
        left = self._left.get(key, 0)
        if left:
            self._left[key] = left - 1
            return True
        return False

    async def acquire(self, scope_id: int, version: int, n: int = 1, *, scope: str = "") -> None:
        """Use ``n`` encryptions of DEK ``version``, reserving a block in the database if this
        process has fewer than ``n`` left. Concurrent callers of one process share the round trip.

        Raises:
            KeyExhausted: the DEK reached its hard stop (nothing was used).
            KeyVersionUnknown: the DEK cannot take new values (destroyed, retired, or gone).
            StoreUnavailable: the database is unavailable (nothing was used).
        """
        key = (scope_id, version)
        lock = self._reserving.get(key)
        if lock is None:
            lock = self._reserving[key] = asyncio.Lock()
        async with lock:
            left = self._left.get(key, 0)
            if left < n:
                left += await self._reserve(key, n - left, scope)
            self._left[key] = left - n

    @property
    def reserved(self) -> dict[tuple[int, int], int]:
        """Encryptions reserved and not used yet, per ``(scope id, DEK version)`` (a copy)."""
        return {k: n for k, n in self._left.items() if n}

    async def _reserve(self, key: tuple[int, int], need: int, scope: str) -> int:
        """Reserve at least ``need`` encryptions of ``key`` in the database; returns how many."""
        want = self._block.get(key, BLOCK_FIRST)
        async with db.transaction(self._sessions()) as session:
            row = await store.reserve_encryptions(
                session,
                key[0],
                key[1],
                need=need,
                want=max(want, need),
                default_max=self._default_max,
                ceiling=HARD_CEILING,
            )
        name = scope or f"scope id {key[0]}"
        if row is None:
            raise KeyVersionUnknown(f"{name}: DEK v{key[1]} cannot encrypt new values")
        got, total, lim, hard, rotates = row
        self._block[key] = min(want * 2, BLOCK_MAX)
        if rotates and total >= lim:
            await self._mark_due(key)
        if got < need:
            log.warning("dek_exhausted", scope=name, version=key[1], encryptions=total, hard_stop=hard)
            raise KeyExhausted(
                f"{name}: DEK v{key[1]} has made {total:,} of at most {hard:,} encryptions "
                f"(limit {lim:,}): rotate the scope (`keyrotor rotate {scope or '<scope>'}`)"
            )
        return got

    async def _mark_due(self, key: tuple[int, int]) -> None:
        """The active DEK reached its limit: make its scope due now (once; an outage is logged,
        and the next reservation tries again).

        In a transaction of its own, after the reservation committed: locking the scope row while
        holding the data_keys row could deadlock with a rotation, which locks them the other way round.
        """
        try:
            async with db.transaction(self._sessions()) as session:
                marked = await store.mark_scope_due(session, key[0], key[1], datetime.now(UTC))
        except Exception as exc:
            log.warning("usage_mark_due_failed", error=f"{type(exc).__name__}: {exc}")
            return
        if marked is not None:
            log.info("dek_usage_limit_reached", scope=marked, version=key[1])

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
        # Runs on every encrypt, so it must stay cheap. Encrypts of a process mostly go
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
        """First sighting of a location: write its ``key_locations`` row with ``n`` encryptions
        and commit.

        Concurrent first sightings of the same location share one write; the ``n`` of each
        caller but the one that started it is counted in memory.

        Raises:
            StoreUnavailable: the database is unavailable (nothing was counted).
        """
        key = (scope_id, version, location)
        task = self._recording.get(key)
        first = task is None
        if task is None:
            task = asyncio.get_running_loop().create_task(self._write_first(key, n))
            self._recording[key] = task

            def done(t: asyncio.Task[None]) -> None:
                self._recording.pop(key, None)
                if not t.cancelled():
                    t.exception()  # the callers got it (or were cancelled): not "never retrieved"

            task.add_done_callback(done)
        await asyncio.shield(task)
        if first:
            return  # this caller's n went with the row
        if not self.count(scope_id, version, location, n):  # forgotten already: count it anyway
            self._remember(key, n)

    async def _write_first(self, key: Located, n: int) -> None:
        async with db.transaction(self._sessions()) as session:
            await store.record_location(session, *key, n)
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
            self._loc_counts[key] = self._loc_counts.get(key, 0) + n

    def _split(self) -> None:
        """Move the counts of the seen locations into the batch the flush writes."""
        self._fold_last()
        located = self._located
        for key, n in located.items():
            if n:
                self._split_one(key, n)
                located[key] = 0

    @property
    def pending_locations(self) -> dict[Located, int]:
        """Per-location counts not flushed yet (a copy)."""
        self._split()
        return dict(self._loc_counts)

    def start(self) -> None:
        """Start the background flush task (idempotent)."""
        if self._task is None or self._task.done():
            self._stopping = asyncio.Event()
            self._task = asyncio.get_running_loop().create_task(self._loop(), name="keyrotor-usage")

    async def close(self) -> None:
        """Stop the background task and flush what is left (an outage is logged, not raised)."""
        task, self._task = self._task, None
        if task is not None:
            # Asked to stop, not cancelled: a flush cancelled while its commit is under way may
            # have committed, and its counts, put back as unwritten, would be added twice.
            self._stopping.set()
            done, _ = await asyncio.wait({task}, timeout=CLOSE_WAIT_S)
            if not done:  # a flush that hangs (a silent database) is cancelled after all
                task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        try:
            await self.flush()
        except Exception as exc:
            self._split()
            lost = sum(self._loc_counts.values())
            self._loc_counts.clear()
            log.warning("usage_flush_failed_at_close", error=f"{type(exc).__name__}: {exc}", lost=lost)

    async def _loop(self) -> None:
        while True:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._stopping.wait(), self._interval_s)
            if self._stopping.is_set():
                return  # close() flushes what is left
            try:
                await self.flush()
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # an outage: the counts stay and go with the next flush
                log.warning("usage_flush_failed", error=f"{type(exc).__name__}: {exc}")

    async def flush(self) -> None:
        """Add the per-location counts to ``key_locations``.

        Raises:
            StoreUnavailable: the database is unavailable (the counts are kept for next time).
        """
        async with self._lock:
            self._split()
            locs, self._loc_counts = self._loc_counts, {}
            try:
                await self._add_locations(locs)
            except BaseException:
                for key, n in locs.items():  # kept for the next flush
                    self._loc_counts[key] = self._loc_counts.get(key, 0) + n
                raise

    async def _add_locations(self, locs: dict[Located, int]) -> None:
        # A transaction of its own, after the data_keys one: never holds both kinds of row lock.
        if not locs:
            return
        keys = sorted(locs)
        async with db.transaction(self._sessions()) as session:
            await store.add_location_counts(session, keys, [locs[k] for k in keys])
