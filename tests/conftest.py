"""Fixtures on the real PostgreSQL and Redis of this machine.

Each test gets its own database, cloned from a template migrated once per session
(procrastinate's pattern: ``CREATE DATABASE x TEMPLATE y``), so tests are isolated and the suite
can run twice in a row. A clone and its drop cost a few tenths of a second each here, so a thread
of each test process makes the next one while a test runs and drops the used ones behind it.
"""

from __future__ import annotations

import asyncio
import os
import queue
import threading
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import asyncpg
import pytest
import redis.asyncio as aioredis

from keyrotor import KeyManager, Settings
from keyrotor.store import db

ROOT = Path(__file__).resolve().parents[1]
PG_ADMIN = os.environ.get("KEYROTOR_TEST_PG", "postgresql://postgres@127.0.0.1:5432/postgres")


def redis_db_of_this_process(url: str) -> str:
    """``url`` with its database number moved down by two per pytest-xdist worker (gw0 keeps it,
    gw1 takes two below), so parallel workers never flush each other's Redis database."""
    worker = os.environ.get("PYTEST_XDIST_WORKER", "gw0")
    index = int(worker[2:]) if worker[2:].isdigit() else 0
    base, number = url.rsplit("/", 1)
    moved = int(number) - 2 * index
    if moved < 0:
        raise RuntimeError(f"no Redis database left for xdist worker {worker} below {url}")
    return f"{base}/{moved}"


REDIS_URL = redis_db_of_this_process(os.environ.get("KEYROTOR_TEST_REDIS", "redis://127.0.0.1:6379/13"))
# One template per test session (pid), so concurrent sessions on one server never collide.
TEMPLATE = f"keyrotor_test_template_{os.getpid()}"
# A strong test-only master key (never used outside tests).
MASTER_KEY = "test-master-key-9f8e7d6c5b4a39281706f5e4d3c2b1a0"


def _url(name: str) -> str:
    return PG_ADMIN.rsplit("/", 1)[0] + "/" + name


async def _admin(sql: str) -> None:
    conn = await asyncpg.connect(PG_ADMIN)
    try:
        await conn.execute(sql)
    finally:
        await conn.close()


async def _build_template() -> None:
    await _admin(f"DROP DATABASE IF EXISTS {TEMPLATE} WITH (FORCE)")
    await _admin(f"CREATE DATABASE {TEMPLATE}")
    engine = db.create_engine(_url(TEMPLATE))
    try:
        await db.upgrade(engine)
    finally:
        await engine.dispose()


@pytest.fixture(scope="session")
def template_db() -> Iterator[str]:
    """A migrated template database, built once per test session."""
    asyncio.run(_build_template())
    yield TEMPLATE
    asyncio.run(_admin(f"DROP DATABASE IF EXISTS {TEMPLATE} WITH (FORCE)"))


class _Databases:
    """Fresh databases for one test process, made one test ahead and dropped behind.

    Cloning the template and dropping a clone cost about 0.2-0.5 s each here, once a test; a
    thread of its own does both while the tests run (most of a test's time is spent waiting on
    subprocesses), so a test takes a database already made and leaves its own to be dropped.
    """

    def __init__(self, template: str) -> None:
        self._template = template
        self._ready: queue.Queue[str] = queue.Queue(maxsize=1)
        self._used: queue.Queue[str | None] = queue.Queue()
        self._errors: list[BaseException] = []
        self._thread = threading.Thread(target=self._run, name="test-databases", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        async def work() -> None:
            while True:
                if not self._ready.full():
                    name = f"kr_t_{uuid.uuid4().hex[:12]}"
                    try:
                        await _admin(f"CREATE DATABASE {name} TEMPLATE {self._template}")
                    except BaseException as exc:  # handed to the test that waits for it
                        self._errors.append(exc)
                        return
                    self._ready.put(name)
                try:
                    used = self._used.get(timeout=0.05)
                except queue.Empty:
                    continue
                if used is None:  # the session is over
                    return
                await _admin(f"DROP DATABASE IF EXISTS {used} WITH (FORCE)")

        asyncio.run(work())

    async def take(self, timeout_s: float = 60) -> str:
        """A fresh database's name, once the thread has made it. Polled, not waited for in a
        thread: a test may check which threads its process runs (the loop's default executor
        must stay unused by keyrotor)."""
        deadline = time.monotonic() + timeout_s
        while True:
            if self._errors:
                raise self._errors[0]
            try:
                return self._ready.get_nowait()
            except queue.Empty:
                assert time.monotonic() < deadline, "no test database was made in time"
                await asyncio.sleep(0.005)

    def give_back(self, name: str) -> None:
        """Queue a used database to be dropped."""
        self._used.put(name)

    def close(self) -> None:
        """Stop the thread, then drop what is left (the one made ahead, the used ones)."""
        self._used.put(None)
        self._thread.join(timeout=60)
        left = []
        while not self._ready.empty():
            left.append(self._ready.get())
        while not self._used.empty():
            name = self._used.get()
            if name is not None:
                left.append(name)

        async def drop() -> None:
            for name in left:
                await _admin(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")

        asyncio.run(drop())


@pytest.fixture(scope="session")
def databases(template_db: str) -> Iterator[_Databases]:
    pool = _Databases(template_db)
    yield pool
    pool.close()


@pytest.fixture
async def database_url(databases: _Databases) -> AsyncIterator[str]:
    """A fresh, migrated database for one test; dropped afterwards (by the pool's thread)."""
    name = await databases.take()
    try:
        yield _url(name)
    finally:
        databases.give_back(name)


@pytest.fixture
def env(database_url: str) -> dict[str, str]:
    """The environment a keyrotor process of this test sees.

    ``PYTHONPATH`` names this checkout: a process started from the virtualenv's console script
    would otherwise import the keyrotor the virtualenv was installed from, and a test run from
    another working copy would exercise code it never changed.
    """
    return {
        "PYTHONPATH": str(ROOT),
        "DATABASE_URL": database_url,
        "REDIS_URL": REDIS_URL,
        "ENCRYPTION_KEY": MASTER_KEY,
        "SECRETS_PROVIDER": "local",
        "KEYROTOR_LOG_FORMAT": "json",
    }


@pytest.fixture
def settings(env: dict[str, str]) -> Settings:
    return Settings.from_env(env)


@pytest.fixture
async def km(settings: Settings) -> AsyncIterator[KeyManager]:
    async with KeyManager(settings) as manager:
        yield manager


@pytest.fixture
async def redis() -> AsyncIterator[aioredis.Redis]:
    """The test Redis database, flushed before and after."""
    client = aioredis.Redis.from_url(REDIS_URL)
    await client.flushdb()
    try:
        yield client
    finally:
        await client.flushdb()
        await client.aclose()
