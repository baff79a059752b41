"""One batch onto the audit chain: the transaction the batched writers run on the connection they keep.

::

    BEGIN; SELECT pg_advisory_xact_lock(chain)          -- one round trip
    SELECT id, row_hash ... ORDER BY id DESC LIMIT 1    -- the chain head
    COPY encryption_audit_log (...) FROM STDIN          -- the whole batch, text format
    COMMIT

so a batch costs four round trips whatever its size, and writers in any number of processes
keep one chain (:mod:`keyrotor.audit.chain`). The COPY text of a batch is built in the same pass
that hashes it. If the commit's fate is unknown (the connection died during COMMIT), the next
attempt first looks for the batch's last row and its hash, so a batch is never written twice.

:class:`ChainAppender` is the base of the writers (:mod:`keyrotor.audit.writer`,
:mod:`keyrotor.audit.durable`), which decide what goes into a batch and when.
"""

from __future__ import annotations

import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import Any, Literal

from prometheus_client import Counter, Histogram
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine

from keyrotor.audit.chain import GENESIS, chain_copy, chain_records
from keyrotor.audit.events import Row, from_us
from keyrotor.audit.key import AuditKey, key_for
from keyrotor.errors import ConfigurationError
from keyrotor.store import audit as store

# The writers' logger: operators filter their messages by this name.
log = logging.getLogger("keyrotor.audit.writer")

EVENTS_WRITTEN = Counter("keyrotor_audit_events_written_total", "Audit events written to the database.")
FLUSH_FAILURES = Counter("keyrotor_audit_flush_failures_total", "Failed audit flush attempts (each retried).")
FLUSH_SECONDS = Histogram(
    "keyrotor_audit_flush_duration_seconds",
    "Duration of one successful audit batch write.",
    buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5),
)


@dataclass(frozen=True, slots=True)
class Prepared:
    """A batch chained ahead of time on an assumed chain head ``base``."""

    rows: list[Row]
    base: tuple[int, bytes]
    data: bytes
    head: tuple[int, bytes]


class ChainAppender:
    """Writes batches of rows to the chain, each in one transaction on a connection it keeps.

    Args:
        engine: where to write; the appender holds one connection of its pool.
        method: ``copy`` (COPY in text format, built while hashing) or ``insert`` (one
            ``INSERT ... SELECT FROM unnest``); both one round trip a batch, ``copy`` the faster.
        statement_timeout_s: how long one statement may take.
        key: the audit key rows are MACed with (``keyrotor.audit.key``); by default the one
            loaded for the engine's database, if any.
        key_loader: loads the key before a write when there is none yet; a failure fails that write.
    """

    def __init__(
        self,
        engine: AsyncEngine,
        *,
        method: Literal["copy", "insert"],
        statement_timeout_s: float,
        key: AuditKey | None,
        key_loader: Callable[[], Awaitable[AuditKey]] | None,
    ) -> None:
        self._engine = engine
        self._key = key
        self._key_loader = key_loader
        self._method = method
        self._timeout_s = statement_timeout_s
        self._conn: AsyncConnection | None = None
        self._unsure: tuple[int, bytes] | None = None  # last row of an attempt whose commit may have landed
        self.written = 0
        self.flush_failures = 0

    def _prebuild(self, base_id: int, base_hash: bytes) -> None:
        """Called once a batch's COPY data is handed over, with the head it will leave: a writer
        may chain its next batch on it meanwhile."""

    async def _write(self, batch: list[Row], prepared: Prepared | None) -> None:
        await self._load_key()
        try:
            pg = await self._connect()
            started = time.perf_counter()
            await store.begin_locked(pg, self._timeout_s)
            if self._unsure is not None and await store.row_has_hash(pg, *self._unsure, self._timeout_s):
                # The previous attempt committed after all; only its answer was lost.
                await store.commit(pg, self._timeout_s)
                self._unsure = None
                self._count_written(len(batch), started)
                return
            if self._current_key() is None and await store.chain_keyed_pg(pg, self._timeout_s):
                raise ConfigurationError(
                    "the audit chain is keyed and this writer has no audit key (keyrotor.audit.key)"
                )
            last_id, prev = await store.chain_head_pg(pg, self._timeout_s) or (0, GENESIS)
            await self._insert(pg, last_id, prev, batch, prepared)
            await store.commit(pg, self._timeout_s)
            self._unsure = None
        except BaseException:
            # The connection is in an unknown state (mid-transaction at best): never reuse it.
            await self._disconnect(invalidate=True)
            raise
        self._count_written(len(batch), started)

    def _count_written(self, n: int, started: float) -> None:
        self.written += n
        EVENTS_WRITTEN.inc(n)
        FLUSH_SECONDS.observe(time.perf_counter() - started)

    def _count_failure(self) -> None:
        self.flush_failures += 1
        FLUSH_FAILURES.inc()

    def _current_key(self) -> AuditKey | None:
        """The audit key: given, or loaded for this database by its KeyManager (cached)."""
        if self._key is None:
            self._key = key_for(self._engine.url)
        return self._key

    async def _load_key(self) -> AuditKey | None:
        """:meth:`_current_key`, loaded through ``key_loader`` if there is none yet."""
        if self._current_key() is None and self._key_loader is not None:
            self._key = await self._key_loader()
        return self._key

    async def _insert(
        self, pg: Any, last_id: int, prev: bytes, batch: list[Row], prepared: Prepared | None
    ) -> None:
        key = self._current_key()
        if self._method == "copy":
            if prepared is not None and prepared.base == (last_id, prev):
                data, head = prepared.data, prepared.head
            else:
                data, head_id, head_hash = chain_copy(last_id, prev, batch, key)
                head = (head_id, head_hash)
            self._unsure = head

            async def source() -> AsyncIterator[bytes]:
                yield data
                # The data is handed over; the server parses and inserts it now.
                self._prebuild(*head)

            await store.copy_events(pg, source(), self._timeout_s)
        else:
            records = chain_records(last_id, prev, batch, key)
            self._unsure = (records[-1][0], records[-1][12])
            columns: list[list[Any]] = [list(c) for c in zip(*records, strict=True)]
            columns[10] = [from_us(us) for us in columns[10]]
            await store.insert_event_columns(pg, columns, self._timeout_s)

    async def _connect(self) -> Any:
        if self._conn is None:
            self._conn = await self._engine.connect()
        raw = await self._conn.get_raw_connection()
        return raw.driver_connection

    async def _disconnect(self, *, invalidate: bool) -> None:
        conn, self._conn = self._conn, None
        if conn is None:
            return
        try:
            if invalidate:
                await conn.invalidate()
            await conn.close()
        except Exception:  # a dead connection may fail to close; the pool forgets it anyway
            log.debug("audit writer connection did not close cleanly", exc_info=True)
