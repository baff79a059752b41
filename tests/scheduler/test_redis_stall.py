"""A Redis that stops answering on the connections a process holds: the scheduler and the enqueue
client carry on (a command fails after its timeout), and a worker exits for its supervisor (as
it does when Redis is lost), instead of waiting for ever.

What the tests reproduce is a Redis failover or a network path that dies without a FIN or an RST
(a moved address, a dropped NAT entry): the process's open connections to Redis go silent for
good, while new connections reach the Redis that is back. Without a read timeout, a command
sent on such a connection waits for ever: the leading scheduler's scan then never ends (and
APScheduler skips every later one, ``max_instances=1``), while it keeps the leader lock, so the
standby never takes over; a ``rotate --wait --timeout`` never returns; a worker stops taking
jobs while its ``/healthz`` stays green, so nothing restarts it.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import AsyncIterator
from datetime import timedelta
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import pytest

from keyrotor import KeyManager, KeyrotorClient, Settings
from keyrotor.worker.scheduler import Scheduler
from tests.rotation_helpers import WORKER_REDIS_URL, WorkerProcess
from tests.scheduler.conftest import queued_jobs, seed_scopes

DEADLINE_S = 40.0  # every wait of these tests; a stalled command gives up well before


class StallingProxy:
    """A TCP proxy to the test Redis. ``stall()`` makes every connection open at that moment go
    silent for good (bytes are swallowed both ways, the sockets stay open); connections made
    afterwards are forwarded as before."""

    def __init__(self, target: tuple[str, int]) -> None:
        self.target = target
        self.port = 0
        self._server: asyncio.Server | None = None
        self._live: set[asyncio.Event] = set()
        self._tasks: set[asyncio.Task[None]] = set()
        self._writers: set[asyncio.StreamWriter] = set()

    async def start(self) -> None:
        self._server = await asyncio.start_server(self._handle, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]

    def stall(self) -> None:
        for stalled in self._live:
            stalled.set()
        self._live.clear()

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        up_reader, up_writer = await asyncio.open_connection(*self.target)
        stalled = asyncio.Event()
        self._live.add(stalled)
        self._writers.update((writer, up_writer))

        async def pipe(src: asyncio.StreamReader, dst: asyncio.StreamWriter) -> None:
            with contextlib.suppress(OSError, ConnectionError):
                while data := await src.read(65536):
                    if not stalled.is_set():
                        dst.write(data)
                        await dst.drain()

        for coro in (pipe(reader, up_writer), pipe(up_reader, writer)):
            task = asyncio.get_running_loop().create_task(coro)
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    async def close(self) -> None:
        if self._server is not None:
            self._server.close()
        for w in list(self._writers):
            with contextlib.suppress(Exception):
                w.transport.abort()
        for t in list(self._tasks):
            t.cancel()
        await asyncio.gather(*self._tasks, return_exceptions=True)


@pytest.fixture
async def proxy() -> AsyncIterator[StallingProxy]:
    parts = urlsplit(WORKER_REDIS_URL)
    p = StallingProxy((parts.hostname or "127.0.0.1", parts.port or 6379))
    await p.start()
    yield p
    await p.close()


def through(proxy: StallingProxy) -> str:
    """The tests' queue Redis URL, through the proxy."""
    return f"redis://127.0.0.1:{proxy.port}{urlsplit(WORKER_REDIS_URL).path}"


async def test_a_leader_whose_redis_connection_goes_silent_still_scans_and_enqueues(
    senv: dict[str, str], proxy: StallingProxy, rq: Any
) -> None:
    url = senv["DATABASE_URL"]
    settings = Settings.from_env({**senv, "REDIS_URL": through(proxy)})
    async with Scheduler(settings, instance_id="stalled") as s:
        first = await asyncio.wait_for(s.tick(), DEADLINE_S)
        assert first is not None and first.rotations == []  # leading, nothing due yet
        due = await seed_scopes(url, 2, due_at=first.now - timedelta(days=1))
        proxy.stall()  # the connection the scheduler holds goes silent; Redis is still there

        started = time.monotonic()
        report = await asyncio.wait_for(s.tick(), DEADLINE_S)
        assert time.monotonic() - started < DEADLINE_S
        assert report is not None
        assert sorted(str(r.scope) for r in report.rotations) == due
        jobs = await queued_jobs(rq, senv["KEYROTOR_QUEUE_NAME"])
        assert sum(1 for j in jobs if ":rotate_dek:" in j) == 2
        # ... and the next tick is as quick as ever: the silent connection was dropped.
        started = time.monotonic()
        await asyncio.wait_for(s.tick(), DEADLINE_S)
        assert time.monotonic() - started < 5.0


