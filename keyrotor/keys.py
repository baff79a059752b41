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

import asyncio
import logging
import time
from collections import Counter
from collections.abc import Awaitable, Callable, Mapping, Sequence
from datetime import UTC, datetime
from types import TracebackType
from typing import Any, Self

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession, async_sessionmaker

from keyrotor import metrics
from keyrotor.audit import lockdown
from keyrotor.audit.checkpoint import Checkpointer, open_audit_key
from keyrotor.audit.durable import DurableAuditWriter
from keyrotor.audit.grants import Grant, GrantCache, grant_access, revoke_access
from keyrotor.audit.key import AuditKey
from keyrotor.audit.log import (
    CALLER,
    MAX_ERROR_CHARS,
    Row,
    check_actor,
    clean_short,
    clean_text,
    metadata_json,
    normalize_metadata,
    now_us,
)
from keyrotor.audit.writer import AuditWriter
from keyrotor.cache import DekCache
from keyrotor.census.locations import location_of
from keyrotor.census.usage import UsageCounter
from keyrotor.crypto import envelope
from keyrotor.crypto import legacy_format as legacy
from keyrotor.errors import (
    AccessDenied,
    CiphertextTooLarge,
    ConfigurationError,
    DecryptionFailed,
    InvalidInput,
    InvalidValue,
    KeyExhausted,
    KeyrotorError,
    KeyVersionUnknown,
    LegacyDecryptDisabled,
    LegacyDecryptThrottled,
    MalformedCiphertext,
    ScopeNotFound,
    SecretNotFound,
    StoreUnavailable,
)
from keyrotor.kek.base import KekProvider, WrapContext
from keyrotor.kek.factory import open_provider
from keyrotor.legacy import scope as legacy_scope
from keyrotor.legacy.guard import LegacyGuard
from keyrotor.notify import KeyChange, KeyChangeListener
from keyrotor.replication.check import Replication
from keyrotor.schedule.rules import KeyState, RotationPolicy, check_decryptable, check_scope
from keyrotor.settings import Settings
from keyrotor.store import db, repo

MAX_NAME_CHARS = 200
MAX_CONTEXT_CHARS = 1024

log = logging.getLogger(__name__)

# (actor, ip, user agent) of a call
_Who = tuple[str, str | None, str | None]
_ENCRYPT, _DECRYPT = 0, 1
_OPERATION = ("encrypt", "decrypt")
_current_caller = CALLER.get  # the innermost actor_context, read on every call
# The decrypt hot path's helpers, bound once.
_split, _aad, _NONCE = envelope.split, envelope.aad, envelope.NONCE_BYTES
# Parsed kr1 values kept by KeyManager.decrypt, keyed by their text. A stored value is decrypted
# again on every request that uses it, and parsing it (strict base64url) costs about twice the
# AES-GCM call. Ciphertext is not secret; the memo holds only (version, nonce||ciphertext||tag),
# and only of values that authenticated, so a caller cannot fill it with forgeries. It is bounded
# in bytes, not entries (an entry is charged its text, its bytes and _PARSED_OVERHEAD for the
# objects and the dict slot), and emptied when full; values longer than _PARSED_MAX_CHARS (far
# beyond an API key) are not kept at all, as parsing is then small beside the AES-GCM call.
_PARSED_BUDGET_BYTES = 4 * 1024 * 1024
_PARSED_MAX_CHARS = 4096
_PARSED_OVERHEAD = 256
# A use of a retired DEK version is written to retired_key_uses (which cancels its destruction)
# once per (scope, version, location) per process in this many seconds; each call is audited.
RETIRED_USE_INTERVAL_S = 60.0
_RETIRED_USE_SQL = text(
    "INSERT INTO retired_key_uses (scope_id, dek_version, location, actor) VALUES (:s, :v, :l, :a)"
)
# Event metadata is queued as JSON text (keyrotor.audit.log.Row).
_OPERATION_METADATA = ('{"operation":"encrypt"}', '{"operation":"decrypt"}')


