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

A manager made before ``fork()`` (``gunicorn --preload``, a celery prefork pool) can be used in
the child: its first call there starts a loop thread, connections and a KEK provider of the
child's own. What the child inherited (the parent's loop, pools and sockets) is never used
there, because each of those sockets and the loop's epoll instance are also the parent's: a
message sent or a registration dropped in the child would break the parent's connection. So the
inherited loop is cut off from them (``_disown``) and its objects are kept, not finalized. A
manager given a KEK provider of its caller's raises ``ManagerForked`` in the child instead, since
keyrotor cannot know whether that provider can cross a fork.
"""

from __future__ import annotations

import asyncio
import os
import selectors
import socket
import threading
import weakref
from collections.abc import Coroutine, Mapping, Sequence
from concurrent.futures import Future
from concurrent.futures import TimeoutError as FutureTimeout
from types import TracebackType
from typing import Any, Self, TypeVar

from keyrotor.audit.grants import Grant
from keyrotor.audit.log import current_caller
from keyrotor.errors import CallTimedOut, ConfigurationError, KeyrotorError, ManagerForked
from keyrotor.kek.base import KekProvider
from keyrotor.keys import KeyManager as AsyncKeyManager
from keyrotor.settings import Settings

T = TypeVar("T")

_FORKED_WITH_KEK = (
    "this keyrotor.sync.KeyManager was given a KEK provider and made before a fork(); that "
    "provider may hold the parent's connections, so the manager cannot follow the fork: make it "
    "in the child (gunicorn's post_fork, celery's worker_process_init)"
)
# The managers of this process, for the fork handler below.
_LIVE: weakref.WeakSet[KeyManager] = weakref.WeakSet()
# What forked children inherited of their parent's managers: held for the child's whole life so
# that no finalizer of it runs there (see the module docstring).
_INHERITED: list[tuple[asyncio.AbstractEventLoop, threading.Thread, AsyncKeyManager | None]] = []


class KeyManager:
    """Blocking facade over :class:`keyrotor.keys.KeyManager`; opened by the constructor.

    Args:
        settings: configuration (``Settings.from_env()`` or built in code).
        kek: a KEK provider (default: the one ``settings`` names, opened by the manager; in a
            forked child it opens one of its own).
        timeout_s: the longest a call takes (None: as long as it takes); past it the call is
            cancelled and raises ``CallTimedOut`` (a ``TransientError`` and a ``TimeoutError``).

    Raises:
        CallTimedOut: from any call, past ``timeout_s``.
        ManagerForked: from any call in a forked child, when ``kek`` was given.
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
        self._kek, self._environ = kek, environ
        self._closed = self._forked = False
        self._lock = threading.Lock()
        self._start()
        _LIVE.add(self)

    def _start(self) -> None:
        """A loop thread and an open manager, for the process that calls this."""
        self._pid = os.getpid()
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, name="keyrotor-sync", daemon=True)
        self._thread.start()
        try:
            self._km = self._wait(self._make(self.settings, self._kek, self._environ))
            self._wait(self._km.open())
        except BaseException:
            self._stop_loop()
            raise

    @classmethod
    def from_env(
        cls,
        environ: Mapping[str, str] | None = None,
        *,
        kek: KekProvider | None = None,
        timeout_s: float | None = 60.0,
        **overrides: Any,
    ) -> KeyManager:
        """A manager configured from environment variables (default ``os.environ``).

        ``kek`` and ``timeout_s`` are the constructor's; ``overrides`` are settings fields.
        """
        return cls(Settings.from_env(environ, **overrides), kek=kek, timeout_s=timeout_s, environ=environ)

    @staticmethod
    async def _make(
        settings: Settings, kek: KekProvider | None, environ: Mapping[str, str] | None
    ) -> AsyncKeyManager:
        # Built on the loop's thread: its locks and tasks belong to that loop.
        return AsyncKeyManager(settings, kek=kek, environ=environ)

    def _manager(self) -> AsyncKeyManager:
        """The async manager to call in this process: in a forked child, one of the child's own
        (asked for before the call's coroutine is made, which binds the manager it comes from)."""
        if self._pid != os.getpid():
            self._follow_fork()
        self._check_open()
        if threading.current_thread() is self._thread:
            raise ConfigurationError("keyrotor.sync.KeyManager cannot be called from its own loop")
        return self._km

    def _check_open(self) -> None:
        if self._closed:
            if self._forked:
                raise ManagerForked(_FORKED_WITH_KEK)
            raise ConfigurationError("this keyrotor.sync.KeyManager is closed")

    def _call(self, coro: Coroutine[Any, Any, T]) -> T:
        try:
            self._check_open()  # again: another thread may have closed it since _manager()
        except BaseException:
            coro.close()
            raise
        return self._wait(coro)

    def _wait(self, coro: Coroutine[Any, Any, T]) -> T:
        future: Future[T] = asyncio.run_coroutine_threadsafe(coro, self._loop)
        try:
            return future.result(self.timeout_s)
        except FutureTimeout:
            future.cancel()  # as below
            raise CallTimedOut(f"the call took longer than {self.timeout_s} s and was cancelled") from None
        except BaseException:
            # The caller stops waiting (KeyboardInterrupt, say): the call is cancelled too, so it
            # does not go on to write after the caller was told it failed (a call already
            # committing may still land, as with any call whose answer is lost).
            future.cancel()
            raise

    def _follow_fork(self) -> None:
        """In a forked child: leave the parent's loop and manager untouched and start our own."""
        with self._lock:
            if self._pid == os.getpid():
                return  # another thread of the child got here first
            self._leave_inherited()
            if self._closed:
                return
            if self._kek is not None:
                self._closed = self._forked = True
                raise ManagerForked(_FORKED_WITH_KEK)
            try:
                self._start()
            except BaseException:
                self._pid = -1  # the next call tries again
                raise

    def _leave_inherited(self) -> None:
        _disown(self._loop)
        # Kept, not dropped: nothing of the parent's is finalized while the child lives.
        _INHERITED.append((self._loop, self._thread, getattr(self, "_km", None)))
        self._pid = os.getpid()

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
        return self._call(self._manager().encrypt(scope, plaintext, context=context, **who))

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
        return self._call(self._manager().decrypt(scope, ciphertext, context=context, **who))

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
        return self._call(self._manager().decrypt_many(scope, items, **who))

    def put_secret(self, scope: str, name: str, value: str, *, actor: str | None = None) -> None:
        """See :meth:`keyrotor.keys.KeyManager.put_secret`."""
        self._call(self._manager().put_secret(scope, name, value, **self._who(actor, None, None)))

    def put_secrets(self, scope: str, items: Sequence[tuple[str, str]], *, actor: str | None = None) -> int:
        """See :meth:`keyrotor.keys.KeyManager.put_secrets`."""
        return self._call(self._manager().put_secrets(scope, items, **self._who(actor, None, None)))

    def get_secret(self, scope: str, name: str, *, actor: str | None = None) -> str:
        """See :meth:`keyrotor.keys.KeyManager.get_secret`."""
        return self._call(self._manager().get_secret(scope, name, **self._who(actor, None, None)))

    def grant(
        self, actor: str, scope: str, *, encrypt: bool = False, decrypt: bool = False, by: str | None = None
    ) -> Grant:
        """See :meth:`keyrotor.keys.KeyManager.grant`."""
        return self._call(self._manager().grant(actor, scope, encrypt=encrypt, decrypt=decrypt, by=by))

    def revoke(
        self, actor: str, scope: str, *, encrypt: bool = False, decrypt: bool = False, by: str | None = None
    ) -> Grant | None:
        """See :meth:`keyrotor.keys.KeyManager.revoke`."""
        return self._call(self._manager().revoke(actor, scope, encrypt=encrypt, decrypt=decrypt, by=by))

    def flush_audit(self) -> None:
        """Write the audit events still queued (``KEYROTOR_AUDIT=async``)."""
        self._call(self._manager().flush_audit())

    def invalidate(self, scope: str | None = None) -> None:
        """Forget cached DEKs (all, or one scope's)."""
        self._call(_run_sync(self._manager().invalidate, scope))

    # --- lifecycle -------------------------------------------------------------------------

    def close(self) -> None:
        """Close the manager (flushing its audit events) and stop its thread. Idempotent.

        In a forked child that never called it, it closes nothing: what the child inherited
        is the parent's to close.
        """
        if self._pid != os.getpid():
            with self._lock:
                if self._pid != os.getpid():
                    self._leave_inherited()
                    self._closed = True
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