async def test_rotate_wait_keeps_its_deadline_when_redis_goes_silent(
    senv: dict[str, str], proxy: StallingProxy
) -> None:
    settings = Settings.from_env({**senv, "REDIS_URL": through(proxy)})
    async with KeyManager(Settings.from_env(senv)) as km:
        await km.encrypt("stall", "sk-test-value", context="secrets:1")
    async with KeyrotorClient(settings) as client:
        handle = await client.rotate("stall")  # no worker runs: the run stays open
        # The pool holds a few connections, as a busy application's does; all of them go silent.
        await asyncio.gather(*(client.redis.ping() for _ in range(4)))
        proxy.stall()
        started = time.monotonic()
        with pytest.raises(TimeoutError):
            await asyncio.wait_for(handle.wait(timeout_s=2.0), DEADLINE_S)
        waited = time.monotonic() - started
    assert waited < 5.0, f"wait(timeout_s=2) returned after {waited:.1f}s"


async def test_a_worker_whose_redis_connection_goes_silent_exits_and_its_restart_works(
    senv: dict[str, str], proxy: StallingProxy, tmp_path: Path
) -> None:
    wenv = {**senv, "REDIS_URL": through(proxy), "KEYROTOR_METRICS_PORT": "0"}
    workers = [WorkerProcess(wenv, tmp_path / "worker-0.log")]
    try:
        await workers[0].wait_started()
        proxy.stall()
        deadline = time.monotonic() + DEADLINE_S
        while workers[0].proc.poll() is None and time.monotonic() < deadline:
            await asyncio.sleep(0.2)
        code = workers[0].proc.poll()
        assert code is not None, "the worker went on waiting on a silent Redis connection"
        assert code != 0
        assert "keyrotor: error: lost Redis (TimeoutError)" in workers[0].output()
        assert "Traceback" not in workers[0].output()

        # Restarted, as its supervisor does, it reaches Redis again and rotates.
        async with KeyManager(Settings.from_env(senv)) as km:
            await km.encrypt("stall", "sk-test-value", context="secrets:1")
        workers.append(WorkerProcess(wenv, tmp_path / "worker-1.log"))
        await workers[1].wait_started()
        async with KeyrotorClient(Settings.from_env(senv)) as client:
            run = await (await client.rotate("stall")).result(timeout_s=DEADLINE_S)
        assert run.state == "completed"
    finally:
        for w in workers:
            w.close()


async def test_the_key_change_listener_notices_a_silent_connection_and_resubscribes(
    proxy: StallingProxy,
) -> None:
    # A process's key-change subscription that went silent would never hear another rotation
    # (its caches then wait for their TTLs). The listener pings an idle subscription and
    # subscribes again, with a "resync" (caches dropped), when the ping goes unanswered.
    import redis.asyncio as aioredis

    from keyrotor.notify import KeyChange, KeyChangeListener, Notifier

    heard: list[str] = []
    listener = KeyChangeListener(through(proxy), "keyrotor-stall-test", lambda c: heard.append(c.event))
    listener.IDLE_PING_S, listener.PONG_WAIT_S = 0.5, 1.0
    listener.start()
    try:
        await asyncio.wait_for(listener.subscribed.wait(), DEADLINE_S)
        await asyncio.sleep(3.0)  # answered pings: the subscription is kept, no resync
        assert heard == ["resync"]
        proxy.stall()
        deadline = time.monotonic() + DEADLINE_S
        while heard.count("resync") < 2 and time.monotonic() < deadline:
            await asyncio.sleep(0.1)
        assert heard.count("resync") == 2, "the listener kept waiting on a silent subscription"
        await asyncio.wait_for(listener.subscribed.wait(), DEADLINE_S)
        redis = aioredis.from_url(WORKER_REDIS_URL)
        try:
            notifier = Notifier(redis, "keyrotor-stall-test")
            deadline = time.monotonic() + DEADLINE_S
            while "rotated" not in heard and time.monotonic() < deadline:
                await notifier.publish(KeyChange("rotated", "stall", 2))
                await asyncio.sleep(0.2)
        finally:
            await redis.aclose()
        assert "rotated" in heard
    finally:
        await listener.stop()
