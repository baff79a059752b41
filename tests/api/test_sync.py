"""keyrotor.sync.KeyManager: the same methods, blocking, from many threads at once."""

from __future__ import annotations

import asyncio
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