def _disown(loop: asyncio.AbstractEventLoop) -> None:
    """Cut a loop inherited across fork() off from the parent's file descriptors.

    The loop is not running in the child (its thread did not survive the fork), but its
    selector is the parent's epoll instance and its sockets are the parent's connections: a
    transport finalized in the child would unregister the parent's socket from that instance,
    and an SSL one could send its close_notify down the parent's connection. The loop gets an
    empty selector of its own, and each socket gives up its descriptor (``detach``) before the
    child's copy is closed, so that no later ``close`` can hit a descriptor number reused since.
    Closing the child's copy of a descriptor never affects the parent's.
    """
    selector = getattr(loop, "_selector", None)
    if not isinstance(selector, selectors.BaseSelector):
        return  # closed already, or not a selector loop: nothing of the parent's to cut off
    setattr(loop, "_selector", selectors.SelectSelector())  # noqa: B010 (a private attribute)
    transports = getattr(loop, "_transports", {})
    socks = [getattr(t, "_sock", None) for t in list(transports.values())]
    socks += [getattr(loop, "_ssock", None), getattr(loop, "_csock", None)]
    for sock in socks:
        if isinstance(sock, socket.socket) and sock.fileno() >= 0:
            os.close(sock.detach())
    selector.close()


def _after_fork_in_child() -> None:
    # A lock a thread of the parent held at the fork stays held in the child for ever.
    for km in list(_LIVE):
        km._lock = threading.Lock()


os.register_at_fork(after_in_child=_after_fork_in_child)
