"""Durable audit (``KEYROTOR_AUDIT=durable``, the default): a call returns once its event is committed.

Each caller appends its event and one future, then waits. The writer task takes everything
queued since its last commit and writes it as one batch, exactly as the asynchronous writer
does (one transaction: the chain lock, the head, one COPY, COMMIT), then resolves every
waiting caller's future. That is group commit: concurrent callers share one transaction and one
WAL flush, and callers arriving while a commit is in flight form the next batch. There is no
timer: a lone caller's event is written at once.

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
import logging
from collections import deque
from collections.abc import Sequence

from keyrotor.audit import Row
from keyrotor.audit_writer import MAX_BATCHES_PER_WRITE, AuditWriter
from keyrotor.errors import ConfigurationError, StoreUnavailable
from keyrotor.store import db

log = logging.getLogger(__name__)


class DurableAuditWriter(AuditWriter):
    """An :class:`AuditWriter` whose ``put`` returns only once the event is committed.

    Takes the same arguments; ``queue_max``, ``flush_interval_s`` and ``put_timeout_s`` do not
    apply (every caller waits for its own commit, so the queue holds at most one event per
    waiting call). ``statement_timeout_s`` bounds each attempt, connecting included.

    Attributes:
        commits: batches committed so far (compare with ``written`` for the group-commit factor).
        commit_failures: batches whose callers were failed with ``StoreUnavailable``.
    """

    def __init__(self, *args: object, **kwargs: object) -> None:
        super().__init__(*args, **kwargs)  # type: ignore[arg-type]
        self._waiters: deque[asyncio.Future[None]] = deque()  # one a queued event, in order
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
            StoreUnavailable: the batch could not be committed (the event may be missing).
            ConfigurationError: the writer is closed.
        """
        if self._closing:
            raise ConfigurationError("the audit writer is closed")
        fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._buf.append(row)
        self._waiters.append(fut)
        self._queued += 1
        self._wake.set()
        await fut

    async def put_many(self, rows: Sequence[Row]) -> None:
        """Queue ``rows`` in order and return once all of them are committed.

        Raises:
            StoreUnavailable: a batch holding one of them could not be committed.
            ConfigurationError: the writer is closed.
        """
        if self._closing:
            raise ConfigurationError("the audit writer is closed")
        loop = asyncio.get_running_loop()
        futs: list[asyncio.Future[None]] = []
        for row in rows:
            fut: asyncio.Future[None] = loop.create_future()
            self._buf.append(row)
            self._waiters.append(fut)
            futs.append(fut)
        self._queued += len(futs)
        self._wake.set()
        await asyncio.gather(*futs)

    def _prebuild(self, base_id: int, base_hash: bytes) -> None:
        # Each event has a waiter: batches are only ever taken with their futures, in _run.
        return

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
                self._fail(futs, "the audit writer stopped before the event was committed")
                raise
            self._in_flight = 0
            self._done += n
            if error is None:
                self.commits += 1
                for fut in futs:
                    if not fut.done():  # a cancelled caller's future is done already
                        fut.set_result(None)
            else:
                self.commit_failures += 1
                self._fail(futs, f"the audit log could not be written ({type(error).__name__})")
            self._progress.set()

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
        log.log(
            logging.WARNING if db._is_transient(error) else logging.ERROR,
            "audit commit failed (%s): %d calls fail with StoreUnavailable",
            type(error).__name__,
            len(rows),
        )
        return error

    async def _attempt(self, rows: list[Row]) -> None:
        # Each statement has its own timeout; this one also bounds connecting.
        async with asyncio.timeout(self._timeout_s):
            await self._write(rows, None)

    def _fail(self, futs: list[asyncio.Future[None]], message: str) -> None:
        for fut in futs:
            if not fut.done():
                fut.set_exception(StoreUnavailable(f"{message}: the call was not completed"))

    def _give_up(self, left: int) -> None:
        # Events close() could not write belong to calls still waiting: they fail, nothing is lost.
        futs = list(self._waiters)
        self._waiters.clear()
        self._fail(futs, "the audit writer closed before the event was committed")
