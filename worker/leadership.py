"""Scheduler leadership: one scheduler scans at a time, the others are hot standbys.

The leader holds a session-level advisory lock on a connection of its own; the lock lives exactly
as long as that connection (see :class:`Leadership`). A leader that stops cleanly hands over: it
gives the lock up and NOTIFYs :data:`HANDOVER_CHANNEL`, on which every standby LISTENs, so a
standby takes the lead at once rather than at its next scan.
"""

from __future__ import annotations

import asyncio
import math
from collections.abc import Callable

import asyncpg
import structlog

from keyrotor.store import db
from keyrotor.store import schedule as store

log = structlog.get_logger("keyrotor.scheduler")

# pg_try_advisory_lock key of the leader ("krsched"). Advisory locks are per database, so
# deployments on different databases never contend.
LEADER_LOCK = 0x6B72_7363_6865_64
# NOTIFY channel of a leader that gave the lock up (per database, like the lock).
HANDOVER_CHANNEL = "keyrotor_scheduler_handover"
# Appended to its id in the Redis leader key by a leader that stopped cleanly, until a standby
# writes its own id there: `keyrotor health` reads it as an orderly handover, not as no leader.
STEPPING_DOWN = " (stepping down)"


class Leadership:
    """A session-level advisory lock held on a connection of its own.

    ``ensure()`` returns whether this process leads now: it pings the connection if it holds the
    lock (the lock lives exactly as long as the connection), else tries to take it.

    A leader that dies closes its connection (or TCP keepalives notice the host is gone), which
    frees the lock. A leader that *hangs* -- SIGSTOP, a wedged event loop -- keeps its socket
    open; so once leading, the connection gets ``idle_session_timeout = timeout_s`` and a task
    pings it every ``timeout_s / 4``. If the pings stop, Postgres closes the session after
    ``timeout_s`` and a standby takes the lock at its next try; the old leader, if it wakes up,
    finds its connection gone and becomes a standby. (Postgres 14+; on older servers the setting
    is refused, logged once, and only dead leaders are replaced.)

    Every connection LISTENs on :data:`HANDOVER_CHANNEL`; while this process stands by, a notice
    there (a leader's :meth:`release`) calls ``on_free``, which should try the lock now. The
    notice is a hint: a standby whose connection missed it still tries at its next ``ensure()``.
    """

    def __init__(
        self,
        database_url: str,
        *,
        key: int = LEADER_LOCK,
        timeout_s: float = 30.0,
        on_free: Callable[[], None] | None = None,
    ) -> None:
        url = db.async_url(database_url).set(drivername="postgresql")
        self._dsn = url.render_as_string(hide_password=False)
        self._key = key
        self._timeout_s = timeout_s
        self._on_free = on_free
        self._conn: asyncpg.Connection | None = None
        self._io = asyncio.Lock()  # one statement at a time on the connection
        self._pinger: asyncio.Task[None] | None = None
        self.leading = False

    async def ensure(self) -> bool:
        async with self._io:
            try:
                conn = self._conn
                if conn is None or conn.is_closed():
                    await self._drop()
                    conn = self._conn = await asyncpg.connect(
                        self._dsn,
                        timeout=10,
                        server_settings={
                            "application_name": "keyrotor-scheduler",
                            # Notice a vanished peer in ~25 s on TCP (a SIGKILL closes the socket at once).
                            "tcp_keepalives_idle": "10",
                            "tcp_keepalives_interval": "5",
                            "tcp_keepalives_count": "3",
                        },
                    )
                    await conn.add_listener(HANDOVER_CHANNEL, self._handed_over)
                if self.leading:
                    await store.ping(conn, timeout_s=10)
                else:
                    self.leading = await store.try_leader_lock(conn, self._key)
                    if self.leading:
                        await self._lease(conn)
            except Exception as exc:  # whatever broke, this connection (and any lock on it) is gone
                if self.leading:
                    log.warning("scheduler_lost_leadership", error=f"{type(exc).__name__}: {exc}")
                await self._drop()
            return self.leading

    def _handed_over(self, conn: object, pid: int, channel: str, payload: object) -> None:
        """A leader gave the lock up (asyncpg's listener callback, on the event loop)."""
        # Not on a connection already given up (a leader hears its own notice as it leaves).
        if conn is self._conn and not self.leading and self._on_free is not None:
            self._on_free()

    async def _lease(self, conn: asyncpg.Connection) -> None:
        """Make the lock lapse if this process stops pinging (see the class docstring)."""
        try:
            await store.end_session_when_idle(conn, math.ceil(self._timeout_s * 1000))
        except asyncpg.UndefinedObjectError:  # Postgres < 14
            log.warning("scheduler_lease_unsupported", detail="idle_session_timeout needs Postgres 14")
            return
        self._pinger = asyncio.create_task(self._ping(conn), name="scheduler-leader-ping")

    async def _ping(self, conn: asyncpg.Connection) -> None:
        while True:
            await asyncio.sleep(self._timeout_s / 4)
            async with self._io:
                if not self.leading or id(self._conn) != id(conn):  # dropped, or another connection
                    return
                try:
                    await store.ping(conn, timeout_s=self._timeout_s / 2)
                except Exception as exc:
                    log.warning("scheduler_lost_leadership", error=f"{type(exc).__name__}: {exc}")
                    await self._drop()
                    return

    async def _drop(self) -> None:
        conn, self._conn, self.leading = self._conn, None, False
        pinger, self._pinger = self._pinger, None
        if pinger is not None and pinger is not asyncio.current_task():
            pinger.cancel()
        if conn is not None:
            conn.terminate()

    async def release(self) -> None:
        """Give the lock up and tell the standbys (closing the connection releases it too, but
        nobody hears of that until their next try)."""
        pinger, self._pinger = self._pinger, None
        if pinger is not None:
            pinger.cancel()
        try:  # a statement in flight on the connection ends first, within a bound
            async with asyncio.timeout(15):
                await self._io.acquire()
        except TimeoutError:  # a wedged statement: stepping down must not wait for it
            conn, self._conn, self.leading = self._conn, None, False
            if conn is not None:
                conn.terminate()
            return
        try:
            conn, self._conn, leading, self.leading = self._conn, None, self.leading, False
            if conn is None or conn.is_closed():
                return
            if leading:
                try:
                    await store.release_leader_lock(conn, self._key, HANDOVER_CHANNEL, timeout_s=5)
                except Exception as exc:  # the close below frees the lock; standbys find it at their next try
                    log.warning("scheduler_handover_notice_failed", error=type(exc).__name__)
            try:
                await asyncio.wait_for(conn.close(), 5)
            except Exception:
                conn.terminate()
        finally:
            self._io.release()
