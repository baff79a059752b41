"""KeyManager: encrypt and decrypt for a scope, with a DEK cache.

``KeyManager`` is what an application imports::

    async with KeyManager.from_env() as km:
        token = await km.encrypt("anthropic", api_key, context="user:42")
        api_key = await km.decrypt("anthropic", token, context="user:42")

Each scope has one active DEK; new values are sealed with it (``keyrotor.crypto.envelope``). Values
sealed under any DEK version that still decrypts (pending, active, grace, retired) open, as do
legacy values of the old Node backend (scrypt runs off the event loop). A use of a retired
version is audited (``retired_key_use``), logged, counted and cancels its pending destruction.
Unwrapped DEKs are cached for ``KEYROTOR_DEK_CACHE_TTL_SECONDS`` (default 30 minutes), bounded
by count.

Every call is checked against the grants (``keyrotor.audit.grants``) and recorded in the audit log
(``keyrotor.audit.log``): who (``actor=``/``ip=``/``user_agent=``, else the innermost
``keyrotor.audit.log.actor_context``, else ``KEYROTOR_DEFAULT_ACTOR``), when, which scope and DEK
version, and for failures the error's class and message, never a value or a ciphertext. Events
go through a batched background writer started by ``open()`` and flushed by ``close()``. By
default (``KEYROTOR_AUDIT=durable``, ``keyrotor.audit.durable``) a call returns only once its
event is committed, concurrent calls sharing one commit, and raises ``StoreUnavailable`` if it
cannot be; ``KEYROTOR_AUDIT=async`` (``keyrotor.audit.writer``) returns once it is queued.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping
from types import TracebackType
from typing import Any, Self

from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession, async_sessionmaker

from keyrotor import metrics
from keyrotor.audit import calls, lockdown
from keyrotor.audit.admin import GrantsAdmin
from keyrotor.audit.calls import DECRYPT, ENCRYPT, LEGACY_METADATA, CallAudit, Who
from keyrotor.audit.grants import GrantCache
from keyrotor.audit.log import Row, now_us
from keyrotor.audit.writer import AuditWriter
from keyrotor.batches import BatchCalls
from keyrotor.cache import DekCache
from keyrotor.census.usage import UsageCounter
from keyrotor.crypto import envelope
from keyrotor.crypto.legacy_format import HEADER_LEN as LEGACY_HEADER_LEN
from keyrotor.errors import CiphertextTooLarge, ConfigurationError, SchemaMissing
from keyrotor.inputs import MAX_CONTEXT_CHARS, check_context, check_scope, value_bytes
from keyrotor.kek.base import KekProvider
from keyrotor.kek.factory import open_provider
from keyrotor.keyring import KeyRing
from keyrotor.legacy.reader import LegacyReader
from keyrotor.notify import KeyChange, KeyChangeListener
from keyrotor.opening import ValueOpener
from keyrotor.replication.check import Replication
from keyrotor.secrets import SecretsTable
from keyrotor.settings import Settings
from keyrotor.store import db

log = logging.getLogger(__name__)

_context_metadata = calls.context_metadata
_MAX_SCOPES = 100_000  # validated scope names kept


class KeyManager(SecretsTable, BatchCalls, GrantsAdmin):
    """Encrypts and decrypts values for scopes. Use as an async context manager.

    It also stores named values in keyrotor's own ``secrets`` table (:class:`SecretsTable`),
    decrypts many values of a scope in one call (:class:`BatchCalls`) and administers the grants
    (:class:`GrantsAdmin`).

    Args:
        settings: configuration (``Settings.from_env()`` or built in code).
        kek: a KEK provider; by default the one ``settings.secrets_provider`` names.
        engine: an async SQLAlchemy engine; by default one for ``settings.database_url``.
            Objects passed in are not closed by the manager.
        cache: the DEK cache; by default one sized by the settings. The key ring and the hot
            path share it, so it is chosen here, once (a benchmark passes one with its own clock).
    """

    # open() logs one warning while the open default grant ``* *`` is in place. One-shot CLI
    # commands turn it off: ``status`` and ``health`` report it, and their stderr is one line.
    warn_open_grants = True

    def __init__(
        self,
        settings: Settings,
        *,
        kek: KekProvider | None = None,
        engine: AsyncEngine | None = None,
        environ: Mapping[str, str] | None = None,
        cache: DekCache | None = None,
    ) -> None:
        self.settings = settings
        self._environ = environ
        self._kek, self._owns_kek = kek, kek is None
        self._engine, self._owns_engine = engine, engine is None
        self._sessions: async_sessionmaker[AsyncSession] | None = None
        self._valid_scopes: set[str] = set()
        self.grants = GrantCache(lambda: self.sessions, ttl_s=settings.grants_ttl_s)
        self.calls = CallAudit(settings, self.grants, self._valid_scopes)
        self._who, self._failover_event = self.calls.who, self.calls.failover
        self.cache = cache or DekCache(
            ttl_s=settings.dek_cache_ttl_s,
            max_entries=settings.dek_cache_max_entries,
            refresh_ahead=settings.dek_cache_refresh_ahead,
        )
        metrics.track_cache(self.cache)
        # Encryptions per DEK, counted in memory and flushed in batches (keyrotor.census.usage).
        self.usage = UsageCounter(
            lambda: self.sessions,
            default_max=settings.max_encryptions_per_dek,
            interval_s=settings.usage_flush_interval_s,
        )
        self.ring = KeyRing(
            settings,
            self.cache,
            self.usage,
            sessions=lambda: self.sessions,
            kek=lambda: self.kek,
            replication=lambda: self.replication,
            emit=self.calls.emit,
        )
        # The ring's state the hot path tests in place (empty dicts in the normal case).
        self._active, self._refreshing = self.ring.active, self.ring.refreshing
        self._encryption_key, self._active_record = self.ring.encryption_key, self.ring.active_record
        self._max_ciphertext_chars = max_ciphertext_chars(settings.max_value_bytes)
        self.legacy_reader = LegacyReader(settings, lambda: self.sessions, self.calls.emit)
        # What opens a stored value, for decrypt, decrypt_many and the secrets table.
        self.opener = ValueOpener(self.cache, self.ring, self.legacy_reader)
        self.legacy_reader.open_successor = self._open_successor
        self._open_cached, self._open = self.opener.cached, self.opener.open  # bound once: hot path
        # Redis listener for key changes announced by rotation (keyrotor.notify); see open().
        self.key_listener: KeyChangeListener | None = None
        # Multi-region replication and failover reads (keyrotor.replication.check), when configured.
        self.replication: Replication | None = None

    def __repr__(self) -> str:
        return f"KeyManager(provider={self.settings.secrets_provider!r}, cache={self.cache!r})"

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None, **overrides: Any) -> KeyManager:
        """Build a manager from environment variables (default ``os.environ``).

        Raises:
            ConfigurationError: a variable is invalid.
        """
        return cls(Settings.from_env(environ, **overrides), environ=environ)

    # --- lifecycle -------------------------------------------------------------------------

    async def open(self) -> None:
        """Connect: build the engine and the KEK provider (refuses a missing or weak key).

        Raises:
            WeakKeyError, ConfigurationError: the master key or a setting is not usable.
            SchemaMissing: the database answers but has no keyrotor schema (run
                ``keyrotor db upgrade``); nothing is left open.
        """
        if self._kek is None:
            self._kek = await open_provider(self.settings, self._environ)
        if self._engine is None:
            self._engine = db.create_engine(self.settings.database_url)
        self._sessions = db.sessionmaker(self._engine)
        if self.settings.listen_key_changes and self.key_listener is None:
            self.key_listener = KeyChangeListener(
                self.settings.redis_url, self.settings.notify_channel, self.on_key_change
            )
            self.key_listener.start()
        await self.calls.open(self._sessions, self._engine, self._kek)
        if self.settings.regions and self.replication is None:
            self.replication = Replication.open(
                self.settings, self._sessions, self._kek, self._environ, on_failover=self.calls.failover
            )
        self.usage.start()
        if self.warn_open_grants:
            try:
                wide_open = await lockdown.still_open(self._sessions)
            except SchemaMissing:  # nothing can work: release what opening started, then say so
                await self.close()
                raise
            if wide_open:
                log.warning(lockdown.OPEN_GRANT_WARNING)  # the open default grant '* *': say so once

    async def close(self) -> None:
        """Release what the manager opened, after writing every queued audit event.

        Cached DEKs are dropped.
        """
        await self.ring.stop_refreshes()
        await self.usage.close()
        if self.replication is not None:
            await self.replication.aclose()
            self.replication = None
        if await self.calls.close():
            # A closed manager must not go on decrypting unaudited (its caches could allow it).
            self._sessions = None
        if self.key_listener is not None:
            await self.key_listener.stop()
            self.key_listener = None
        self.cache.invalidate()
        self._active.clear()
        if self._owns_engine and self._engine is not None:
            await self._engine.dispose()
            self._engine = None
        if self._owns_kek and self._kek is not None:
            await self._kek.aclose()
            self._kek = None
        self.legacy_reader.close()

    async def __aenter__(self) -> Self:
        await self.open()
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.close()

    @property
    def kek(self) -> KekProvider:
        """The KEK provider (after ``open``)."""
        if self._kek is None:
            raise ConfigurationError("KeyManager is not open: use `async with KeyManager(...)`")
        return self._kek

    @property
    def engine(self) -> AsyncEngine:
        """The database engine (after ``open``)."""
        if self._engine is None:
            raise ConfigurationError("KeyManager is not open: use `async with KeyManager(...)`")
        return self._engine

    @property
    def sessions(self) -> async_sessionmaker[AsyncSession]:
        """The session factory (after ``open``)."""
        if self._sessions is None:
            raise ConfigurationError("KeyManager is not open: use `async with KeyManager(...)`")
        return self._sessions

    @property
    def audit(self) -> AuditWriter | None:
        """The audit writer (after ``open``; None when ``KEYROTOR_AUDIT=off``)."""
        return self.calls.writer

    async def flush_audit(self) -> None:
        """Wait until every audit event of this manager queued so far is written."""
        if self.calls.writer is not None:
            await self.calls.writer.flush()

    # --- encrypt / decrypt -----------------------------------------------------------------

    async def encrypt(
        self,
        scope: str,
        plaintext: str,
        *,
        context: str = "",
        actor: str | None = None,
        ip: str | None = None,
        user_agent: str | None = None,
    ) -> str:
        """Encrypt a value under the scope's active DEK (creating the scope with DEK v1 on first use).

        Args:
            scope: e.g. ``anthropic`` or ``tenant-42/openai``.
            plaintext: the value (non-empty text, at most ``KEYROTOR_MAX_VALUE_BYTES`` as UTF-8).
            context: where the value will live (e.g. ``users.api_key:42``); the same context
                must be given to decrypt it.
            actor, ip, user_agent: who is calling, for the grants and the audit log (default:
                the innermost ``actor_context``, else ``KEYROTOR_DEFAULT_ACTOR``).

        Returns:
            A ``kr1:<version>:...`` string.

        Raises:
            InvalidScope, InvalidValue, InvalidInput: bad input.
            AccessDenied: no grant lets the actor encrypt in this scope.
            KeyExhausted: the scope's DEK made as many encryptions as it may; rotate the scope.
            SchemaMissing: the database has no keyrotor schema: run ``keyrotor db upgrade``.
            StoreUnavailable, KekUnavailable: an outage (transient).
        """
        who = self._who(actor, ip, user_agent)
        try:
            data = value_bytes(plaintext, self.settings.max_value_bytes)
            self._check_scope(scope)
            check_context(context)
            allowed = self.grants.cached(who[0], scope)
            if allowed is None or not allowed[ENCRYPT]:
                await self.calls.authorize(who, scope, ENCRYPT)
            scope_id, version, cipher = await self._encryption_key(scope)
            if not self.usage.take(scope_id, version):  # reserved before use (keyrotor.census.usage)
                scope_id, version, cipher = await self.ring.reserve(scope, scope_id, version, cipher)
            token = envelope.seal(data, cipher=cipher, scope=scope, dek_version=version, context=context)
            # Counts the encryption; a location new to this process is recorded (committed)
            # before the ciphertext leaves, so no stored value has a location nobody knows.
            location = self.usage.count_context(scope_id, version, context)
            if location is not None:
                await self.usage.record(scope_id, version, location)
        except Exception as exc:
            await self.calls.failure("encrypt", who, scope, None, context, exc)
            raise
        audit = self.calls.writer
        if audit is not None:
            row: Row = ("encrypt", scope, version, True, *who, None, _context_metadata(context), now_us())
            if not audit.offer(row):
                await audit.put(row)
        else:
            self.calls.refuse_if_closed()  # closing: its caches could still seal, unaudited
        if self.cache.due:
            self.ring.refresh_due(self._sessions is not None)
        return token

    async def decrypt(
        self,
        scope: str,
        ciphertext: str,
        *,
        context: str = "",
        actor: str | None = None,
        ip: str | None = None,
        user_agent: str | None = None,
    ) -> str:
        """Decrypt a ``kr1`` value of ``scope`` (or a legacy value of the old Node backend).

        ``actor``, ``ip`` and ``user_agent`` name the caller as for :meth:`encrypt`. Every call
        is audited: ``decrypt``, or ``failed_decrypt`` with the error's class and message.

        Raises:
            InvalidScope, InvalidInput: bad input (a context that is not text of at most 1,024
                characters, or not valid Unicode).
            AccessDenied: no grant lets the actor decrypt in this scope.
            MalformedCiphertext: not a ciphertext at all.
            DecryptionFailed: wrong scope or context, tampered, or not UTF-8.
            KeyVersionUnknown, KeyVersionTooOld: the DEK version is unknown or destroyed.
            ScopeNotFound: the scope does not exist.
            SchemaMissing: the database has no keyrotor schema: run ``keyrotor db upgrade``.
            StoreUnavailable, KekUnavailable: an outage (transient).
        """
        who = self._who(actor, ip, user_agent)
        try:
            if (
                scope not in self._valid_scopes
                or (ciphertext.__class__ is str and len(ciphertext) > self._max_ciphertext_chars)
                or context.__class__ is not str
                or len(context) > MAX_CONTEXT_CHARS
            ):
                self._decrypt_checks(scope, ciphertext, context)
            allowed = self.grants.cached(who[0], scope)
            if allowed is None or not allowed[DECRYPT]:
                await self.calls.authorize(who, scope, DECRYPT)
            hit = self._open_cached(scope, ciphertext, context)
            value, version = await self._open(scope, ciphertext, context, who) if hit is None else hit
        except Exception as exc:
            metrics.decrypt_failed(exc)
            version = envelope.version_or_none(ciphertext)
            await self.calls.failure("failed_decrypt", who, scope, version, context, exc)
            raise
        audit = self.calls.writer
        if audit is not None:
            meta = _context_metadata(context) if version is not None else LEGACY_METADATA
            row: Row = ("decrypt", scope, version, True, *who, None, meta, now_us())
            if not audit.offer(row):
                await audit.put(row)
        else:
            self.calls.refuse_if_closed()  # closing: its caches could still open, unaudited
        if self.cache.due:
            self.ring.refresh_due(self._sessions is not None)
        return value

    async def _open_successor(self, scope: str, ciphertext: str, context: str, who: Who) -> str:
        """The plaintext of the kr1 value a migrated legacy value's row now holds (the legacy
        reader's proof that the value presented was that row's: keyrotor.legacy.reader)."""
        return (await self.opener.open(scope, ciphertext, context, who))[0]

    def _decrypt_checks(self, scope: str, ciphertext: str, context: str) -> None:
        """The checks a decrypt makes before any work: the length bound, the scope's name, then
        the context (text no longer than any encrypt accepts: a longer one names no value, and
        would only fill the AAD memo)."""
        if ciphertext.__class__ is str and len(ciphertext) > self._max_ciphertext_chars:
            raise CiphertextTooLarge(
                f"ciphertext of {len(ciphertext)} characters is longer than any value of "
                f"KEYROTOR_MAX_VALUE_BYTES={self.settings.max_value_bytes} ({self._max_ciphertext_chars})"
            )
        self._check_scope(scope)
        check_context(context)

    # --- checks ----------------------------------------------------------------------------

    def _check_scope(self, scope: str) -> None:
        if scope in self._valid_scopes:
            return
        check_scope(scope)
        if len(self._valid_scopes) < _MAX_SCOPES:
            self._valid_scopes.add(scope)

    # --- cache control ---------------------------------------------------------------------

    def on_key_change(self, change: KeyChange) -> None:
        """Called by the key-change listener: forget what a rotation, retirement or reconnect made stale.

        A new ``pending`` DEK needs nothing (it is loaded on first sight), nor does a rewrap (a
        DEK's bytes do not change); every other change drops the scope's cached DEKs and active
        version (all scopes for ``resync``).
        """
        if change.event not in ("pending", "rewrapped"):
            self.invalidate(change.scope)

    def invalidate(self, scope: str | None = None) -> None:
        """Forget cached DEKs and active versions (all, or one scope's).

        Rotation calls this in every process (through Redis) when a scope's keys change.
        """
        self.ring.invalidate(scope)


def max_ciphertext_chars(max_value_bytes: int) -> int:
    """The longest text a value of ``max_value_bytes`` can be stored as, kr1 or legacy.

    kr1: ``kr1:`` + a version (10 digits at most) + ``:`` + unpadded base64url of
    nonce || ciphertext || tag. Legacy: padded base64 of salt || iv || tag || ciphertext.
    """
    kr1 = 4 + 10 + 1 + -(-(envelope.NONCE_BYTES + max_value_bytes + envelope.TAG_BYTES) * 4 // 3)
    old = 4 * -(-(LEGACY_HEADER_LEN + max_value_bytes) // 3)
    return max(kr1, old)
