"""Durable audit (``KEYROTOR_AUDIT=durable``, the default): a call returns once its event is committed.

Each caller appends its event and one future, then waits. The writer task takes everything
queued since its last commit and writes it as one batch, exactly as the asynchronous writer
does (one transaction: the chain lock, the head, one COPY, COMMIT; once the writer knows the
head, a batch of fewer than ``COPY_FROM_ROWS`` events is one statement that locks, inserts and
commits: ``keyrotor.store.audit.insert_on_head``), then resolves every waiting caller's future.
That is group commit: concurrent callers share one transaction and one WAL flush, and callers
arriving while a commit is in flight form the next batch. There is no timer: a lone caller's
event is written at once.

If a batch cannot be committed (the database is down, the kept connection died and a fresh one
fails too), its callers raise :class:`~keyrotor.errors.StoreUnavailable` (transient): no
plaintext or ciphertext is returned whose event is not in the log (fail closed). When the
commit's fate is unknown (the connection died during COMMIT), the event may be in the log of a
call that raised; it is never missing from the log of a call that returned.

A caller cancelled while it waits does not disturb the batch: its event is still written, its
future is simply not resolved.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import deque
from collections.abc import Sequence
from typing import Any

import asyncpg
from sqlalchemy.ext.asyncio import AsyncEngine

from keyrotor.audit.chain import chain_lines, chain_records
from keyrotor.audit.events import Row
from keyrotor.audit.writer import EVENTS_DROPPED, MAX_BATCHES_PER_WRITE, AuditWriter
from keyrotor.errors import ConfigurationError, SchemaMissing, StoreUnavailable
from keyrotor.store import audit as store
from keyrotor.store import db

log = logging.getLogger(__name__)

_READ_HEAD_AFTER_CONFLICT = 16
# Batches of at least this many events are written with COPY in a transaction (see _write).
COPY_FROM_ROWS = 256


class _Share:
    """The waiter of several rows queued together (``put_many``): resolved once the last of them
    is committed, failed as soon as one of them cannot be, whichever batches they fall into."""

    __slots__ = ("fut", "left")

    def __init__(self, fut: asyncio.Future[None], rows: int) -> None:
        self.fut = fut
        self.left = rows

    def done(self) -> bool:
        return self.fut.done()

    def set_result(self, result: None) -> None:
        self.left -= 1
        if self.left == 0 and not self.fut.done():
            self.fut.set_result(result)

    def set_exception(self, exc: BaseException) -> None:
        if not self.fut.done():
            self.fut.set_exception(exc)


_Waiter = asyncio.Future[None] | _Share


class DurableAuditWriter(AuditWriter):
    """An :class:`AuditWriter` whose ``put`` returns only once the event is committed.

    Takes the same arguments; ``queue_max``, ``flush_interval_s`` and ``put_timeout_s`` do not
    apply (every caller waits for its own commit, so the queue holds at most one event per
    waiting call). ``statement_timeout_s`` bounds each attempt, connecting included.

    Attributes:
        commits: batches committed so far (compare with ``written`` for the group-commit factor).
        commit_failures: batches whose callers were failed with ``StoreUnavailable``.
    """

    def __init__(self, engine: AsyncEngine, **options: Any) -> None:
        super().__init__(engine, **options)
        # One a queued event, in order; None for an event no call waits for (put_nowait).
        self._waiters: deque[_Waiter | None] = deque()
        self._detached = 0  # queued events without a waiter
        self._pause = 0.0  # after a failed batch of such events: wait this long before the next try
        self._failed_calls = 0  # calls failed since the last log line
        self._last_fail_log = -1e9
        self._head: tuple[int, bytes] | None = None  # the chain head our last commit left
        self._left: tuple[int, bytes] | None = None
        self._read_head_for = 0  # batches that read the head again (another writer appends too)
        self.commits = 0
        self.commit_failures = 0

    def __repr__(self) -> str:
        return f"DurableAuditWriter(depth={self.depth}, written={self.written}, commits={self.commits})"

    def offer(self, row: Row) -> bool:
        """Always False: every durable event is awaited through :meth:`put`."""
        return False

    async def put(self, row: Row) -> None:
        """Queue ``row`` and return once the batch holding it is committed.

        Raises:
            StoreUnavailable: the batch could not be committed (the event may be missing), or
                the writer's task ended without ``close()``.
            SchemaMissing: the database has no audit table (``keyrotor db upgrade`` never ran).
            ConfigurationError: the writer is closed.
        """
        if self._closing or self._task is None:
            raise ConfigurationError("the audit writer is closed (or was never started)")
        self._refuse_if_stopped()
        fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._buf.append(row)
        self._waiters.append(fut)
        self._queued += 1
        self._wake.set()
        await fut

    async def put_many(self, rows: Sequence[Row]) -> None:
        """Queue ``rows`` in order and return once all of them are committed.

        Raises:
            StoreUnavailable: a batch holding one of them could not be committed, or the
                writer's task ended without ``close()``.
            SchemaMissing: the database has no audit table (``keyrotor db upgrade`` never ran).
            ConfigurationError: the writer is closed.
        """
        if self._closing or self._task is None:
            raise ConfigurationError("the audit writer is closed (or was never started)")
        self._refuse_if_stopped()
        if not rows:
            return
        fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        # One waiter for all of them (a future and a gather per row cost more than the commit's
        # share of a row); it stands in the queue once per row, so the queue stays one-to-one.
        share = _Share(fut, len(rows))
        self._buf.extend(rows)
        self._waiters.extend([share] * len(rows))
        self._queued += len(rows)
        self._wake.set()
        await fut

    def _prebuild(self, base_id: int, base_hash: bytes) -> None:
        # Each event has a waiter: batches are only ever taken with their futures, in _run.
        return

    def put_nowait(self, row: Row) -> None:
        """Queue an event that no call waits for (a ``failover`` event): written with the next
        batch and, if that fails, kept and retried with backoff until it is written or
        ``close()`` gives up on it (``keyrotor_audit_events_dropped_total{reason="close"}``).

        Raises:
            ConfigurationError: the writer is closed.
        """
        if self._closing:
            raise ConfigurationError("the audit writer is closed")
        if self._stopped:  # no task will write it: counted as lost, as the queue it joined was
            self.dropped += 1
            EVENTS_DROPPED.labels(reason="stopped").inc()
            log.error("audit writer stopped: a %s event was not recorded", row[0])
            return
        self._buf.append(row)
        self._waiters.append(None)
        self._detached += 1
        self._queued += 1
        self._wake.set()

    async def _run(self) -> None:
        buf, waiters = self._buf, self._waiters
        cap = self._batch_size * MAX_BATCHES_PER_WRITE
        while True:
            if not buf:
                if self._closing:
                    return
                self._wake.clear()
                await self._wake.wait()
                continue
            if self._pause and len(buf) == self._detached:
                # Only events nobody waits for, and the last try failed: back off (a caller's
                # event ends the wait at once; it is written together with them).
                self._wake.clear()
                if self._closing:
                    await asyncio.sleep(self._pause)
                else:
                    with contextlib.suppress(TimeoutError):
                        async with asyncio.timeout(self._pause):
                            await self._wake.wait()
            n = min(len(buf), cap)
            if n == len(buf):
                rows, futs = list(buf), list(waiters)
                buf.clear()
                waiters.clear()
            else:
                rows = [buf.popleft() for _ in range(n)]
                futs = [waiters.popleft() for _ in range(n)]
            self._in_flight = n
            try:
                error = await self._commit(rows)
            except BaseException:  # cancelled (close() gave up waiting): none of these is known written
                self._in_flight = 0
                self._requeue_detached(rows, futs)
                self._fail(futs, "the audit writer stopped before the event was committed")
                raise
            self._in_flight = 0
            self._done += n
            if error is None:
                self.commits += 1
                self._pause = 0.0
                self._detached -= sum(1 for fut in futs if fut is None)
                for fut in futs:
                    if fut is not None and not fut.done():  # a cancelled caller's is done already
                        fut.set_result(None)
            else:
                self.commit_failures += 1
                self._done -= self._requeue_detached(rows, futs)
                self._fail(futs, f"the audit log could not be written ({type(error).__name__})", error)
            self._progress.set()

    def _requeue_detached(self, rows: list[Row], futs: list[_Waiter | None]) -> int:
        """Put the failed batch's events that no call waits for back in front; how many."""
        kept = [row for row, fut in zip(rows, futs, strict=True) if fut is None]
        if kept:
            self._buf.extendleft(reversed(kept))
            self._waiters.extendleft([None] * len(kept))
            self._pause = min(max(self._pause * 2, 0.1), self._retry_max_s)
        return len(kept)

    async def _commit(self, rows: list[Row]) -> Exception | None:
        """Write and commit one batch; the error that stopped it, or None."""
        try:
            await self._attempt(rows)
            return None
        except Exception as exc:
            error: Exception = exc
        self._count_failure()
        if db._is_transient(error):
            # The kept connection may have died while idle (a restarted server, an idle-session
            # timeout), or the answer to COMMIT was lost: no outage yet, so one more attempt at
            # once, on a fresh connection. If the first COMMIT did land, the retry finds the
            # batch's last row instead of writing it twice. A second failure is an outage.
            try:
                await self._attempt(rows)
                return None
            except Exception as exc:
                error = exc
            self._count_failure()
        # The batch is abandoned (its callers are told): the next batch must not take this
        # one's last row, should it turn up, as its own.
        self._unsure = None
        self._failed_calls += len(rows)
        now = time.monotonic()
        if now - self._last_fail_log >= 5.0:  # an outage fails batch after batch: one line per 5 s
            self._last_fail_log = now
            log.log(
                logging.WARNING if db._is_transient(error) else logging.ERROR,
                "audit commit failed (%s): %d calls failed with %s since the last report",
                type(error).__name__,
                self._failed_calls,
                "SchemaMissing" if db.missing_schema(error) else "StoreUnavailable",
            )
            self._failed_calls = 0
        return error

    async def _attempt(self, rows: list[Row]) -> None:
        # Each statement has its own timeout; this one also bounds connecting.
        async with asyncio.timeout(self._timeout_s):
            await self._write(rows, None)

    async def _write(self, batch: list[Row], prepared: object) -> None:
        """Write one batch; on the chain head this writer left, if it still is the head.

        While this process is the only appender, the head it left is the head: reading it again
        would cost a round trip of every commit. ``id`` is the primary key, so if another writer
        appended meanwhile the batch's first id exists and the insert fails; the batch is then
        written the ordinary way (reading the head under the lock), and the next few batches read it too.
        """
        head, self._head = self._head, None
        key = await self._load_key()
        # Without a key, every batch goes the way that checks the chain is not keyed yet. A large
        # batch goes that way too: COPY parses its rows faster than the one statement splits
        # them, which outweighs the transaction's extra round trips.
        if (
            head is None
            or key is None
            or self._unsure is not None
            or self._read_head_for > 0
            or len(batch) >= COPY_FROM_ROWS
        ):
            self._read_head_for = max(0, self._read_head_for - 1)
            self._left = None
            await super()._write(batch, None)
            self._head = self._left
            return
        lines, last_id, last_hash = chain_lines(*head, batch, key)
        try:
            pg = await self._connect()
            started = time.perf_counter()
            self._unsure = (last_id, last_hash)
            try:
                if lines is not None:
                    await store.insert_lines_on_head(pg, lines, self._timeout_s)
                else:  # a field needed a COPY escape: column-wise, the driver encoding every value
                    records = chain_records(*head, batch, key)
                    await store.insert_on_head(pg, zip(*records, strict=True), self._timeout_s)
            except asyncpg.UniqueViolationError:
                # Another writer appended since this writer's last commit: nothing was written
                # (the statement was its own transaction); read the head under the lock.
                self._unsure = None
                self._read_head_for = _READ_HEAD_AFTER_CONFLICT
                await self._write(batch, None)
                return
            self._unsure = None
        except BaseException:
            await self._disconnect(invalidate=True)
            raise
        self._count_written(len(batch), started)
        self._head = (last_id, last_hash)

    async def _insert(self, pg: Any, last_id: int, prev: bytes, batch: list[Row], prepared: Any) -> None:
        await super()._insert(pg, last_id, prev, batch, prepared)
        self._left = self._unsure  # the head this batch leaves, once committed

    def _fail(self, futs: list[_Waiter | None], message: str, error: Exception | None = None) -> None:
        # A table that is not there is no outage: the calls get the permanent error that says
        # what to run, not a transient one their callers would retry for ever.
        missing = None if error is None else db.missing_schema(error)
        for fut in futs:
            if fut is not None and not fut.done():
                fail = StoreUnavailable if missing is None else SchemaMissing
                text = f"{message}: the call was not completed" if missing is None else str(missing)
                fut.set_exception(fail(text))  # one exception a call: each is raised in its own task

    def _abandon(self) -> None:
        # The task ended without close(): the calls still waiting fail (nothing they return
        # goes unaudited); events no call waited for are lost, and counted.
        futs = list(self._waiters)
        self._waiters.clear()
        self._fail(futs, "the audit writer stopped before the event was committed")
        detached, self._detached = self._detached, 0
        self._buf.clear()
        self._in_flight = 0
        self._done = self._queued
        if detached:
            self.dropped += detached
            EVENTS_DROPPED.labels(reason="stopped").inc(detached)
            log.error("%d audit events no call waited for were lost with the writer task", detached)

    def _give_up(self, left: int) -> None:
        # Events close() could not write belong to calls still waiting: they fail, nothing is lost.
        futs = list(self._waiters)
        self._waiters.clear()
        self._fail(futs, "the audit writer closed before the event was committed")
        if self._detached:  # events no call waited for: lost, so counted as async mode's are
            super()._give_up(self._detached)
            self._detached = 0
