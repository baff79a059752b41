"""The enqueue client: ask for rotations, follow them.

::

    async with KeyrotorClient(Settings.from_env()) as client:
        handle = await client.rotate("anthropic")
        run = await handle.result()          # waits until the run completes; raises if it failed

Each request opens (or joins) a run row in Postgres first -- so many clients asking at once get
the same run -- then enqueues the job that drives it under a deterministic id (a duplicate
enqueue is a no-op). The handle carries the run id and the arq :class:`~arq.jobs.Job`.

``request_id`` names the caller (its own correlation id): it is recorded on the run
(``detail.request_ids``, beside the ids of whoever joined it), and the run's job log events and
audit events carry it. It is never part of a job id.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Callable
from dataclasses import dataclass
from types import TracebackType
from typing import Any, Self

from arq.connections import ArqRedis
from arq.jobs import Job, SerializationError
from redis.exceptions import RedisError
from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession, async_sessionmaker

from keyrotor import runs
from keyrotor.errors import ConfigurationError, KeyrotorError, QueueUnavailable
from keyrotor.notify import KeyChange, Notifier
from keyrotor.queue.enqueue import connect_queue, enqueue_driver
from keyrotor.rotation import dek as rotation
from keyrotor.rotation import destruction, retire
from keyrotor.rotation import kek as kek_rotation
from keyrotor.runs import RunFailed, RunInfo
from keyrotor.settings import Settings
from keyrotor.store import db
from keyrotor.store import retire as store_retire

# The first re-read of a run being waited for; the interval doubles from there (RunHandle.wait).
_FIRST_POLL_S = 0.02


@dataclass
class RunHandle:
    """A requested run: its id, and the arq job driving it."""

    client: KeyrotorClient
    run_id: int
    job: Job
    created: bool

    async def status(self) -> RunInfo:
        """The run as it stands now."""
        return await self.client.status(self.run_id)

    async def wait(
        self,
        timeout_s: float | None = None,
        *,
        poll_s: float = 0.25,
        on_progress: Callable[[RunInfo], None] | None = None,
    ) -> RunInfo:
        """Wait until the run is completed or failed, and return it.

        The run is read again as soon as a key change is announced (``KEYROTOR_NOTIFY_CHANNEL``:
        a completed rotation announces ``rotated``), and otherwise after 20 ms, then at twice
        the interval each time up to ``poll_s``. So a completion is seen within milliseconds,
        and a failure (which announces nothing), or a completion whose announcement was lost,
        within ``poll_s``; a long run costs one status query every ``poll_s``.

        ``timeout_s`` bounds the whole wait, the reads of Postgres and Redis included: a store
        that stops answering ends it ``poll_s`` after the deadline at the latest.

        Raises:
            TimeoutError: still open after ``timeout_s`` seconds (or not known to have ended).
            KeyrotorError: the driving job failed before it could record anything on the run
                (e.g. ``KekMismatch``: the worker's KEK cannot unwrap the DEKs).
        """
        if timeout_s is None:
            return await self._wait(None, None, poll_s, on_progress)
        bound = asyncio.timeout(timeout_s + poll_s)
        try:
            async with bound:
                return await self._wait(time.monotonic() + timeout_s, timeout_s, poll_s, on_progress)
        except TimeoutError:
            if not bound.expired():
                raise
            raise TimeoutError(
                f"run {self.run_id} is not known to have ended after {timeout_s}s "
                "(Postgres or Redis did not answer in time)"
            ) from None

    async def _wait(
        self,
        deadline: float | None,
        timeout_s: float | None,
        poll_s: float,
        on_progress: Callable[[RunInfo], None] | None,
    ) -> RunInfo:
        delay_s = min(poll_s, _FIRST_POLL_S)
        # Subscribed before the first read, so an announcement after it cannot be missed.
        async with _Announcements(self.client.redis, self.client.settings.notify_channel) as heard:
            while True:
                run = await self.status()
                if on_progress is not None:
                    on_progress(run)
                if run.terminal:
                    return run
                await self._raise_if_job_failed()
                if deadline is not None and time.monotonic() > deadline:
                    raise TimeoutError(f"run {self.run_id} is still {run.state} after {timeout_s}s")
                await heard.next(delay_s)
                delay_s = min(poll_s, delay_s * 2)

    async def result(self, timeout_s: float | None = None) -> RunInfo:
        """Wait for the run and return it if it completed.

        Raises:
            RunFailed: it failed; the message is the run's error (naming the row, the version).
        """
        run = await self.wait(timeout_s)
        if run.state != "completed":
            raise RunFailed(f"run {run.id} {run.state}: {run.error or 'no reason recorded'}")
        return run

    async def _raise_if_job_failed(self) -> None:
        try:
            info = await self.job.result_info()
        except SerializationError:
            return  # a result this version cannot load: keep following the run itself
        except (RedisError, OSError) as exc:
            raise QueueUnavailable(f"cannot read the job from Redis: {type(exc).__name__}") from exc
        if info is None or info.success:
            return
        run = await self.status()
        if run.terminal:
            return
        if isinstance(info.result, KeyrotorError):
            raise info.result
        raise RunFailed(f"run {self.run_id}: its job {self.job.job_id} failed: {info.result!r}")


class _Announcements:
    """Key-change announcements heard while a run is waited for: a reason to read it again early.

    Any message on the channel wakes the waiter (they are a few per rotation); the waiter then
    reads the run itself, so a message is only ever a hint. Without Redis pub/sub (an outage, a
    subscription refused) it falls back to sleeping: waiting must not fail for want of a hint.
    """

    def __init__(self, redis: ArqRedis, channel: str) -> None:
        self._redis = redis
        self._channel = channel
        self._pubsub: Any = None

    async def __aenter__(self) -> Self:
        self._pubsub = self._redis.pubsub(ignore_subscribe_messages=True)
        try:
            await self._pubsub.subscribe(self._channel)
        except (RedisError, OSError):
            await self._close()  # the whole wait polls
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self._close()

    async def _close(self) -> None:
        pubsub, self._pubsub = self._pubsub, None
        if pubsub is not None:
            with contextlib.suppress(Exception):
                await pubsub.aclose()

    async def next(self, timeout_s: float) -> None:
        """Return at the next announcement, or after ``timeout_s`` seconds."""
        deadline = time.monotonic() + timeout_s
        while self._pubsub is not None:
            left = deadline - time.monotonic()
            if left <= 0:
                return
            try:
                message = await self._pubsub.get_message(timeout=left)
            except (RedisError, OSError):
                await self._close()  # the rest of the wait polls
                break
            if message is not None and message.get("type") == "message":
                return
        await asyncio.sleep(max(0.0, deadline - time.monotonic()))


def _check(request_id: str | None) -> None:
    # Before any connection is used: a bad id writes nothing and costs no round trip.
    if request_id is not None:
        runs.check_request_id(request_id)


class KeyrotorClient:
    """Enqueues rotations and reads their state.

    Args:
        settings: ``DATABASE_URL``, ``REDIS_URL``, ``KEYROTOR_QUEUE_NAME``.
        redis: an arq pool to use (not closed by the client); default: one for ``REDIS_URL``.
        engine: a database engine to use (not closed by the client).
    """

    def __init__(
        self, settings: Settings, *, redis: ArqRedis | None = None, engine: AsyncEngine | None = None
    ):
        self.settings = settings
        self._redis = redis
        self._owns_redis = redis is None
        self._engine = engine
        self._owns_engine = engine is None
        self._sessions: async_sessionmaker[AsyncSession] | None = None

    @classmethod
    def from_env(cls) -> KeyrotorClient:
        """A client configured from the environment."""
        return cls(Settings.from_env())

    async def open(self) -> None:
        """Connect to Redis and build the engine."""
        if self._redis is None:
            self._redis = await connect_queue(self.settings)
        if self._engine is None:
            self._engine = db.create_engine(self.settings.database_url, pool_size=2)
        self._sessions = db.sessionmaker(self._engine)

    async def close(self) -> None:
        """Release what the client opened."""
        if self._owns_redis and self._redis is not None:
            await self._redis.aclose(close_connection_pool=True)
            self._redis = None
        if self._owns_engine and self._engine is not None:
            await self._engine.dispose()
            self._engine = None

    async def __aenter__(self) -> Self:
        await self.open()
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.close()

    @property
    def redis(self) -> ArqRedis:
        if self._redis is None:
            raise ConfigurationError("KeyrotorClient is not open: use `async with KeyrotorClient(...)`")
        return self._redis

    @property
    def sessions(self) -> async_sessionmaker[AsyncSession]:
        if self._sessions is None:
            raise ConfigurationError("KeyrotorClient is not open: use `async with KeyrotorClient(...)`")
        return self._sessions

    async def _handle(self, run: RunInfo, created: bool) -> RunHandle:
        job = await enqueue_driver(self.redis, self.settings, run)
        return RunHandle(self, run.id, job, created)

    async def rotate(self, scope: str, *, trigger: str = "api", request_id: str | None = None) -> RunHandle:
        """Rotate ``scope``'s DEK (or join its open rotation).

        Args:
            scope: the scope.
            trigger: who asked, recorded on a new run.
            request_id: the caller's correlation id (1-128 of ``A-Za-z0-9._:/@-``), recorded on
                the run and carried by its jobs' log events and audit events.

        Raises:
            InvalidRequestId: ``request_id`` is not valid (nothing is written).
            ScopeNotFound: no such scope.
            QueueUnavailable, StoreUnavailable: an outage.
        """
        _check(request_id)
        async with db.transaction(self.sessions) as session:
            run, created = await rotation.request_rotation(
                session, scope, trigger=trigger, request_id=request_id
            )
        return await self._handle(run, created)

    async def rotate_kek(self, *, trigger: str = "api", request_id: str | None = None) -> RunHandle:
        """Rewrap every DEK under the current (or a newly rotated) KEK version.

        Raises:
            InvalidRequestId: ``request_id`` is not valid (nothing is written).
        """
        _check(request_id)
        async with db.transaction(self.sessions) as session:
            run, created = await kek_rotation.request_kek_rotation(
                session, trigger=trigger, request_id=request_id
            )
        return await self._handle(run, created)

    async def retire(
        self,
        scope: str,
        version: int,
        *,
        force_now: bool = False,
        trigger: str = "api",
        request_id: str | None = None,
    ) -> RunHandle:
        """Retire DEK ``version`` of ``scope`` once nothing needs it: decrypt-only, its wrapped
        key erased after ``KEYROTOR_DESTROY_AFTER_DAYS`` unless used meanwhile.

        Raises:
            InvalidRequestId: ``request_id`` is not valid (nothing is written).
            GraceNotOver: its grace period is not over (``force_now`` skips the wait).
            NotRetirable: it is the active (or a pending) version.
            LocationNotCovered: values of it went to a location the census cannot count (the
                run is opened and marked failed with the same message, and the refusal audited;
                a retirement of the version already open is left to its job, whose proof fails
                it the same way).
        """
        _check(request_id)
        run = await retire.request_retirement(
            self.sessions, scope, version, force_now=force_now, trigger=trigger, request_id=request_id
        )
        return await self._handle(run, True)

    async def restore(self, scope: str, version: int, *, actor: str | None = None) -> destruction.Restored:
        """Bring retired DEK ``version`` of ``scope`` back to grace (``config_change`` by
        ``actor``, default ``KEYROTOR_DEFAULT_ACTOR``), and announce it.

        Raises:
            NotRestorable: the version is not retired (destroyed, active, pending, grace).
            ScopeNotFound, KeyVersionUnknown: no such scope or version.
        """
        async with db.transaction(self.sessions) as session:
            restored = await destruction.restore_dek(
                session, scope, version, actor=actor or self.settings.default_actor
            )
        await Notifier(self.redis, self.settings.notify_channel).publish(
            KeyChange("restored", scope, version)
        )
        return restored

    async def destroy_after(self, scope: str, version: int) -> str | None:
        """When retired DEK ``version`` of ``scope`` may be erased (ISO 8601), or None if it is
        not retired or its destruction was cancelled."""
        async with db.transaction(self.sessions) as session:
            value = await store_retire.destroy_after(session, scope, version)
        return value.isoformat() if value is not None else None

    async def status(self, run_id: int) -> RunInfo:
        """One run.

        Raises:
            RunNotFound: no such run.
        """
        async with db.transaction(self.sessions) as session:
            return await runs.require_run(session, run_id)

    async def runs(
        self, *, limit: int = 20, scope: str | None = None, request_id: str | None = None
    ) -> list[RunInfo]:
        """The most recent runs first; with ``request_id``, the runs asked for under that id
        (as creator or joiner): how an application finds its run by its own correlation id.

        Raises:
            InvalidRequestId: ``request_id`` is not a valid request id.
        """
        async with db.transaction(self.sessions) as session:
            return await runs.list_runs(session, limit=limit, scope=scope, request_id=request_id)