class KeyManager:
    """Encrypts and decrypts values for scopes. Use as an async context manager.

    Args:
        settings: configuration (``Settings.from_env()`` or built in code).
        kek: a KEK provider; by default the one ``settings.secrets_provider`` names.
        engine: an async SQLAlchemy engine; by default one for ``settings.database_url``.
            Objects passed in are not closed by the manager.
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
    ) -> None:
        self.settings = settings
        self._environ = environ
        self._kek = kek
        self._owns_kek = kek is None
        self._engine = engine
        self._owns_engine = engine is None
        self._sessions: async_sessionmaker[AsyncSession] | None = None
        self.cache = DekCache(
            ttl_s=settings.dek_cache_ttl_s,
            max_entries=settings.dek_cache_max_entries,
            refresh_ahead=settings.dek_cache_refresh_ahead,
        )
        # Background refreshes of cached DEKs near their expiry (DekCache.due), one a key.
        self._refreshing: dict[tuple[str, int], asyncio.Task[None]] = {}
        metrics.track_cache(self.cache)
        # scope -> (scope id, active version, monotonic expiry)
        self._active: dict[str, tuple[int, int, float]] = {}
        self._inflight: dict[tuple[str, int], asyncio.Future[AESGCM]] = {}
        self._valid_scopes: set[str] = set()
        self._parsed: dict[str, tuple[int, bytes]] = {}  # see _PARSED_BUDGET_BYTES
        self._parsed_bytes = 0
        self._max_ciphertext_chars = max_ciphertext_chars(settings.max_value_bytes)
        self.legacy_guard = LegacyGuard(
            settings.legacy_decrypt_concurrency, settings.legacy_failures_per_minute
        )
        # Retired DEK versions this process loaded: (scope, version) -> scope id. Empty in the
        # normal case, so the decrypt path pays one truth test for it.
        self._retired: dict[tuple[str, int], int] = {}
        self._retired_noted: dict[tuple[str, int, str], float] = {}  # -> monotonic time of next write
        # Cached DEK versions loaded in a state that leads to destruction (grace, retired) ->
        # monotonic time their state is read again (_confirm): a process that missed the
        # announcement of a destruction stops using the key within KEYROTOR_ACTIVE_VERSION_TTL_SECONDS,
        # not the cache's TTL. Empty while only active keys are in use: one truth test a decrypt.
        self._unconfirmed: dict[tuple[str, int], float] = {}
        self.grants = GrantCache(lambda: self.sessions, ttl_s=settings.grants_ttl_s)
        self._audit: AuditWriter | None = None
        self._audit_key: AuditKey | None = None
        self._load_audit_key: Callable[[], Awaitable[AuditKey]] | None = None
        self._checkpoints: Checkpointer | None = None
        try:
            default_actor = check_actor(settings.default_actor)
        except InvalidInput as exc:
            raise ConfigurationError(f"KEYROTOR_DEFAULT_ACTOR: {exc}") from None
        self._default_who: _Who = (default_actor, None, None)
        self._actors: set[str] = {default_actor}
        self._plain_whos: dict[str, _Who] = {default_actor: self._default_who}  # validated actors
        # Redis listener for key changes announced by rotation (keyrotor.notify); see open().
        self.key_listener: KeyChangeListener | None = None
        # Multi-region replication and failover reads (keyrotor.replication.check), when configured.
        self.replication: Replication | None = None
        # Encryptions per DEK, counted in memory and flushed in batches (keyrotor.census.usage).
        self.usage = UsageCounter(
            lambda: self.sessions,
            default_max=settings.max_encryptions_per_dek,
            interval_s=settings.usage_flush_interval_s,
        )

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
        """Connect: build the engine and the KEK provider (refuses a missing or weak key)."""
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
        # The audit chain's key (keyrotor.audit.key) and its signed checkpoints.
        if self._checkpoints is None:
            self._audit_key, self._load_audit_key, self._checkpoints = await open_audit_key(
                self._sessions, self._kek, self.settings
            )
        if not self.settings.audit_enabled:
            log.warning("KEYROTOR_AUDIT=off: encrypt/decrypt calls are not audited (not compliant)")
        elif self._audit is None:
            # durable: a call returns once its event is committed (keyrotor.audit.durable).
            writer = DurableAuditWriter if self.settings.audit_mode == "durable" else AuditWriter
            self._audit = writer(
                self._engine,
                queue_max=self.settings.audit_queue_max,
                batch_size=self.settings.audit_batch_size,
                flush_interval_s=self.settings.audit_flush_interval_s,
                close_timeout_s=self.settings.audit_close_timeout_s,
                put_timeout_s=self.settings.audit_put_timeout_s,
                key=self._audit_key,
                key_loader=self._load_audit_key,
            )
            await self._audit.start()
        if self.settings.regions and self.replication is None:
            self.replication = Replication.open(
                self.settings, self._sessions, self._kek, self._environ, on_failover=self._failover_event
            )
        self.usage.start()
        if self.warn_open_grants and await lockdown.still_open(self._sessions):
            log.warning(lockdown.OPEN_GRANT_WARNING)  # the open default grant '* *': say so once

    async def close(self) -> None:
        """Release what the manager opened, after writing every queued audit event.

        Cached DEKs are dropped.
        """
        for task in list(self._refreshing.values()):
            task.cancel()
        if self._refreshing:
            await asyncio.gather(*self._refreshing.values(), return_exceptions=True)
        await self.usage.close()
        if self.replication is not None:
            await self.replication.aclose()
            self.replication = None
        if self._audit is not None:
            await self._audit.close()
            self._audit = None
            # A closed manager must not go on decrypting unaudited (its caches could allow it).
            self._sessions = None
        if self._checkpoints is not None:  # after the last event: it signs the final head
            await self._checkpoints.close()
            self._checkpoints = None
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
        self.legacy_guard.close()

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
        return self._audit

    async def flush_audit(self) -> None:
        """Wait until every audit event of this manager queued so far is written."""
        if self._audit is not None:
            await self._audit.flush()

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
            StoreUnavailable, KekUnavailable: an outage (transient).
        """
        who = self._who(actor, ip, user_agent)
        try:
            data = self._plaintext_bytes(plaintext)
            self._check_scope(scope)
            self._check_context(context)
            allowed = self.grants.cached(who[0], scope)
            if allowed is None or not allowed[_ENCRYPT]:
                await self._authorize(who, scope, _ENCRYPT)
            scope_id, version, cipher = await self._encryption_key(scope)
            if not self.usage.take(scope_id, version):  # reserved before use (keyrotor.census.usage)
                scope_id, version, cipher = await self._reserve(scope, scope_id, version, cipher)
            token = envelope.seal(data, cipher=cipher, scope=scope, dek_version=version, context=context)
            # Counts the encryption; a location new to this process is recorded (committed)
            # before the ciphertext leaves, so no stored value has a location nobody knows.
            location = self.usage.count_context(scope_id, version, context)
            if location is not None:
                await self.usage.record(scope_id, version, location)
        except Exception as exc:
            await self._audit_failure("encrypt", who, scope, None, context, exc)
            raise
        audit = self._audit
        if audit is not None:
            row: Row = (
                "encrypt",
                scope,
                version,
                True,
                *who,
                None,
                _context_metadata(context),
                now_us(),
            )
            if not audit.offer(row):
                await audit.put(row)
        if self.cache.due:
            self._refresh_due()
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
            AccessDenied: no grant lets the actor decrypt in this scope.
            MalformedCiphertext: not a ciphertext at all.
            DecryptionFailed: wrong scope or context, tampered, or not UTF-8.
            KeyVersionUnknown, KeyVersionTooOld: the DEK version is unknown or destroyed.
            ScopeNotFound: the scope does not exist.
            StoreUnavailable, KekUnavailable: an outage (transient).
        """
        who = self._who(actor, ip, user_agent)
        version: int | None
        try:
            if ciphertext.__class__ is str and len(ciphertext) > self._max_ciphertext_chars:
                raise CiphertextTooLarge(
                    f"ciphertext of {len(ciphertext)} characters is longer than any value of "
                    f"KEYROTOR_MAX_VALUE_BYTES={self.settings.max_value_bytes} ({self._max_ciphertext_chars})"
                )
            if scope not in self._valid_scopes:
                self._check_scope(scope)
            allowed = self.grants.cached(who[0], scope)
            if allowed is None or not allowed[_DECRYPT]:
                await self._authorize(who, scope, _DECRYPT)
            # A kr1 value runs inline (no coroutine of its own, no second scope check, its parse
            # memoised); a legacy or malformed one goes through _decrypt_value.
            parsed = memo = self._parsed.get(ciphertext) if ciphertext.__class__ is str else None
            if parsed is None:
                parsed = self._parse(ciphertext)
            if parsed is None:  # legacy, or malformed
                value, version = await self._decrypt_value(scope, ciphertext, context, who)
            else:
                version, raw = parsed
                cipher = self.cache.get(scope, version) or await self._load(scope, version)
                if self._unconfirmed and (scope, version) in self._unconfirmed:
                    await self._confirm(scope, version)
                try:
                    value = cipher.decrypt(raw[:_NONCE], raw[_NONCE:], _aad(scope, version, context)).decode()
                except InvalidTag:
                    raise envelope.authentication_failed(version) from None
                except UnicodeDecodeError:
                    raise DecryptionFailed("decrypted value is not valid UTF-8") from None
                if memo is None:
                    self._remember(ciphertext, parsed)
            if self._retired and (scope, version) in self._retired:
                # (a legacy value's version None is never a key of _retired)
                await self._retired_use(who, scope, version, context)  # type: ignore[arg-type]
        except Exception as exc:
            metrics.decrypt_failed(exc)
            await self._audit_failure("failed_decrypt", who, scope, _peek_version(ciphertext), context, exc)
            raise
        audit = self._audit
        if audit is not None:
            row: Row = (
                "decrypt",
                scope,
                version,
                True,
                *who,
                None,
                _context_metadata(context) if version is not None else _LEGACY_METADATA,
                now_us(),
            )
            if not audit.offer(row):
                await audit.put(row)
        if self.cache.due:
            self._refresh_due()
        return value

    def _refresh_due(self) -> None:
        """Start a background unwrap of each cached DEK a hit found near its expiry."""
        for key in self.cache.take_due():
            if key not in self._refreshing and self._sessions is not None:
                task = asyncio.get_running_loop().create_task(self._refresh(*key))
                self._refreshing[key] = task

    async def _refresh(self, scope: str, version: int) -> None:
        try:
            await self._load(scope, version)  # puts the DEK back with a new TTL
            metrics.dek_refreshed(True)
        except asyncio.CancelledError:
            raise
        except Exception as exc:
            # The entry keeps its remaining life; the next miss tries again (and raises there).
            metrics.dek_refreshed(False)
            log.warning("dek_refresh_failed scope=%s version=%s error=%s", scope, version, type(exc).__name__)
        finally:
            self._refreshing.pop((scope, version), None)

    @staticmethod
    def _parse(ciphertext: str) -> tuple[int, bytes] | None:
        """Parse a kr1 value (None if it is not one; _decrypt_value says why)."""
        try:
            return _split(ciphertext)
        except MalformedCiphertext:
            return None

    def _remember(self, ciphertext: str, parsed: tuple[int, bytes]) -> None:
        """Keep the parse of a value that authenticated (see _PARSED_BUDGET_BYTES)."""
        if len(ciphertext) > _PARSED_MAX_CHARS:
            return
        size = len(ciphertext) + len(parsed[1]) + _PARSED_OVERHEAD
        if self._parsed_bytes + size > _PARSED_BUDGET_BYTES:
            self._parsed.clear()
            self._parsed_bytes = 0
        self._parsed[ciphertext] = parsed
        self._parsed_bytes += size

    async def _decrypt_value(
        self, scope: str, ciphertext: str, context: str, who: _Who | None = None
    ) -> tuple[str, int | None]:
        """The plaintext and its DEK version (None for a legacy value): no grant check, no audit
        (but a legacy decrypt refused for too many failures records one ``unauthorized`` event)."""
        if scope not in self._valid_scopes:
            self._check_scope(scope)
        try:
            version, raw = envelope.split(ciphertext)
        except MalformedCiphertext:
            if isinstance(ciphertext, str) and not ciphertext.startswith(envelope.PREFIX):
                if legacy.is_legacy(ciphertext):
                    who = who or self._default_who
                    await self._bind_legacy(scope, ciphertext, context, who)
                    return await self._decrypt_legacy(ciphertext, who), None
                raise MalformedCiphertext("not a kr1 or legacy ciphertext") from None
            raise
        cipher = self.cache.get(scope, version) or await self._load(scope, version)
        if self._unconfirmed and (scope, version) in self._unconfirmed:
            await self._confirm(scope, version)
        data = envelope.open_raw(raw, cipher=cipher, scope=scope, dek_version=version, context=context)
        try:
            return data.decode(), version
        except UnicodeDecodeError:
            raise DecryptionFailed("decrypted value is not valid UTF-8") from None

    async def _bind_legacy(self, scope: str, ciphertext: str, context: str, who: _Who) -> None:
        """Refuse a legacy value unless ``context`` names its row and that row is ``scope``'s.

        A legacy value carries no scope or context of its own, so without this a grant on any
        scope would read every scope's legacy values (``keyrotor.legacy.scope``).

        Raises:
            LegacyDecryptDisabled: ``KEYROTOR_LEGACY_DECRYPT=off``.
            AccessDenied: the value does not belong where the caller says (audited ``unauthorized``).
        """
        if self.settings.legacy_decrypt == "off":
            raise LegacyDecryptDisabled(
                "legacy values are not decrypted (KEYROTOR_LEGACY_DECRYPT=off): run "
                "`keyrotor legacy migrate`, or set KEYROTOR_LEGACY_DECRYPT=on"
            )
        async with db.transaction(self.sessions) as session:
            reason = await legacy_scope.refusal(session, scope, context, ciphertext)
        if reason is None:
            return
        message = f"actor {who[0]!r} may not decrypt this legacy value in scope {scope!r}: {reason}"
        meta = '{"operation":"decrypt","format":"legacy"}'
        row: Row = (
            "unauthorized",
            scope,
            None,
            False,
            *who,
            clean_text(message, MAX_ERROR_CHARS),
            meta,
            now_us(),
        )
        await self._emit(row)
        raise AccessDenied(message)

    async def _decrypt_legacy(self, ciphertext: str, who: _Who) -> str:
        key = self.settings.legacy_key
        if not key:
            raise ConfigurationError(
                "a legacy value needs ENCRYPTION_KEY (or KEYROTOR_LEGACY_KEY) to decrypt"
            )
        try:
            return await self.legacy_guard.decrypt(who[0], ciphertext, key)
        except LegacyDecryptThrottled as exc:
            if exc.first_in_window:  # one event a window, however many attempts follow
                meta = '{"operation":"decrypt","format":"legacy"}'
                await self._emit(("unauthorized", None, None, False, *who, str(exc), meta, now_us()))
            raise

    # --- secrets table ---------------------------------------------------------------------

    async def put_secret(
        self,
        scope: str,
        name: str,
        value: str,
        *,
        actor: str | None = None,
        ip: str | None = None,
        user_agent: str | None = None,
    ) -> None:
        """Store (or replace) a named value in keyrotor's ``secrets`` table.

        Raises:
            InvalidScope, InvalidValue, InvalidInput: bad input.
            AccessDenied: no grant lets the actor encrypt in this scope.
        """
        await self.put_secrets(scope, [(name, value)], actor=actor, ip=ip, user_agent=user_agent)

    async def put_secrets(
        self,
        scope: str,
        items: Sequence[tuple[str, str]],
        *,
        actor: str | None = None,
        ip: str | None = None,
        user_agent: str | None = None,
    ) -> int:
        """Store many ``(name, value)`` pairs of one scope in one transaction. Returns the count.

        Each value is one ``encrypt`` audit event (context ``secret:<name>``).
        """
        who = self._who(actor, ip, user_agent)
        try:
            version = await self._put_secrets(who, scope, items)
        except Exception as exc:
            await self._audit_failure("encrypt", who, scope, None, "", exc, {"values": len(items)})
            raise
        audit = self._audit
        if audit is not None:
            now = now_us()
            rows: list[Row] = [
                ("encrypt", scope, version, True, *who, None, _context_metadata(_secret_context(name)), now)
                for name, _ in items
            ]
            if isinstance(audit, DurableAuditWriter):
                await audit.put_many(rows)  # one commit for all, not one per value
            else:
                for row in rows:
                    await self._emit(row)
        return len(items)

    async def _put_secrets(self, who: _Who, scope: str, items: Sequence[tuple[str, str]]) -> int:
        for name, _ in items:
            self._check_name(name)
        self._check_scope(scope)
        await self._authorize(who, scope, _ENCRYPT)
        scope_id, version, cipher = await self._encryption_key(scope)
        scope_id, version, cipher = await self._reserve(scope, scope_id, version, cipher, len(items))
        rows = [
            (
                name,
                envelope.seal(
                    self._plaintext_bytes(value),
                    cipher=cipher,
                    scope=scope,
                    dek_version=version,
                    context=_secret_context(name),
                ),
            )
            for name, value in items
        ]
        for location, n in Counter(location_of(_secret_context(name)) for name, _ in items).items():
            if not self.usage.count(scope_id, version, location, n):
                await self.usage.record(scope_id, version, location, n)
        async with db.transaction(self.sessions) as session:
            await repo.put_secrets(session, scope_id, rows, version)
        return version

    async def get_secret(
        self,
        scope: str,
        name: str,
        *,
        actor: str | None = None,
        ip: str | None = None,
        user_agent: str | None = None,
    ) -> str:
        """Read and decrypt a named value (audited as a ``decrypt`` of context ``secret:<name>``).

        Raises:
            SecretNotFound: no such secret in that scope.
            AccessDenied: no grant lets the actor decrypt in this scope.
        """
        who = self._who(actor, ip, user_agent)
        context = _secret_context(name) if isinstance(name, str) else ""
        version: int | None = None
        try:
            self._check_scope(scope)
            self._check_name(name)
            await self._authorize(who, scope, _DECRYPT)
            async with db.transaction(self.sessions) as session:
                row = await repo.get_secret(session, scope, name)
            if row is None:
                raise SecretNotFound(f"no secret {name!r} in scope {scope!r}")
            version = _peek_version(row.ciphertext)
            value, version = await self._decrypt_value(scope, row.ciphertext, context, who)
            if self._retired and version is not None and (scope, version) in self._retired:
                await self._retired_use(who, scope, version, context)
        except Exception as exc:
            await self._audit_failure("failed_decrypt", who, scope, version, context, exc)
            raise
        await self._emit(("decrypt", scope, version, True, *who, None, _context_metadata(context), now_us()))
        return value

    # --- grants ----------------------------------------------------------------------------

    async def grant(
        self, actor: str, scope: str, *, encrypt: bool = False, decrypt: bool = False, by: str | None = None
    ) -> Grant:
        """Allow ``actor`` (or ``*``) to encrypt and/or decrypt in scopes matching ``scope``.

        Recorded as a ``config_change`` by ``by`` (default: the current caller). Takes effect
        in this process at once, in others within ``KEYROTOR_GRANTS_TTL_SECONDS``.

        Raises:
            InvalidInput: bad actor or scope pattern, or neither permission.
        """
        by = by or self._who(None, None, None)[0]
        async with db.transaction(self.sessions) as session:
            return await grant_access(session, actor, scope, encrypt=encrypt, decrypt=decrypt, by=by)

    async def revoke(
        self, actor: str, scope: str, *, encrypt: bool = False, decrypt: bool = False, by: str | None = None
    ) -> Grant | None:
        """Remove a grant, or only its ``encrypt``/``decrypt`` permission.

        See ``keyrotor.audit.grants.revoke``.

        Raises:
            NotFound: no grant for exactly that actor and pattern.
        """
        by = by or self._who(None, None, None)[0]
        async with db.transaction(self.sessions) as session:
            return await revoke_access(session, actor, scope, encrypt=encrypt, decrypt=decrypt, by=by)

    # --- audit helpers ---------------------------------------------------------------------

    def _who(self, actor: str | None, ip: str | None, user_agent: str | None) -> _Who:
        """The caller: keyword arguments, else the innermost actor_context, else the default actor."""
        ctx = _current_caller()
        if ip is None and user_agent is None:
            if actor is None:
                return self._default_who if ctx is None else ctx.who
            if ctx is None:
                who = self._plain_whos.get(actor)
                if who is not None:
                    return who
        if actor is None:
            name = self._default_who[0] if ctx is None else ctx.actor
        elif actor in self._actors:
            name = actor
        else:
            name = check_actor(actor)
            if len(self._actors) < 10_000:
                self._actors.add(name)
                self._plain_whos[name] = (name, None, None)
        return (
            name,
            clean_short(ip) if ip is not None else (ctx.ip if ctx else None),
            clean_short(user_agent) if user_agent is not None else (ctx.user_agent if ctx else None),
        )

    async def _authorize(self, who: _Who, scope: str, operation: int) -> None:
        """Raise AccessDenied (and record ``unauthorized``) unless a grant allows the call."""
        if (await self.grants.permissions(who[0], scope))[operation]:
            return
        message = f"actor {who[0]!r} may not {_OPERATION[operation]} in scope {scope!r}"
        await self._emit(
            (
                "unauthorized",
                scope,
                None,
                False,
                *who,
                message,
                _OPERATION_METADATA[operation],
                now_us(),
            )
        )
        raise AccessDenied(message)

    async def _emit(self, row: Row) -> None:
        audit = self._audit
        if audit is not None and not audit.offer(row):
            await audit.put(row)

    async def _audit_failure(
        self,
        event_type: str,
        who: _Who,
        scope: object,
        version: int | None,
        context: object,
        exc: Exception,
        extra: dict[str, Any] | None = None,
    ) -> None:
        if self._audit is None or isinstance(exc, AccessDenied):
            return  # a denial was recorded as `unauthorized` already
        # The typed errors' messages never hold values or ciphertexts; anything else may
        # quote data, so only its class is kept.
        if isinstance(exc, KeyrotorError):
            error = f"{type(exc).__name__}: {clean_text(str(exc), MAX_ERROR_CHARS)}"
        else:
            error = f"{type(exc).__name__} (unexpected error)"
        metadata: dict[str, Any] = {"context": context} if isinstance(context, str) and context else {}
        metadata.update(extra or {})
        row: Row = (
            event_type,
            scope if isinstance(scope, str) and scope in self._valid_scopes else None,
            version,
            False,
            *who,
            error,
            metadata_json(normalize_metadata(metadata)),
            now_us(),
        )
        try:
            await self._emit(row)
        except ConfigurationError:  # closed meanwhile: keep the caller's own error, say so loudly
            log.error("audit writer closed: a %s event (%s) was not recorded", event_type, type(exc).__name__)

    async def _retired_use(self, who: _Who, scope: str, version: int, context: str) -> None:
        """A decrypt needed retired ``version``: it succeeds, and is audited (each call), counted,
        logged and recorded in ``retired_key_uses`` (once per location and interval, before the
        value is returned), which cancels the version's pending destruction."""
        scope_id = self._retired.get((scope, version))
        location = location_of(context)
        metrics.RETIRED_KEY_USES.labels(scope, str(version)).inc()
        meta = metadata_json({"location": clean_text(location, MAX_CONTEXT_CHARS)})
        await self._emit(("retired_key_use", scope, version, True, *who, None, meta, now_us()))
        key = (scope, version, location)
        now = time.monotonic()
        if scope_id is None or now < self._retired_noted.get(key, 0.0):
            return
        if len(self._retired_noted) >= 10_000:
            self._retired_noted.clear()
        self._retired_noted[key] = now + RETIRED_USE_INTERVAL_S
        log.warning(
            "retired DEK used: scope=%s version=%d location=%r (its destruction is cancelled; "
            "re-encrypt that value or `keyrotor keys restore %s %d`)",
            scope, version, location, scope, version,
        )  # fmt: skip
        try:
            async with db.transaction(self.sessions) as session:
                await session.execute(
                    _RETIRED_USE_SQL,
                    {"s": scope_id, "v": version, "l": location, "a": who[0]},
                )
        except Exception as exc:  # the value decrypted; the next use records it
            self._retired_noted.pop(key, None)
            log.error("retired DEK use of %s v%d not recorded: %s", scope, version, type(exc).__name__)

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
        self.cache.invalidate(scope)
        if scope is None:
            self._active.clear()
            self._retired.clear()
            self._unconfirmed.clear()
        else:
            self._active.pop(scope, None)
            for key in [k for k in self._retired if k[0] == scope]:
                del self._retired[key]
            for key in [k for k in self._unconfirmed if k[0] == scope]:
                del self._unconfirmed[key]

    async def _failover_event(self, success: bool, metadata: dict[str, Any], error: str | None) -> None:
        """Record a ``failover`` audit event (DEK reads left the primary region, or returned)."""
        meta = metadata_json(normalize_metadata(metadata))
        row: Row = ("failover", None, None, success, *self._default_who, error, meta, now_us())
        if isinstance(self._audit, DurableAuditWriter):
            # Not a caller's event, and the audit database may be what is down: kept until written.
            self._audit.put_nowait(row)
        else:
            await self._emit(row)

    # --- internals -------------------------------------------------------------------------

    async def _encryption_key(self, scope: str) -> tuple[int, int, AESGCM]:
        """(scope id, active version, cipher) for new values of ``scope``."""
        entry = self._active.get(scope)
        if entry is not None and time.monotonic() < entry[2]:
            cipher = self.cache.get(scope, entry[1])
            if cipher is not None:
                return entry[0], entry[1], cipher
        record = await self._active_record(scope)
        self._active[scope] = (
            record.scope_id,
            record.version,
            time.monotonic() + self.settings.active_version_ttl_s,
        )
        cipher = self.cache.get(scope, record.version) or await self._load(scope, record.version)
        return record.scope_id, record.version, cipher

    async def _reserve(
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
            self._active.pop(scope, None)
            fresh = await self._encryption_key(scope)
            if fresh[1] == version:
                raise
        await self.usage.acquire(fresh[0], fresh[1], n, scope=scope)
        return fresh

    async def _active_record(self, scope: str) -> repo.KeyRecord:
        async with db.transaction(self.sessions) as session:
            record = await repo.get_key(session, scope)
        if record is not None:
            return record
        # First use: create the scope with DEK v1. Wrap outside any transaction (a KEK call
        # may take a network round trip), then insert; a concurrent creator wins harmlessly.
        dek = envelope.new_dek()
        wrapped = await self.kek.wrap(dek, WrapContext(scope, 1))
        policy = RotationPolicy(
            enabled=self.settings.default_rotation_enabled,
            interval_days=self.settings.default_interval_days,
            grace_days=min(self.settings.default_grace_days, self.settings.default_interval_days),
        )
        async with db.transaction(self.sessions) as session:
            created = await repo.create_scope(session, scope, wrapped, policy, datetime.now(UTC))
            record = await repo.get_key(session, scope)
        if created:
            self.cache.put(scope, 1, AESGCM(dek))
            if self.replication is not None:
                self.replication.follow(scope)  # copy the new DEK to every region now
        if record is None:  # pragma: no cover - the row was just written or read
            raise ScopeNotFound(f"scope {scope!r} could not be created")
        return record

    async def _load(self, scope: str, version: int) -> AESGCM:
        """Fetch and unwrap one DEK; concurrent misses for the same key share one fetch."""
        key = (scope, version)
        pending = self._inflight.get(key)
        if pending is not None:
            return await asyncio.shield(pending)
        future: asyncio.Future[AESGCM] = asyncio.get_running_loop().create_future()
        self._inflight[key] = future
        try:
            if self.replication is None:
                cipher = await self._fetch(scope, version)
            else:  # the primary, or a secondary region's copy if the primary is unavailable
                cipher = await self.replication.fetch(scope, version, self._fetch)
                self.cache.put(scope, version, cipher)
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
        async with db.transaction(self.sessions) as session:
            record = await repo.get_key(session, scope, version)
            if record is None and await repo.get_scope(session, scope) is None:
                raise ScopeNotFound(f"scope {scope!r} does not exist")
        if record is None:
            raise KeyVersionUnknown(f"{scope}: DEK v{version} is unknown")
        check_decryptable(scope, version, record.state, record.latest_version)
        assert record.wrapped is not None  # decryptable states always keep their wrapped key
        self._note_state(scope, version, record.state, record.scope_id)
        dek = await self.kek.unwrap(record.wrapped, WrapContext(scope, version))
        cipher = AESGCM(dek)
        self.cache.put(scope, version, cipher)
        return cipher

    def _note_state(self, scope: str, version: int, state: KeyState | None, scope_id: int) -> None:
        """Remember what the loaded state of a cached DEK asks of its later uses."""
        key = (scope, version)
        if state == KeyState.RETIRED:  # decrypts, and each use is noticed (_retired_use)
            self._retired[key] = scope_id
        else:
            self._retired.pop(key, None)
        if state in (KeyState.GRACE, KeyState.RETIRED):
            self._unconfirmed[key] = time.monotonic() + self.settings.active_version_ttl_s
        else:
            self._unconfirmed.pop(key, None)

    async def _confirm(self, scope: str, version: int) -> None:
        """Read the state of a cached grace or retired DEK again if its check is due: a destroyed
        (or unknown) one is dropped from the cache and refused.

        Raises:
            KeyVersionTooOld, KeyVersionUnknown: the version was destroyed meanwhile.
            StoreUnavailable: a retired version's state cannot be read now (a grace version is
                used on: it cannot be destroyed without first being retired for days).
        """
        key = (scope, version)
        if time.monotonic() < self._unconfirmed.get(key, 0.0):
            return
        try:
            async with db.transaction(self.sessions) as session:
                record = await repo.get_key(session, scope, version)
        except StoreUnavailable:
            if key in self._retired:
                raise
            self._unconfirmed[key] = time.monotonic() + self.settings.active_version_ttl_s
            return
        if record is None or not record.state.decrypts:
            self.cache.invalidate(scope, version)
            self._unconfirmed.pop(key, None)
            self._retired.pop(key, None)
            log.warning("cached DEK %s v%d is no longer usable: dropped", scope, version)
            check_decryptable(scope, version, None if record is None else record.state, version)
        assert record is not None
        self._note_state(scope, version, record.state, record.scope_id)

    def _check_scope(self, scope: str) -> None:
        if scope in self._valid_scopes:
            return
        check_scope(scope)
        if len(self._valid_scopes) < 100_000:
            self._valid_scopes.add(scope)

    def _plaintext_bytes(self, plaintext: str) -> bytes:
        if not isinstance(plaintext, str):
            raise InvalidValue("value must be text (str)")
        if not plaintext:
            raise InvalidValue("value is empty")
        try:
            data = plaintext.encode()
        except UnicodeEncodeError:
            raise InvalidValue("value is not valid Unicode (lone surrogates)") from None
        if len(data) > self.settings.max_value_bytes:
            raise InvalidValue(
                f"value is too large ({len(data)} bytes; limit {self.settings.max_value_bytes}, "
                "KEYROTOR_MAX_VALUE_BYTES)"
            )
        return data

    @staticmethod
    def _check_context(context: str) -> None:
        if not isinstance(context, str) or len(context) > 1024:
            raise InvalidInput("context must be text of at most 1024 characters")

    @staticmethod
    def _check_name(name: str) -> None:
        if (
            not isinstance(name, str)
            or not name
            or len(name) > MAX_NAME_CHARS
            or not name.isprintable()
            or name != name.strip()
        ):
            raise InvalidInput(
                f"secret names are 1-{MAX_NAME_CHARS} printable characters without surrounding spaces"
            )


def max_ciphertext_chars(max_value_bytes: int) -> int:
    """The longest text a value of ``max_value_bytes`` can be stored as, kr1 or legacy.

    kr1: ``kr1:`` + a version (10 digits at most) + ``:`` + unpadded base64url of
    nonce || ciphertext || tag. Legacy: padded base64 of salt || iv || tag || ciphertext.
    """
    kr1 = 4 + 10 + 1 + -(-(envelope.NONCE_BYTES + max_value_bytes + envelope.TAG_BYTES) * 4 // 3)
    old = 4 * -(-(legacy.HEADER_LEN + max_value_bytes) // 3)
    return max(kr1, old)


def _secret_context(name: str) -> str:
    return f"secret:{name}"


_LEGACY_METADATA = '{"format":"legacy"}'
# context -> its metadata JSON: contexts repeat (a service decrypts the same rows again and again)
_CONTEXT_JSON: dict[str, str] = {"": "{}"}


def _context_metadata(context: str) -> str:
    meta = _CONTEXT_JSON.get(context)
    if meta is None:
        meta = metadata_json({"context": clean_text(context, MAX_CONTEXT_CHARS)})
        if len(_CONTEXT_JSON) < 10_000:
            _CONTEXT_JSON[context] = meta
    return meta


def _peek_version(ciphertext: object) -> int | None:
    """The DEK version a ciphertext names, if it is a readable kr1 value (for failure events)."""
    if not isinstance(ciphertext, str):
        return None
    try:
        return envelope.peek_version(ciphertext)
    except KeyrotorError:
        return None
