"""The batched audit writer that KeyManager records every call through (``KEYROTOR_AUDIT=async``;
the default, durable mode is its subclass in ``keyrotor.audit.durable``).

Callers put events in a bounded in-memory queue (a tuple and a deque append); one background
task writes them in batches, each batch one transaction on a connection the writer keeps
(:mod:`keyrotor.audit.append`). While the database inserts one batch the next is already
chained on the head that batch will leave (used if the head is still that when its turn comes,
rebuilt if another process appended meanwhile). Under load batches grow (up to
``MAX_BATCHES_PER_WRITE`` times ``KEYROTOR_AUDIT_BATCH_SIZE``), sharing the lock and the commit
among more events.

In this asynchronous mode a call returns once its event is queued, so what is queued is lost
if the process dies (SIGKILL, OOM), uncounted: at most the queue, typically the events of the
last flush interval. Nothing else is dropped silently:

- a failed flush is retried with jittered exponential backoff (tenacity), on a new connection,
  until it succeeds; a batch whose commit's fate is unknown is never written twice;
- if the queue is full (the database is slow or down), callers wait for space: back-pressure,
  counted in ``keyrotor_audit_callers_blocked_total`` and logged; past ``put_timeout_s`` (when
  set) the event is dropped, counted in ``keyrotor_audit_events_dropped_total{reason="queue_full"}``;
- if the writer's task ends without ``close()`` (something cancelled it), what it held is
  counted in ``keyrotor_audit_events_dropped_total{reason="stopped"}`` and logged, and every
  later call fails with ``StoreUnavailable`` rather than queue events nobody will write;
- ``close()`` writes everything still queued. Only if that keeps failing for
  ``KEYROTOR_AUDIT_CLOSE_TIMEOUT_SECONDS`` does it give up, logging an error with the count and
  adding it to ``keyrotor_audit_events_dropped_total{reason="close"}``.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
import weakref
from collections import deque
from collections.abc import Awaitable, Callable
from typing import Literal

import tenacity
from prometheus_client import Counter, Gauge
from sqlalchemy.ext.asyncio import AsyncEngine

from keyrotor.audit.append import ChainAppender, Prepared
from keyrotor.audit.chain import chain_copy
from keyrotor.audit.events import AuditEvent, Row, event_row
from keyrotor.audit.key import AuditKey
from keyrotor.errors import ConfigurationError, StoreUnavailable
from keyrotor.store import db

log = logging.getLogger(__name__)

_WRITERS: weakref.WeakSet[AuditWriter] = weakref.WeakSet()

QUEUE_DEPTH = Gauge("keyrotor_audit_queue_depth", "Audit events queued in this process, not yet written.")
QUEUE_DEPTH.set_function(lambda: float(sum(w.depth for w in list(_WRITERS))))
CALLERS_BLOCKED = Counter(
    "keyrotor_audit_callers_blocked_total", "Calls that waited for space in a full audit queue."
)
# Async mode only (durable calls fail instead of losing their event). Reasons: ``queue_full``
# (a call waited KEYROTOR_AUDIT_PUT_TIMEOUT_SECONDS for room), ``close`` (close() gave up),
# ``stopped`` (the writer's task ended without close(): what it held is never written). What
# a killed process held in memory cannot be counted by it: see docs/audit.md.
DROP_REASONS = ("queue_full", "close", "stopped")
EVENTS_DROPPED = Counter(
    "keyrotor_audit_events_dropped_total",
    "Audit events accepted in async mode and never written.",
    ["reason"],
)
for _reason in DROP_REASONS:
    EVENTS_DROPPED.labels(reason=_reason)
YIELD_EVERY = 100
MAX_BATCHES_PER_WRITE = 5


class AuditWriter(ChainAppender):
    """Queue audit events and write them in batches from a background task.

    Args:
        engine: where to write; the writer holds one connection of its pool.
        queue_max: events accepted and not yet written (queued or being written) before
            callers wait (``KEYROTOR_AUDIT_QUEUE_MAX``).
        batch_size: queued events that start a write at once (``KEYROTOR_AUDIT_BATCH_SIZE``).
            A write takes everything queued, up to ``MAX_BATCHES_PER_WRITE`` times this: when
            the database is slower than the callers, batches grow and its fixed costs (the lock,
            the commit) are shared by more events.
        flush_interval_s: how long an event may wait for its batch to fill.
        close_timeout_s: how long ``close()`` retries before it gives up loudly.
        method: ``copy`` (COPY in text format, built while hashing) or ``insert`` (one
            ``INSERT ... SELECT FROM unnest``); both one round trip a batch, ``copy`` is the
            faster.
        retry_max_s: the longest wait between two attempts.
        statement_timeout_s: a flush attempt that hangs longer than this is retried.
        put_timeout_s: how long ``put`` waits for room in a full queue before it drops the
            event (counted and logged); 0 waits as long as it takes.
        key: the audit key rows are MACed with (``keyrotor.audit.key``); by default the one
            loaded for the engine's database, if any.
        key_loader: loads the key before a write when there is none yet (KeyManager passes one
            when the database or the KEK was unreachable at open); a failure fails that write.
    """

    def __init__(
        self,
        engine: AsyncEngine,
        *,
        queue_max: int = 10_000,
        batch_size: int = 1_000,
        flush_interval_s: float = 0.5,
        close_timeout_s: float = 10.0,
        method: Literal["copy", "insert"] = "copy",
        retry_max_s: float = 5.0,
        statement_timeout_s: float = 30.0,
        put_timeout_s: float = 0.0,
        key: AuditKey | None = None,
        key_loader: Callable[[], Awaitable[AuditKey]] | None = None,
    ) -> None:
        super().__init__(
            engine, method=method, statement_timeout_s=statement_timeout_s, key=key, key_loader=key_loader
        )
        self._max = queue_max
        self._batch_size = batch_size
        self._interval = flush_interval_s
        self._close_timeout_s = close_timeout_s
        self._retry_max_s = retry_max_s
        self._put_timeout_s = put_timeout_s
        self._buf: deque[Row] = deque()
        self._wake = asyncio.Event()
        self._space = asyncio.Event()
        self._progress = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._closing = False
        self._closed = False
        self._stopped = False  # the task ended without close(): nothing queued will be written
        self._deadline: float | None = None
        self._queued = 0  # events accepted so far
        self._done = 0  # events written (or given up on at close) so far
        self._in_flight = 0
        self._prepared: Prepared | None = None  # the next batch, chained while this one is written
        self._last_block_log = 0.0
        self._last_drop_log = 0.0
        # Callers that never await anything else (a tight loop of cache-hit decrypts) let the
        # writer task run every this many events; it needs the loop at each of its round trips.
        self._yield_every = max(1, min(batch_size, YIELD_EVERY))
        self._next_yield = min(self._yield_every, queue_max)  # queue length at which offer() defers
        self.blocked = 0
        self.dropped = 0
        _WRITERS.add(self)

    def __repr__(self) -> str:
        return f"AuditWriter(depth={self.depth}, written={self.written}, failures={self.flush_failures})"

    @property
    def depth(self) -> int:
        """Events accepted and not yet written (queued or in the batch being written)."""
        return len(self._buf) + self._in_flight

    # --- lifecycle -------------------------------------------------------------------------

    async def start(self) -> None:
        """Start the background task (idempotent)."""
        if self._task is None:
            self._task = asyncio.create_task(self._run(), name="keyrotor-audit-writer")
            self._task.add_done_callback(self._task_ended)

    def _task_ended(self, task: asyncio.Task[None]) -> None:
        # close() ends the task on purpose and accounts for what is left itself. Any other end
        # (a cancellation from outside, a bug) leaves events nobody will write: say so once, and
        # make every later call fail instead of queueing, or waiting, for ever.
        if self._closing:
            return
        self._stopped = True
        self._next_yield = 0  # offer() refuses from now on: put() raises
        error = None if task.cancelled() else task.exception()
        log.error(
            "audit writer task ended without close() (%s): later calls fail with StoreUnavailable",
            "cancelled" if error is None else type(error).__name__,
        )
        self._abandon()
        self._space.set()
        self._progress.set()

    def _abandon(self) -> None:
        """Account for the events a stopped task held (async mode: lost, counted)."""
        left = len(self._buf) + self._in_flight
        self._buf.clear()
        self._in_flight = 0
        self._done = self._queued
        if left:
            self.dropped += left
            EVENTS_DROPPED.labels(reason="stopped").inc(left)
            log.error(
                "%d audit events were lost with the writer task (keyrotor_audit_events_dropped_total)", left
            )

    def _refuse_if_stopped(self) -> None:
        if self._stopped:
            raise StoreUnavailable("the audit writer stopped: the call was not completed")

    async def close(self) -> None:
        """Write everything queued, stop the task and release the connection.

        Retries failing writes for up to ``close_timeout_s``; whatever is still unwritten
        then is logged as an error and counted in ``keyrotor_audit_events_dropped_total``.
        """
        if self._closed:
            return
        self._closing = True
        self._deadline = time.monotonic() + self._close_timeout_s
        self._wake.set()
        task, self._task = self._task, None
        if task is not None:
            # A write can hang (a lock held elsewhere, a silent network): bound the wait too.
            done, _ = await asyncio.wait({task}, timeout=self._close_timeout_s + 1.0)
            if not done:
                task.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await task
            elif not task.cancelled() and task.exception() is not None:
                log.error("audit writer task failed", exc_info=task.exception())
        left = len(self._buf) + self._in_flight
        if left:
            self._give_up(left)
            self._buf.clear()
            self._in_flight = 0
            self._done = self._queued
        self._closed = True
        self._space.set()
        self._progress.set()
        await self._disconnect(invalidate=False)

    def _give_up(self, left: int) -> None:
        """Account for ``left`` events that close() could not write."""
        self.dropped += left
        EVENTS_DROPPED.labels(reason="close").inc(left)
        log.error(
            "audit writer closed with %d events unwritten after %.1fs of retries; "
            "they are lost (keyrotor_audit_events_dropped_total)",
            left,
            self._close_timeout_s,
        )

    # --- putting events --------------------------------------------------------------------

    def offer(self, row: Row) -> bool:
        """Queue a normalised row; False if the caller must ``await put(row)`` instead.

        That is when the queue is full, and also once per batch: ``put`` then lets the writer
        task run, which a caller that never awaits anything else (a tight loop of cache-hit
        decrypts) would otherwise starve.
        """
        buf = self._buf
        if len(buf) >= self._next_yield or self._closing:
            return False
        buf.append(row)
        self._queued += 1
        return True

    async def put(self, row: Row) -> None:
        """Queue a normalised row, waiting for space if the queue is full.

        Raises:
            ConfigurationError: the writer is closed.
            StoreUnavailable: the writer's task ended without ``close()``.
        """
        if self.offer(row):
            return
        self._refuse_if_stopped()
        buf = self._buf
        if self._closing:
            raise ConfigurationError("the audit writer is closed")
        if len(buf) + self._in_flight < self._max:
            buf.append(row)
            self._queued += 1
            self._next_yield = min(len(buf) + self._yield_every, self._max - self._in_flight)
            if len(buf) >= self._batch_size:
                self._wake.set()
            await asyncio.sleep(0)
            return
        self._wake.set()
        self.blocked += 1
        CALLERS_BLOCKED.inc()
        now = time.monotonic()
        if now - self._last_block_log > 5.0:
            self._last_block_log = now
            log.warning(
                "audit queue full (%d events): callers wait until the database accepts the backlog",
                self._max,
            )
        deadline = now + self._put_timeout_s if self._put_timeout_s > 0 else None
        while len(buf) + self._in_flight >= self._max:
            if self._closing:
                raise ConfigurationError("the audit writer is closed")
            self._refuse_if_stopped()
            self._space.clear()
            if deadline is None:
                await self._space.wait()
                continue
            try:
                async with asyncio.timeout(max(0.0, deadline - time.monotonic())):
                    await self._space.wait()
            except TimeoutError:
                self._drop_full()
                return
        self._refuse_if_stopped()  # woken because the task ended, not because it wrote
        buf.append(row)
        self._queued += 1

    def _drop_full(self) -> None:
        # Async mode chose availability: past the put timeout the call goes on without its event.
        self.dropped += 1
        EVENTS_DROPPED.labels(reason="queue_full").inc()
        now = time.monotonic()
        if now - self._last_drop_log > 5.0:
            self._last_drop_log = now
            log.error(
                "audit queue full for %.1fs: events dropped (%d so far in this process; "
                "keyrotor_audit_events_dropped_total)",
                self._put_timeout_s,
                self.dropped,
            )

    async def submit(self, *events: AuditEvent) -> None:
        """Queue events (validated and normalised), waiting for space if the queue is full.

        Raises:
            InvalidInput: an unknown event type.
        """
        for event in events:
            await self.put(event_row(event))

    async def flush(self) -> None:
        """Wait until every event queued before this call is written (or given up on at close)."""
        target = self._queued
        while self._done < target and not self._closed:
            self._wake.set()
            self._progress.clear()
            await self._progress.wait()

    # --- the background task ---------------------------------------------------------------

    async def _run(self) -> None:
        while True:
            prepared, self._prepared = self._prepared, None
            if prepared is None:
                # Write when a batch is full, when flush() or close() asks, or every interval.
                if not self._closing and len(self._buf) < self._batch_size and not self._wake.is_set():
                    try:
                        async with asyncio.timeout(self._interval):
                            await self._wake.wait()
                    except TimeoutError:
                        pass
                self._wake.clear()
                if not self._buf:
                    if self._closing:
                        return
                    continue
                batch = self._take()
            else:
                batch = prepared.rows
            ok = await self._write_with_retry(batch, prepared)
            if not ok:  # close() gave up: put everything back for close() to count
                if self._prepared is not None:
                    self._buf.extendleft(reversed(self._prepared.rows))
                    self._prepared = None
                self._buf.extendleft(reversed(batch))
                self._in_flight = 0
                return
            self._in_flight -= len(batch)
            self._next_yield = min(len(self._buf) + self._yield_every, self._max - self._in_flight)
            self._done += len(batch)
            self._space.set()
            self._progress.set()

    def _take(self) -> list[Row]:
        buf = self._buf
        n = min(len(buf), self._batch_size * MAX_BATCHES_PER_WRITE)
        if n == len(buf):
            batch = list(buf)
            buf.clear()
        else:
            batch = [buf.popleft() for _ in range(n)]
        self._in_flight += n  # still counts against the queue's bound until written
        self._next_yield = min(len(self._buf) + self._yield_every, self._max - self._in_flight)
        return batch

    def _prebuild(self, base_id: int, base_hash: bytes) -> None:
        """Chain the next batch while the database is busy with the current one.

        Called once the current batch's COPY data is on its way; assumes the chain will then
        end where the current batch does. If another writer appended meanwhile (or the current
        write fails), the next write sees a different head and rebuilds; nothing is lost.
        """
        if self._prepared is not None or len(self._buf) < self._batch_size or self._method != "copy":
            return
        key = self._current_key()
        if key is None:
            return
        rows = self._take()
        try:
            data, last_id, last_hash = chain_copy(base_id, base_hash, rows, key)
        except BaseException:  # back in the queue, in order: nothing taken is lost
            self._buf.extendleft(reversed(rows))
            self._in_flight -= len(rows)
            raise
        self._prepared = Prepared(rows, (base_id, base_hash), data, (last_id, last_hash))

    async def _write_with_retry(self, batch: list[Row], prepared: Prepared | None) -> bool:
        def stop(state: tenacity.RetryCallState) -> bool:
            return self._deadline is not None and time.monotonic() >= self._deadline

        retrying = tenacity.AsyncRetrying(
            retry=tenacity.retry_if_exception_type(Exception),
            wait=tenacity.wait_random_exponential(multiplier=0.05, max=self._retry_max_s),
            stop=stop,
            before_sleep=self._failed,
            reraise=True,
        )
        try:
            async for attempt in retrying:
                with attempt:
                    await self._write(batch, prepared)
                    prepared = None  # a retry rebuilds from the head it finds
        except Exception:  # close() deadline passed; close() reports what is left
            self._count_failure()
            return False
        return True

    def _failed(self, state: tenacity.RetryCallState) -> None:
        self._count_failure()
        exc = state.outcome.exception() if state.outcome else None
        wait = state.next_action.sleep if state.next_action else 0.0
        # An outage is expected to pass; anything else (a schema not migrated, a bug) needs a
        # person, so it is logged as an error. Either way the batch is kept and retried.
        transient = exc is not None and db._is_transient(exc)
        # The type only: a driver message may quote parameters.
        log.log(
            logging.WARNING if transient else logging.ERROR,
            "audit flush failed (%s), attempt %d; retrying in %.2fs; %d events queued",
            type(exc).__name__,
            state.attempt_number,
            wait,
            self.depth,
        )
