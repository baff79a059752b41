"""keyrotor.sync.KeyManager: the same methods, blocking, from many threads at once."""

from __future__ import annotations

import asyncio
import threading
import time
from concurrent.futures import ThreadPoolExecutor

import asyncpg
import pytest

from keyrotor import KeyManager as AsyncKeyManager
from keyrotor import Settings
from keyrotor.audit.log import actor_context
from keyrotor.errors import ConfigurationError, DecryptionFailed, SecretNotFound
from keyrotor.sync import KeyManager


def test_round_trips_and_errors(settings: Settings) -> None:
    with KeyManager(settings) as km:
        ct = km.encrypt("openai", "sk-1", context="settings.api_key:1")
        assert km.decrypt("openai", ct, context="settings.api_key:1") == "sk-1"
        with pytest.raises(DecryptionFailed):
            km.decrypt("openai", ct, context="settings.api_key:2")
        km.put_secret("openai", "prod", "sk-2")
        assert km.get_secret("openai", "prod") == "sk-2"
        assert km.put_secrets("openai", [("a", "1"), ("b", "2")]) == 2
        with pytest.raises(SecretNotFound):
            km.get_secret("openai", "missing")
    with pytest.raises(ConfigurationError):
        km.encrypt("openai", "x")
    km.close()  # idempotent


def test_safe_from_threads_and_read_by_the_async_manager(settings: Settings) -> None:
    with KeyManager(settings) as km:

        def work(i: int) -> tuple[int, str]:
            with actor_context(f"worker-{i % 3}"):
                ct = km.encrypt("tenant-1/openai", f"sk-{i}", context=f"c:{i}")
                assert km.decrypt("tenant-1/openai", ct, context=f"c:{i}") == f"sk-{i}"
                return i, ct

        with ThreadPoolExecutor(8) as pool:
            written = list(pool.map(work, range(64)))

    async def check() -> None:
        async with AsyncKeyManager(settings) as akm:
            for i, ct in written:
                assert await akm.decrypt("tenant-1/openai", ct, context=f"c:{i}") == f"sk-{i}"
        conn = await asyncpg.connect(settings.database_url)
        try:
            actors = await conn.fetch(
                "SELECT DISTINCT actor FROM encryption_audit_log WHERE event_type = 'encrypt'"
            )
        finally:
            await conn.close()
        assert {r["actor"] for r in actors} == {"worker-0", "worker-1", "worker-2"}

    asyncio.run(check())


def test_a_call_that_times_out_is_cancelled_not_left_to_finish(settings: Settings) -> None:
    """``timeout_s`` ends the call, not only the wait: a ``put_secret`` that raised TimeoutError
    must not write its value later, behind the caller's back (a retry with a newer value could
    otherwise be overwritten by the one the caller was told had failed)."""

    async def lock_secrets(locked: threading.Event, release: threading.Event) -> None:
        conn = await asyncpg.connect(settings.database_url)
        try:
            async with conn.transaction():
                await conn.execute("LOCK TABLE secrets IN ACCESS EXCLUSIVE MODE")
                locked.set()
                await asyncio.to_thread(release.wait, 30)
        finally:
            await conn.close()

    async def stored() -> str:
        async with AsyncKeyManager(settings) as akm:
            return await akm.get_secret("openai", "prod")

    with KeyManager(settings, timeout_s=0.5) as km:
        km.put_secret("openai", "prod", "sk-old")
        locked, release = threading.Event(), threading.Event()
        holder = threading.Thread(target=asyncio.run, args=(lock_secrets(locked, release),))
        holder.start()
        try:
            assert locked.wait(10)
            with pytest.raises(TimeoutError):
                km.put_secret("openai", "prod", "sk-timed-out")
        finally:
            release.set()
            holder.join(30)
        deadline = time.monotonic() + 2.0  # long enough for a write left running to land
        while time.monotonic() < deadline:
            assert asyncio.run(stored()) == "sk-old"
            time.sleep(0.2)
        km.put_secret("openai", "prod", "sk-new")  # the manager still works
        assert km.get_secret("openai", "prod") == "sk-new"


def test_the_same_methods_as_the_async_manager(settings: Settings) -> None:
    """README: ``keyrotor.sync.KeyManager``, the same methods: every public coroutine method of
    the async manager has a blocking twin, and ``decrypt_many`` answers as the async one does."""
    public = {
        name
        for name in dir(AsyncKeyManager)
        if not name.startswith("_") and asyncio.iscoroutinefunction(getattr(AsyncKeyManager, name))
    }
    assert public - {"open", "close"} <= set(dir(KeyManager)), public - set(dir(KeyManager))
    with KeyManager(settings) as km:
        ct = km.encrypt("openai", "sk-1", context="c:1")
        results = km.decrypt_many("openai", [(ct, "c:1"), (ct, "c:2")])
        assert results[0] == "sk-1" and isinstance(results[1], DecryptionFailed)
