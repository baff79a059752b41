"""Key-change announcements over Redis pub/sub, and the listener that keeps caches honest.

Rotation announces each change of a scope's keys on one channel (``KEYROTOR_NOTIFY_CHANNEL``):

``pending``   a new DEK is stored; it decrypts everywhere and encrypts nowhere yet.
``active``    the new DEK encrypts from now on (the old one is in grace).
``rotated``   the rotation is complete (rows re-encrypted).
``retired``  a DEK version was retired: it decrypts (each use audited), never encrypts.
``restored`` a retired DEK version went back to grace.
``destroyed`` a DEK version was destroyed: nothing may use it any more.
``rewrapped`` DEKs were rewrapped under a new KEK version (their bytes did not change).

Every :class:`keyrotor.KeyManager` runs a :class:`KeyChangeListener` (unless
``KEYROTOR_LISTEN_KEY_CHANGES=false``) that drops the cached DEKs and active version of the
scope named, so a process starts encrypting with the new DEK at once instead of after its
active-version TTL, and forgets a destroyed DEK. Pub/sub is fire-and-forget: a process that
was disconnected when a message went out drops all its caches when it reconnects, and the
TTLs bound what it can miss. Correctness never depends on a message arriving: every process
loads an unknown DEK version from the database on first sight.

Messages carry a scope name, an event and a version: never key material.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import random
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Literal

from keyrotor.errors import QueueUnavailable

if TYPE_CHECKING:
    import redis.asyncio as aioredis

# redis-py is imported where it is first used, not here: importing keyrotor (every application
# and CLI call) should not pay for it.

Event = Literal["pending", "active", "rotated", "retired", "restored", "destroyed", "rewrapped", "resync"]
EVENTS: tuple[str, ...] = Event.__args__  # type: ignore[attr-defined]

log = logging.getLogger("keyrotor.notify")


@dataclass(frozen=True, slots=True)
class KeyChange:
    """One announcement. ``scope`` None means every scope (``resync`` after a reconnect)."""

    event: Event
    scope: str | None = None
    version: int | None = None

    def encode(self) -> str:
        return json.dumps({"event": self.event, "scope": self.scope, "version": self.version})

    @classmethod
    def decode(cls, data: bytes | str) -> KeyChange | None:
        """Parse a message; None for anything that is not one of ours."""
        try:
            doc = json.loads(data)
        except (ValueError, TypeError):
            return None
        if not isinstance(doc, dict) or doc.get("event") not in EVENTS:
            return None
        scope, version = doc.get("scope"), doc.get("version")
        if scope is not None and not isinstance(scope, str):
            return None
        if version is not None and not isinstance(version, int):
            return None
        return cls(doc["event"], scope, version)


class Notifier:
    """Publishes :class:`KeyChange` messages.

    Args:
        redis: a redis-py asyncio client (the worker passes arq's pool).
        channel: the pub/sub channel.
    """

    def __init__(self, redis: aioredis.Redis, channel: str) -> None:
        self._redis = redis
        self.channel = channel

    async def publish(self, change: KeyChange) -> int:
        """Announce a change. Returns how many subscribers received it.

        Raises:
            QueueUnavailable: Redis cannot be reached (transient).
        """
        from redis.exceptions import RedisError  # imported on first use: see the note above Event

        try:
            return int(await self._redis.publish(self.channel, change.encode()))
        except (RedisError, OSError) as exc:
            raise QueueUnavailable(f"cannot announce key change on Redis: {type(exc).__name__}") from exc


OnChange = Callable[[KeyChange], Awaitable[None] | None]


class KeyChangeListener:
    """Subscribes to the channel in a background task and calls ``on_change`` for each message.

    It reconnects with jittered backoff after any Redis error and, on every (re)subscription,
    calls ``on_change(KeyChange("resync"))`` because messages sent meanwhile are lost. A
    connection that goes silent (a Redis failover, a network path gone without a reset) raises
    no error: after :attr:`IDLE_PING_S` without a message the listener pings, and a ping left
    unanswered for :attr:`PONG_WAIT_S` counts as a lost connection.

    Args:
        redis_url: where Redis is.
        channel: the pub/sub channel.
        on_change: called for each change (sync or async); its exceptions are logged.
    """

    IDLE_PING_S = 30.0
    PONG_WAIT_S = 10.0

    def __init__(self, redis_url: str, channel: str, on_change: OnChange) -> None:
        self._url = redis_url
        self.channel = channel
        self._on_change = on_change
        self._task: asyncio.Task[None] | None = None
        self.subscribed = asyncio.Event()
        self.received = 0

    def start(self) -> None:
        """Start listening (returns at once; never waits for Redis)."""
        if self._task is None:
            self._task = asyncio.get_running_loop().create_task(self._run(), name="keyrotor-key-listener")

    async def stop(self) -> None:
        """Stop listening and close the connection."""
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        self.subscribed.clear()

    async def _run(self) -> None:
        # Imported on first use: see the note above Event.
        import redis.asyncio as aioredis
        from redis.exceptions import ConnectionError as RedisConnectionError
        from redis.exceptions import RedisError

        delay = 0.5
        failures = 0
        while True:
            client: Any = aioredis.from_url(self._url)  # type: ignore[no-untyped-call]
            pubsub = client.pubsub(ignore_subscribe_messages=True)
            try:
                await pubsub.subscribe(self.channel)
                self.subscribed.set()
                delay, failures = 0.5, 0
                await self._deliver(KeyChange("resync"))
                heard, pinged = time.monotonic(), None
                while True:
                    message = await pubsub.get_message(timeout=min(5.0, self.IDLE_PING_S))
                    now = time.monotonic()
                    if message is not None:
                        heard, pinged = now, None
                        if message.get("type") == "message":
                            change = KeyChange.decode(message["data"])
                            if change is not None:
                                await self._deliver(change)
                                self.received += 1
                    elif pinged is not None and now - pinged >= self.PONG_WAIT_S:
                        raise RedisConnectionError("no answer to a ping on the key-change subscription")
                    elif pinged is None and now - heard >= self.IDLE_PING_S:
                        await pubsub.ping()
                        pinged = now
            except (RedisError, OSError) as exc:
                self.subscribed.clear()
                failures += 1
                # Quiet at first: a short-lived process (a CLI command) need not hear about it.
                log.log(
                    logging.WARNING if failures >= 3 else logging.INFO,
                    "key-change listener cannot reach Redis (%s); retrying in %.1fs",
                    type(exc).__name__,
                    delay,
                )
            finally:
                with contextlib.suppress(Exception):
                    await pubsub.aclose()
                with contextlib.suppress(Exception):
                    await client.aclose()
            await asyncio.sleep(delay * random.uniform(0.5, 1.0))
            delay = min(delay * 2, 30.0)

    async def _deliver(self, change: KeyChange) -> None:
        try:
            result = self._on_change(change)
            if result is not None:
                await result
        except Exception:  # a faulty callback must not kill the listener
            log.exception("key-change callback failed for event %s", change.event)
