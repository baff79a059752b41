"""A blocking :class:`KeyManager` for Flask, Django and other threaded applications.

::

    from keyrotor.sync import KeyManager

    km = KeyManager.from_env()          # opened at once; close() at shutdown (or use `with`)
    token = km.encrypt("openai", "sk-...", context="settings.api_key:42")
    value = km.decrypt("openai", token, context="settings.api_key:42")

The same methods as :class:`keyrotor.keys.KeyManager`, blocking. One event loop runs in a thread
of its own and holds the async manager (its pools, caches and audit writer); every call from any
thread is handed to that loop and waited for, so the manager is safe to share between threads and
concurrent calls share its DEK cache and audit group commits. The caller of
``keyrotor.audit.log.actor_context`` in the calling thread is carried over to the call.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Coroutine, Mapping, Sequence
from concurrent.futures import Future
from types import TracebackType
from typing import Any, Self, TypeVar

from keyrotor.audit.grants import Grant
from keyrotor.audit.log import current_caller
from keyrotor.errors import ConfigurationError, KeyrotorError
from keyrotor.kek.base import KekProvider
from keyrotor.keys import KeyManager as AsyncKeyManager
from keyrotor.settings import Settings

T = TypeVar("T")


class KeyManager:
    """Blocking facade over :class:`keyrotor.keys.KeyManager`; opened by the constructor.

    Args:
        settings: configuration (``Settings.from_env()`` or built in code).
        kek: a KEK provider (default: the one ``settings`` names).
        timeout_s: the longest a call takes (None: as long as it takes); past it the call is
            cancelled and raises ``TimeoutError``.
    """

    def __init__(
        self,
        settings: Settings,
        *,
        kek: KekProvider | None = None,
        timeout_s: float | None = 60.0,
        environ: Mapping[str, str] | None = None,
    ) -> None:
        self.settings = settings
        self.timeout_s = timeout_s
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="keyrotor-sync", daemon=True)
        self._thread.start()
        self._closed = False
        self._lock = threading.Lock()
        try:
            self._km = self._call(self._make(settings, kek, environ))
            self._call(self._km.open())
        except BaseException:
            self._stop_loop()
            raise

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None, **overrides: Any) -> KeyManager:
        """A manager configured from environment variables (default ``os.environ``)."""
        return cls(Settings.from_env(environ, **overrides), environ=environ)

    @staticmethod
    async def _make(
        settings: Settings, kek: KekProvider | None, environ: Mapping[str, str] | None
    ) -> AsyncKeyManager:
        # Built on the loop's thread: its locks and tasks belong to that loop.
        return AsyncKeyManager(settings, kek=kek, environ=environ)

    def _call(self, coro: Coroutine[Any, Any, T]) -> T:
        if self._closed:
            coro.close()
            raise ConfigurationError("this keyrotor.sync.KeyManager is closed")
        if threading.current_thread() is self._thread:
            coro.close()
            raise ConfigurationError("keyrotor.sync.KeyManager cannot be called from its own loop")
        future: Future[T] = asyncio.run_coroutine_threadsafe(coro, self._loop)
        try:
            return future.result(self.timeout_s)
        except BaseException:
            # The caller stops waiting (TimeoutError, KeyboardInterrupt): the call is cancelled
            # too, so it does not go on to write after the caller was told it failed (a call
            # already committing may still land, as with any call whose answer is lost).
            future.cancel()
            raise

    def _who(self, actor: str | None, ip: str | None, user_agent: str | None) -> dict[str, str | None]:
        caller = current_caller()
        if actor is None and caller is not None:
            return {
                "actor": caller.actor,
                "ip": ip or caller.ip,
                "user_agent": user_agent or caller.user_agent,
            }
        return {"actor": actor, "ip": ip, "user_agent": user_agent}

    # --- the KeyManager methods, blocking --------------------------------------------------

    def encrypt(
        self,
        scope: str,
        plaintext: str,
        *,
        context: str = "",
        actor: str | None = None,
        ip: str | None = None,
        user_agent: str | None = None,
    ) -> str:
        """See :meth:`keyrotor.keys.KeyManager.encrypt`."""
        who = self._who(actor, ip, user_agent)
        return self._call(self._km.encrypt(scope, plaintext, context=context, **who))

    def decrypt(
        self,
        scope: str,
        ciphertext: str,
        *,
        context: str = "",
        actor: str | None = None,
        ip: str | None = None,
        user_agent: str | None = None,
    ) -> str:
        """See :meth:`keyrotor.keys.KeyManager.decrypt`."""
        who = self._who(actor, ip, user_agent)
        return self._call(self._km.decrypt(scope, ciphertext, context=context, **who))

    def decrypt_many(
        self,
        scope: str,
        items: Sequence[tuple[str, str]],
        *,
        actor: str | None = None,
        ip: str | None = None,
        user_agent: str | None = None,
    ) -> list[str | KeyrotorError]:
        """See :meth:`keyrotor.keys.KeyManager.decrypt_many`."""
        who = self._who(actor, ip, user_agent)
        return self._call(self._km.decrypt_many(scope, items, **who))

    def put_secret(self, scope: str, name: str, value: str, *, actor: str | None = None) -> None:
        """See :meth:`keyrotor.keys.KeyManager.put_secret`."""
        self._call(self._km.put_secret(scope, name, value, **self._who(actor, None, None)))

    def put_secrets(self, scope: str, items: Sequence[tuple[str, str]], *, actor: str | None = None) -> int:
        """See :meth:`keyrotor.keys.KeyManager.put_secrets`."""
        return self._call(self._km.put_secrets(scope, items, **self._who(actor, None, None)))

    def get_secret(self, scope: str, name: str, *, actor: str | None = None) -> str:
        """See :meth:`keyrotor.keys.KeyManager.get_secret`."""
        return self._call(self._km.get_secret(scope, name, **self._who(actor, None, None)))

    def grant(
        self, actor: str, scope: str, *, encrypt: bool = False, decrypt: bool = False, by: str | None = None
    ) -> Grant:
        """See :meth:`keyrotor.keys.KeyManager.grant`."""
        return self._call(self._km.grant(actor, scope, encrypt=encrypt, decrypt=decrypt, by=by))

    def revoke(
        self, actor: str, scope: str, *, encrypt: bool = False, decrypt: bool = False, by: str | None = None
    ) -> Grant | None:
        """See :meth:`keyrotor.keys.KeyManager.revoke`."""
        return self._call(self._km.revoke(actor, scope, encrypt=encrypt, decrypt=decrypt, by=by))

    def flush_audit(self) -> None:
        """Write the audit events still queued (``KEYROTOR_AUDIT=async``)."""
        self._call(self._km.flush_audit())

    def invalidate(self, scope: str | None = None) -> None:
        """Forget cached DEKs (all, or one scope's)."""
        self._call(_run_sync(self._km.invalidate, scope))

    # --- lifecycle -------------------------------------------------------------------------

    def close(self) -> None:
        """Close the manager (flushing its audit events) and stop its thread. Idempotent."""
        with self._lock:
            if self._closed:
                return
            try:
                self._call(self._km.close())
            finally:
                self._closed = True
                self._stop_loop()

    def _stop_loop(self) -> None:
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(30)
        if not self._thread.is_alive():
            self._loop.close()

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.close()


async def _run_sync(fn: Any, *args: Any) -> None:
    fn(*args)
