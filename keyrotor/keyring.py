"""Which DEK a KeyManager uses, and whether it may still: active versions, loading and unwrapping,
refresh-ahead, and the state checks of cached keys that destruction depends on.

The DEK cache (:mod:`keyrotor.cache`) holds the unwrapped keys; this module decides what goes in
and when a cached key must be looked at again:

- the active version of each scope is read again after ``KEYROTOR_ACTIVE_VERSION_TTL_SECONDS``;
- concurrent misses of one key share one fetch and unwrap;
- a cached key loaded in a state that leads to destruction (grace, retired) has its state read
  again within that TTL (:meth:`KeyRing.confirm`): a process that missed the announcement of a
  destruction stops using the key then, not at the cache's TTL;
- a background refresh (refresh-ahead) that is refused (the version destroyed or unknown, the
  KEK refusing to unwrap it) drops the cached key at once; one that fails on an outage leaves it
  to serve out its TTL;
- a use of a retired version is recorded in ``retired_key_uses`` (which cancels its pending
  destruction) once per (scope, version, location) per process in ``RETIRED_USE_INTERVAL_S``.

The dicts :attr:`KeyRing.retired` and :attr:`KeyRing.unconfirmed` are empty in the normal case,
so the decrypt path pays one truth test for each.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable

from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from keyrotor import metrics
from keyrotor.audit import calls
from keyrotor.audit.calls import Who
from keyrotor.audit.log import Row
from keyrotor.cache import DekCache
from keyrotor.census.locations import location_of
from keyrotor.census.usage import UsageCounter
from keyrotor.errors import KeyExhausted, KeyVersionUnknown, PermanentError, ScopeNotFound, StoreUnavailable
from keyrotor.kek.base import KekProvider, WrapContext
from keyrotor.replication.check import Replication
from keyrotor.schedule.rules import KeyState, check_decryptable
from keyrotor.scopes import create_scope
from keyrotor.settings import Settings
from keyrotor.store import db, repo

log = logging.getLogger(__name__)

RETIRED_USE_INTERVAL_S = 60.0
_MAX_RETIRED_NOTES = 10_000


class KeyRing:
    """The DEKs of one KeyManager.

    Args:
        settings: ``active_version_ttl_s``.
        cache: the manager's DEK cache.
        usage: the manager's encryption counter (reservations of the active DEK).
        sessions, kek, replication: read from the manager at each use (they exist once it is open).
        emit: queues an audit row (a ``retired_key_use`` event).
    """

    def __init__(
        self,
        settings: Settings,
        cache: DekCache,
        usage: UsageCounter,
        *,
        sessions: Callable[[], async_sessionmaker[AsyncSession]],
        kek: Callable[[], KekProvider],
        replication: Callable[[], Replication | None],
        emit: Callable[[Row], Awaitable[None]],
    ) -> None:
        self._ttl_s = settings.active_version_ttl_s
        self.settings = settings
        self.cache = cache
        self.usage = usage
        self._sessions = sessions
        self._kek = kek
        self._replication = replication
        self._emit = emit
        self.active: dict[str, tuple[int, int, float]] = {}  # scope -> (id, active version, expiry)
        self._inflight: dict[tuple[str, int], asyncio.Future[AESGCM]] = {}
        # Background refreshes of cached DEKs near their expiry (DekCache.due), one a key.
        self.refreshing: dict[tuple[str, int], asyncio.Task[None]] = {}
        self.retired: dict[tuple[str, int], int] = {}  # loaded retired versions -> scope id
        self._retired_noted: dict[tuple[str, int, str], float] = {}  # -> monotonic time of next write
        self.unconfirmed: dict[tuple[str, int], float] = {}  # grace/retired -> monotonic next check
        # Counts invalidations: a read that one overtook (a key change announced while a DEK was
        # fetched and unwrapped) must not leave what it read behind as if it were current.
        self._generation = 0

    async def encryption_key(self, scope: str) -> tuple[int, int, AESGCM]:
        """(scope id, active version, cipher) for new values of ``scope`` (created on first use)."""
        entry = self.active.get(scope)
        if entry is not None and time.monotonic() < entry[2]:
            cipher = self.cache.get(scope, entry[1])
            if cipher is not None:
                return entry[0], entry[1], cipher
        generation = self._generation
        record = await self.active_record(scope)
        if generation == self._generation:  # else a rotation was announced meanwhile: read again next time
            self.active[scope] = (record.scope_id, record.version, time.monotonic() + self._ttl_s)
        cipher = self.cache.get(scope, record.version) or await self.load(scope, record.version)
        return record.scope_id, record.version, cipher

    async def reserve(
        self, scope: str, scope_id: int, version: int, cipher: AESGCM, n: int = 1
    ) -> tuple[int, int, AESGCM]:
        """Reserve ``n`` encryptions of the active DEK (keyrotor.census.usage). If it is exhausted or
        no longer takes values, the active version is read again once: a rotation may have
        replaced it since this process last looked. Returns the DEK to use.

        Raises:
            KeyExhausted: the scope's active DEK reached its hard stop.
        """
        try:
            await self.usage.acquire(scope_id, version, n, scope=scope)
            return scope_id, version, cipher
        except (KeyExhausted, KeyVersionUnknown):
            self.active.pop(scope, None)
            fresh = await self.encryption_key(scope)
            if fresh[1] == version:
                raise
        await self.usage.acquire(fresh[0], fresh[1], n, scope=scope)
        return fresh

    async def active_record(self, scope: str) -> repo.KeyRecord:
        """The active DEK's record of ``scope``, creating the scope with DEK v1 if it is new."""
        async with db.transaction(self._sessions()) as session:
            record = await repo.get_key(session, scope)
        if record is not None:
            return record
        record, cipher = await create_scope(self._sessions(), self._kek(), self.settings, scope)
        if cipher is not None:
            self.cache.put(scope, 1, cipher)
            replication = self._replication()
            if replication is not None:
                replication.follow(scope)  # copy the new DEK to every region now
        return record

    async def usable(self, scope: str, version: int, cipher: AESGCM | None) -> AESGCM:
        """The DEK of a value of ``version``: ``cipher`` (a cache hit) or loaded, its state read
        again first if its check is due (:meth:`confirm`)."""
        if cipher is None:
            cipher = await self.load(scope, version)
        if self.unconfirmed and (scope, version) in self.unconfirmed:
            await self.confirm(scope, version)
        return cipher

    async def load(self, scope: str, version: int) -> AESGCM:
        """Fetch and unwrap one DEK; concurrent misses for the same key share one fetch.

        If the caller that started the shared fetch is cancelled, the callers that joined it
        are not: the first of them fetches again, the others join that fetch.
        """
        key = (scope, version)
        while (pending := self._inflight.get(key)) is not None:
            try:
                return await asyncio.shield(pending)
            except asyncio.CancelledError:
                task = asyncio.current_task()
                if not pending.cancelled() or (task is not None and task.cancelling()):
                    raise  # this caller was cancelled
        future: asyncio.Future[AESGCM] = asyncio.get_running_loop().create_future()
        self._inflight[key] = future
        try:
            replication = self._replication()
            if replication is None:
                cipher = await self._fetch(scope, version)
            else:  # the primary, or a secondary region's copy if the primary is unavailable
                cipher = await replication.fetch(scope, version, self._fetch)
                self.cache.put(scope, version, cipher)
        except asyncio.CancelledError:
            future.cancel()  # this caller's cancellation, not the joined callers': they fetch again
            raise
        except BaseException as exc:
            future.set_exception(exc)
            future.exception()  # mark retrieved: waiters, if any, re-raise it themselves
            raise
        else:
            future.set_result(cipher)
            return cipher
        finally:
            del self._inflight[key]

    async def _fetch(self, scope: str, version: int) -> AESGCM:
        generation = self._generation
        async with db.transaction(self._sessions()) as session:
            record = await repo.get_key(session, scope, version)
            if record is None and await repo.get_scope(session, scope) is None:
                raise ScopeNotFound(f"scope {scope!r} does not exist")
        if record is None:
            raise KeyVersionUnknown(f"{scope}: DEK v{version} is unknown")
        check_decryptable(scope, version, record.state, record.latest_version)
        assert record.wrapped is not None  # decryptable states always keep their wrapped key
        self._note_state(scope, version, record.state, record.scope_id)
        cipher = AESGCM(await self._kek().unwrap(record.wrapped, WrapContext(scope, version)))
        self.cache.put(scope, version, cipher)
        if generation != self._generation:
            # Invalidated while the key was read and unwrapped (a retirement or destruction
            # announced meanwhile dropped the state noted above): the state read may be stale,
            # so it is read again before the key's next use (usable() -> confirm()).
            self.unconfirmed[(scope, version)] = 0.0
        return cipher

    def _note_state(self, scope: str, version: int, state: KeyState | None, scope_id: int) -> None:
        """Remember what the loaded state of a cached DEK asks of its later uses."""
        key = (scope, version)
        if state == KeyState.RETIRED:  # decrypts, and each use is noticed (retired_use)
            self.retired[key] = scope_id
        else:
            self.retired.pop(key, None)
        if state in (KeyState.GRACE, KeyState.RETIRED):
            self.unconfirmed[key] = time.monotonic() + self._ttl_s
        else:
            self.unconfirmed.pop(key, None)

    async def confirm(self, scope: str, version: int) -> None:
        """Read the state of a cached grace or retired DEK again if its check is due: a destroyed
        (or unknown) one is dropped from the cache and refused.

        Raises:
            KeyVersionTooOld, KeyVersionUnknown: the version was destroyed meanwhile.
            StoreUnavailable: a retired version's state cannot be read now (a grace version is
                used on: it cannot be destroyed without first being retired for days).
        """
        key = (scope, version)
        if time.monotonic() < self.unconfirmed.get(key, 0.0):
            return
        try:
            async with db.transaction(self._sessions()) as session:
                record = await repo.get_key(session, scope, version)
        except StoreUnavailable:
            if key in self.retired:
                raise
            self.unconfirmed[key] = time.monotonic() + self._ttl_s
            return
        if record is None or not record.state.decrypts:
            self._forget(scope, version)
            log.warning("cached DEK %s v%d is no longer usable: dropped", scope, version)
            check_decryptable(scope, version, None if record is None else record.state, version)
        assert record is not None
        self._note_state(scope, version, record.state, record.scope_id)

    async def retired_use(self, who: Who, scope: str, version: int, context: str) -> None:
        """A decrypt needed retired ``version``: it succeeds, and is audited (each call), counted,
        logged and recorded in ``retired_key_uses`` (once per location and interval, before the
        value is returned), which cancels the version's pending destruction.

        Raises:
            StoreUnavailable: the use cannot be recorded now. The value is not returned: the
                record is the only thing that keeps a value the census cannot see from losing
                its DEK, so the caller retries (and records it) once the database is back.
        """
        location = location_of(context)
        metrics.RETIRED_KEY_USES.labels(metrics.scope_label(scope), str(version)).inc()
        await self._emit(calls.retired_use(who, scope, version, location))
        scope_id = self.retired.get((scope, version))
        key = (scope, version, location)
        now = time.monotonic()
        if scope_id is None or now < self._retired_noted.get(key, 0.0):
            return
        if len(self._retired_noted) >= _MAX_RETIRED_NOTES:
            self._retired_noted.clear()
        self._retired_noted[key] = now + RETIRED_USE_INTERVAL_S
        log.warning(
            "retired DEK used: scope=%s version=%d location=%r (its destruction is cancelled; "
            "re-encrypt that value or `keyrotor keys restore %s %d`)",
            scope, version, location, scope, version,
        )  # fmt: skip
        try:
            async with db.transaction(self._sessions()) as session:
                await repo.record_retired_use(session, scope_id, version, location, who[0])
        except Exception as exc:
            self._retired_noted.pop(key, None)
            log.error("retired DEK use of %s v%d not recorded: %s", scope, version, type(exc).__name__)
            raise

    def refresh_due(self, allowed: bool = True) -> None:
        """Start a background unwrap of each cached DEK a hit found near its expiry (none once the
        manager is closed: ``allowed`` False)."""
        for key in self.cache.take_due():
            if allowed and key not in self.refreshing:
                self.refreshing[key] = asyncio.get_running_loop().create_task(self._refresh(*key))

    async def _refresh(self, scope: str, version: int) -> None:
        try:
            await self.load(scope, version)  # puts the DEK back with a new TTL
            metrics.dek_refreshed(True)
        except asyncio.CancelledError:
            raise
        except PermanentError as exc:
            # A refusal, not an outage: the version was destroyed (or is gone), or the KEK no
            # longer unwraps it. A miss would be refused now, so the cached key must not go on
            # decrypting for the rest of its TTL.
            metrics.dek_refreshed(False)
            self._forget(scope, version)
            log.warning(
                "dek_refresh_refused scope=%s version=%s error=%s: dropped from the cache",
                scope, version, type(exc).__name__,
            )  # fmt: skip
        except Exception as exc:
            # An outage (the database, the KEK provider): serving the cached key through it is
            # the point of the cache, so the entry keeps its remaining life; the next miss tries
            # again (and raises there).
            metrics.dek_refreshed(False)
            log.warning("dek_refresh_failed scope=%s version=%s error=%s", scope, version, type(exc).__name__)
        finally:
            self.refreshing.pop((scope, version), None)

    def _forget(self, scope: str, version: int) -> None:
        """Drop one cached DEK and what was noted of its state."""
        self.cache.invalidate(scope, version)
        self.unconfirmed.pop((scope, version), None)
        self.retired.pop((scope, version), None)

    async def stop_refreshes(self) -> None:
        """Cancel the background refreshes under way and wait for them to end."""
        for task in list(self.refreshing.values()):
            task.cancel()
        if self.refreshing:
            await asyncio.gather(*self.refreshing.values(), return_exceptions=True)

    def invalidate(self, scope: str | None = None) -> None:
        """Forget cached DEKs, active versions and loaded states (all, or one scope's)."""
        self._generation += 1
        self.cache.invalidate(scope)
        if scope is None:
            self.active.clear()
            self.retired.clear()
            self.unconfirmed.clear()
            return
        self.active.pop(scope, None)
        for key in [k for k in self.retired if k[0] == scope]:
            del self.retired[key]
        for key in [k for k in self.unconfirmed if k[0] == scope]:
            del self.unconfirmed[key]
