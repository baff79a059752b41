"""The legacy branch of ``KeyManager.decrypt``: a value without the ``kr1:`` prefix.

Each value is parsed once (:func:`keyrotor.crypto.legacy_format.parse`: no scrypt), and the
checks run from the cheapest up, so a refused value costs no scrypt:

1. the shape: anything that is not a legacy value is :class:`MalformedCiphertext`;
2. ``KEYROTOR_LEGACY_DECRYPT=off`` refuses every legacy value;
3. the scope binding (:mod:`keyrotor.legacy.scope`): the caller's context must name the row the
   value lives in, and that row must belong to the scope (else ``unauthorized`` is audited);
4. the guard (:mod:`keyrotor.legacy.guard`) bounds the scrypt work and each actor's failures.

A value the migration replaced after the caller read it (the row now holds a ``kr1`` value:
``keyrotor legacy migrate`` runs online, with no lock against the application's reads) is not
refused for that alone: its row's ``kr1`` successor is opened (the caller's grant, scope and
context, as any ``kr1`` value), then the presented value (scrypt, within the guard), and the
value opens only if both give the same plaintext. The caller learns nothing it could not read
through the row already; a stale value the application has since replaced, or another row's
value, opens to something else and is refused as before (audited, counted as a failure).
"""

from __future__ import annotations

import hmac
from collections.abc import Awaitable, Callable
from typing import NoReturn

from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from keyrotor.audit import calls
from keyrotor.audit.calls import Who
from keyrotor.audit.log import MAX_ERROR_CHARS, Row, clean_text
from keyrotor.crypto import legacy_format as legacy
from keyrotor.errors import (
    AccessDenied,
    ConfigurationError,
    InvalidInput,
    LegacyDecryptDisabled,
    LegacyDecryptThrottled,
    MalformedCiphertext,
    PermanentError,
)
from keyrotor.legacy import scope as legacy_scope
from keyrotor.legacy.guard import LegacyGuard
from keyrotor.settings import Settings
from keyrotor.store import db


class LegacyReader:
    """Decrypts legacy values for a KeyManager, within the checks of the module docstring.

    Args:
        settings: ``legacy_decrypt``, ``legacy_key`` and the guard's bounds.
        sessions: the manager's session factory (read when a value needs its scope binding).
        emit: queues an audit row (the manager's audit writer).
    """

    def __init__(
        self,
        settings: Settings,
        sessions: Callable[[], async_sessionmaker[AsyncSession]],
        emit: Callable[[Row], Awaitable[None]],
    ) -> None:
        self.settings = settings
        self._sessions = sessions
        self._emit = emit
        self.guard = LegacyGuard(settings.legacy_decrypt_concurrency, settings.legacy_failures_per_minute)
        # Opens a kr1 value as KeyManager.decrypt would, for a migrated row's successor (set by
        # the manager once its opener exists; None: such a value is refused).
        self.open_successor: Callable[[str, str, str, Who], Awaitable[str]] | None = None

    async def decrypt(self, scope: str, ciphertext: str, context: str, who: Who) -> str:
        """The plaintext of the legacy value ``ciphertext`` of ``scope`` at ``context``.

        Raises:
            MalformedCiphertext: not a legacy value either.
            InvalidInput: ``context`` is not valid Unicode.
            LegacyDecryptDisabled: ``KEYROTOR_LEGACY_DECRYPT=off``.
            AccessDenied: the value does not belong where the caller says (audited ``unauthorized``).
            ConfigurationError: no legacy key is configured.
            LegacyDecryptThrottled: the actor failed too often (the window's first refusal is audited).
            DecryptionFailed: wrong key, or tampered.
        """
        try:
            raw = legacy.parse(ciphertext)
        except MalformedCiphertext:
            raise MalformedCiphertext("not a kr1 or legacy ciphertext") from None
        try:
            context.encode()  # the binding's lookup sends it to the database
        except UnicodeEncodeError:
            raise InvalidInput("context must be valid Unicode text (lone surrogates)") from None
        successor = await self._bind(scope, ciphertext, context, who)
        if successor is None:
            return await self._open(raw, who)
        return await self._open_migrated(raw, scope, successor, context, who)

    def close(self) -> None:
        """Stop the guard's threads."""
        self.guard.close()

    async def _bind(self, scope: str, ciphertext: str, context: str, who: Who) -> tuple[str, str] | None:
        """Refuse a legacy value unless ``context`` names its row and that row is ``scope``'s.

        A legacy value carries no scope or context of its own, so without this a grant on any
        scope would read every scope's legacy values (``keyrotor.legacy.scope``).

        Returns None when the row holds this very value, or ``(reason, successor)`` when it holds
        a ``kr1`` value instead (the value may have been migrated since the caller read it).
        """
        if self.settings.legacy_decrypt == "off":
            raise LegacyDecryptDisabled(
                "legacy values are not decrypted (KEYROTOR_LEGACY_DECRYPT=off): run "
                "`keyrotor legacy migrate`, or set KEYROTOR_LEGACY_DECRYPT=on"
            )
        async with db.transaction(self._sessions()) as session:
            reason, successor = await legacy_scope.refusal(session, scope, context, ciphertext)
        if reason is None:
            return None
        if successor is not None and self.open_successor is not None:
            return reason, successor
        await self._refuse(scope, reason, who)

    async def _refuse(self, scope: str, reason: str, who: Who) -> NoReturn:
        """Audit (``unauthorized``) and raise the refusal of a legacy value for ``reason``."""
        message = f"actor {who[0]!r} may not decrypt this legacy value in scope {scope!r}: {reason}"
        error = clean_text(message, MAX_ERROR_CHARS)
        await self._emit(calls.unauthorized(who, scope, error, calls.LEGACY_DECRYPT_METADATA))
        raise AccessDenied(message)

    async def _open_migrated(
        self, raw: bytes, scope: str, found: tuple[str, str], context: str, who: Who
    ) -> str:
        """The presented value's plaintext if its row's ``kr1`` successor opens to the same one.

        The successor first (no scrypt): a caller that may not read the row learns nothing and
        spends no scrypt. A mismatch counts as the actor's failure, as a failed decrypt does.
        """
        reason, successor = found
        assert self.open_successor is not None  # _bind returns a successor only then
        try:
            current: str | None = await self.open_successor(scope, successor, context, who)
        except PermanentError:  # the row's value does not open here: no proof either way
            current = None
        if current is None:
            await self._refuse(scope, reason, who)  # outside the except: no chained error
        plain = await self._open(raw, who)
        if not hmac.compare_digest(plain.encode(), current.encode()):
            self.guard.record_failure(who[0])
            await self._refuse(scope, reason, who)
        return plain

    async def _open(self, raw: bytes, who: Who) -> str:
        key = self.settings.legacy_key
        if not key:
            raise ConfigurationError(
                "a legacy value needs ENCRYPTION_KEY (or KEYROTOR_LEGACY_KEY) to decrypt"
            )
        try:
            return await self.guard.decrypt(who[0], raw, key)
        except LegacyDecryptThrottled as exc:
            if exc.first_in_window:  # one event a window, however many attempts follow
                await self._emit(calls.unauthorized(who, None, str(exc), calls.LEGACY_DECRYPT_METADATA))
            raise
