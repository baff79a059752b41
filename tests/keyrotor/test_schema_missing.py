"""An application on a database `keyrotor db upgrade` never ran on: a permanent, typed error.

A missing schema is not an outage: an application that retries ``TransientError`` (as the
docs say) would retry it for ever. Opening, encrypt, decrypt and the blocking facade all
raise ``SchemaMissing`` (a ``ConfigurationError``), whose message says what to run.
"""

from __future__ import annotations

import asyncio
import uuid
from collections.abc import AsyncIterator

import asyncpg
import pytest

from keyrotor import KeyManager, Settings
from keyrotor import sync as sync_keyrotor
from keyrotor.errors import ConfigurationError, PermanentError, SchemaMissing, StoreRejected
from tests.conftest import PG_ADMIN, _admin, _url


@pytest.fixture
async def empty_settings(env: dict[str, str]) -> AsyncIterator[Settings]:
    """Settings naming a database that exists but holds no keyrotor schema."""
    name = f"kr_t_empty_{uuid.uuid4().hex[:12]}"
    await _admin(f"CREATE DATABASE {name}")
    try:
        yield Settings.from_env({**env, "DATABASE_URL": _url(name)})
    finally:
        await _admin(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")


async def _drop_schema(database_url: str) -> None:
    conn = await asyncpg.connect(PG_ADMIN.rsplit("/", 1)[0] + "/" + database_url.rsplit("/", 1)[1])
    try:
        await conn.execute("DROP SCHEMA public CASCADE; CREATE SCHEMA public")
    finally:
        await conn.close()


def _says_what_to_run(exc: BaseException) -> None:
    assert isinstance(exc, SchemaMissing), repr(exc)
    assert isinstance(exc, ConfigurationError | PermanentError)
    # Code written against the old type (a refused statement) still catches it.
    assert isinstance(exc, StoreRejected)
    assert "keyrotor db upgrade" in str(exc) and "\n" not in str(exc)


async def test_opening_a_manager_on_a_database_without_schema_says_run_db_upgrade(
    empty_settings: Settings,
) -> None:
    manager = KeyManager(empty_settings)
    with pytest.raises(SchemaMissing) as caught:
        async with manager:
            pass
    _says_what_to_run(caught.value)
    # A failed opening leaves nothing running behind it: no listener, no audit writer, no pool.
    await asyncio.sleep(0)
    assert asyncio.all_tasks() == {asyncio.current_task()}
    assert manager._engine is None


async def test_encrypt_and_decrypt_without_schema_are_permanent(empty_settings: Settings) -> None:
    manager = KeyManager(empty_settings)
    manager.warn_open_grants = False  # as the CLI opens it: no read of the database at opening
    async with manager:
        with pytest.raises(SchemaMissing) as enc:
            await manager.encrypt("openai", "sk-test-value", context="users.api_key:1")
        _says_what_to_run(enc.value)
        with pytest.raises(SchemaMissing) as dec:
            await manager.decrypt("openai", "kr1:1:AAAA", context="users.api_key:1")
        _says_what_to_run(dec.value)


async def test_encrypt_after_the_schema_was_dropped_is_permanent(settings: Settings) -> None:
    async with KeyManager(settings) as manager:
        token = await manager.encrypt("openai", "sk-test-value")
        await _drop_schema(settings.database_url)
        manager.invalidate()
        with pytest.raises(SchemaMissing) as enc:
            await manager.encrypt("anthropic", "sk-test-value")
        _says_what_to_run(enc.value)
        with pytest.raises(SchemaMissing) as dec:
            await manager.decrypt("openai", token)
        _says_what_to_run(dec.value)


def test_the_blocking_facade_raises_it_too(settings: Settings) -> None:
    empty = f"kr_t_empty_{uuid.uuid4().hex[:12]}"
    asyncio.run(_admin(f"CREATE DATABASE {empty}"))
    try:
        with pytest.raises(SchemaMissing) as opening:
            sync_keyrotor.KeyManager(settings.model_copy(update={"database_url": _url(empty)}), timeout_s=30)
        _says_what_to_run(opening.value)
    finally:
        asyncio.run(_admin(f"DROP DATABASE IF EXISTS {empty} WITH (FORCE)"))
    with sync_keyrotor.KeyManager(settings, timeout_s=30) as manager:
        token = manager.encrypt("openai", "sk-test-value")
        asyncio.run(_drop_schema(settings.database_url))
        manager.invalidate()
        with pytest.raises(SchemaMissing) as enc:
            manager.encrypt("anthropic", "sk-test-value")
        _says_what_to_run(enc.value)
        with pytest.raises(SchemaMissing) as dec:
            manager.decrypt("openai", token)
        _says_what_to_run(dec.value)
