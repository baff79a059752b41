"""KeyManager: encrypt and decrypt for a scope, with a DEK cache.

``KeyManager`` is what an application imports::

    async with KeyManager.from_env() as km:
        token = await km.encrypt("anthropic", api_key, context="user:42")
        api_key = await km.decrypt("anthropic", token, context="user:42")

Each scope has one active DEK; new values are sealed with it (``keyrotor.envelope``). Values
sealed under any DEK version that still decrypts (pending, active, grace) open, as do legacy
values of the old Node backend (scrypt runs off the event loop). Unwrapped DEKs are cached
for ``KEYROTOR_DEK_CACHE_TTL_SECONDS`` (default 30 minutes), bounded by count.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Mapping, Sequence
from datetime import UTC, datetime
from types import TracebackType
from typing import Any, Self

from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession, async_sessionmaker

from keyrotor import envelope, legacy
from keyrotor.cache import DekCache
from keyrotor.errors import (
    ConfigurationError,
    DecryptionFailed,
    InvalidInput,
    InvalidValue,
    KeyVersionUnknown,
    MalformedCiphertext,
    ScopeNotFound,
    SecretNotFound,
)
from keyrotor.kek.base import KekProvider, WrapContext
from keyrotor.kek.factory import open_provider
from keyrotor.policy import RotationPolicy, check_decryptable, check_scope
from keyrotor.settings import Settings
from keyrotor.store import db, repo

MAX_NAME_CHARS = 200


class KeyManager:
    """Encrypts and decrypts values for scopes. Use as an async context manager.

    Args:
        settings: configuration (``Settings.from_env()`` or built in code).
        kek: a KEK provider; by default the one ``settings.secrets_provider`` names.
        engine: an async SQLAlchemy engine; by default one for ``settings.database_url``.
            Objects passed in are not closed by the manager.
    """

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
        self.cache = DekCache(ttl_s=settings.dek_cache_ttl_s, max_entries=settings.dek_cache_max_entries)
        # scope -> (scope id, active version, monotonic expiry)
        self._active: dict[str, tuple[int, int, float]] = {}
        self._inflight: dict[tuple[str, int], asyncio.Future[AESGCM]] = {}
        self._valid_scopes: set[str] = set()

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

    async def close(self) -> None:
        """Release what the manager opened. Cached DEKs are dropped."""
        self.cache.invalidate()
        self._active.clear()
        if self._owns_engine and self._engine is not None:
            await self._engine.dispose()
            self._engine = None
        if self._owns_kek and self._kek is not None:
            await self._kek.aclose()
            self._kek = None

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

    # --- encrypt / decrypt -----------------------------------------------------------------

    async def encrypt(self, scope: str, plaintext: str, *, context: str = "") -> str:
        """Encrypt a value under the scope's active DEK (creating the scope with DEK v1 on first use).

        Args:
            scope: e.g. ``anthropic`` or ``tenant-42/openai``.
            plaintext: the value (non-empty text, at most ``KEYROTOR_MAX_VALUE_BYTES`` as UTF-8).
            context: where the value will live (e.g. ``users.api_key:42``); the same context
                must be given to decrypt it.

        Returns:
            A ``kr1:<version>:...`` string.

        Raises:
            InvalidScope, InvalidValue: bad input.
            StoreUnavailable, KekUnavailable: an outage (transient).
        """
        data = self._plaintext_bytes(plaintext)
        self._check_scope(scope)
        self._check_context(context)
        _, version, cipher = await self._encryption_key(scope)
        return envelope.seal(data, cipher=cipher, scope=scope, dek_version=version, context=context)

    async def decrypt(self, scope: str, ciphertext: str, *, context: str = "") -> str:
        """Decrypt a ``kr1`` value of ``scope`` (or a legacy value of the old Node backend).

        Raises:
            MalformedCiphertext: not a ciphertext at all.
            DecryptionFailed: wrong scope or context, tampered, or not UTF-8.
            KeyVersionUnknown, KeyVersionTooOld: the DEK version is unknown or retired.
            ScopeNotFound: the scope does not exist.
            StoreUnavailable, KekUnavailable: an outage (transient).
        """
        if scope not in self._valid_scopes:
            self._check_scope(scope)
        if isinstance(ciphertext, str) and ciphertext.startswith("kr1:"):
            sealed = envelope.parse(ciphertext)
            cipher = self.cache.get(scope, sealed.dek_version) or await self._load(scope, sealed.dek_version)
            data = envelope.unseal(sealed, cipher=cipher, scope=scope, context=context)
        elif isinstance(ciphertext, str) and legacy.is_legacy(ciphertext):
            return await self._decrypt_legacy(ciphertext)
        else:
            raise MalformedCiphertext("not a kr1 or legacy ciphertext")
        try:
            return data.decode()
        except UnicodeDecodeError:
            raise DecryptionFailed("decrypted value is not valid UTF-8") from None

    async def _decrypt_legacy(self, ciphertext: str) -> str:
        key = self.settings.legacy_key
        if not key:
            raise ConfigurationError(
                "a legacy value needs ENCRYPTION_KEY (or KEYROTOR_LEGACY_KEY) to decrypt"
            )
        return await legacy.decrypt_async(ciphertext, key)

    # --- secrets table ---------------------------------------------------------------------

    async def put_secret(self, scope: str, name: str, value: str) -> None:
        """Store (or replace) a named value in keyrotor's ``secrets`` table.

        Raises:
            InvalidScope, InvalidValue, InvalidInput: bad input.
        """
        await self.put_secrets(scope, [(name, value)])

    async def put_secrets(self, scope: str, items: Sequence[tuple[str, str]]) -> int:
        """Store many ``(name, value)`` pairs of one scope in one transaction. Returns the count."""
        for name, _ in items:
            self._check_name(name)
        self._check_scope(scope)
        scope_id, version, cipher = await self._encryption_key(scope)
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
        async with db.transaction(self.sessions) as session:
            await repo.put_secrets(session, scope_id, rows, version)
        return len(rows)

    async def get_secret(self, scope: str, name: str) -> str:
        """Read and decrypt a named value.

        Raises:
            SecretNotFound: no such secret in that scope.
        """
        self._check_scope(scope)
        self._check_name(name)
        async with db.transaction(self.sessions) as session:
            row = await repo.get_secret(session, scope, name)
        if row is None:
            raise SecretNotFound(f"no secret {name!r} in scope {scope!r}")
        return await self.decrypt(scope, row.ciphertext, context=_secret_context(name))

    # --- cache control ---------------------------------------------------------------------

    def invalidate(self, scope: str | None = None) -> None:
        """Forget cached DEKs and active versions (all, or one scope's).

        Rotation calls this in every process (through Redis) when a scope's keys change.
        """
        self.cache.invalidate(scope)
        if scope is None:
            self._active.clear()
        else:
            self._active.pop(scope, None)

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
            cipher = await self._fetch(scope, version)
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
        dek = await self.kek.unwrap(record.wrapped, WrapContext(scope, version))
        cipher = AESGCM(dek)
        self.cache.put(scope, version, cipher)
        return cipher

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


def _secret_context(name: str) -> str:
    return f"secret:{name}"
