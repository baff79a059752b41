"""The retirement proof against what changes while it runs, in process on the real Postgres.

A destruction (or retirement) reads the registered columns twice: once when its job starts, to
know which tables to count, and once inside the proof's transaction, to know which locations the
census covers. A column registered between the two was covered but never counted.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from datetime import UTC, datetime

import asyncpg
import pytest

from keyrotor import KeyManager, Settings
from keyrotor.census import columns
from keyrotor.errors import KeyVersionTooOld
from keyrotor.rotation import dek as rotation
from keyrotor.rotation import destruction, retire
from keyrotor.rotation.context import RotationContext
from keyrotor.rotation.retire import KeyStillInUse
from keyrotor.schedule import scan as schedule
from tests.destruction_helpers import expire_window
from tests.jobs.conftest import settings_of
from tests.rotation_helpers import fetch

SCOPE = "openai"
COLUMN = "app_keys.api_key"


@pytest.fixture
async def app(wenv: dict[str, str]) -> AsyncIterator[tuple[Settings, KeyManager, RotationContext]]:
    s = settings_of(wenv, KEYROTOR_LISTEN_KEY_CHANGES="false")
    await fetch(s.database_url, "CREATE TABLE app_keys (id bigint PRIMARY KEY, api_key text)")
    async with KeyManager(s) as km:
        yield s, km, RotationContext(km.sessions, km.kek, s)


async def _write(s: Settings, row_id: int, token: str) -> None:
    await fetch(s.database_url, "INSERT INTO app_keys (id, api_key) VALUES ($1, $2)", row_id, token)


async def _due(km: KeyManager) -> AsyncIterator[schedule.Batch]:
    cfg = schedule.ScanConfig()
    async for batch in schedule.open_due_destructions(km.sessions, datetime.now(UTC), cfg):
        yield batch


async def _wait_for_lock_wait(conn: asyncpg.Connection, timeout_s: float = 20) -> None:
    """Until another backend waits on a lock (the job under test is blocked where we want it)."""
    deadline = time.monotonic() + timeout_s
    waiting = (
        "SELECT count(*) FROM pg_stat_activity "
        "WHERE wait_event_type = 'Lock' AND datname = current_database()"
    )
    while not await conn.fetchval(waiting):
        assert time.monotonic() < deadline, "the job never reached the lock"
        await asyncio.sleep(0.02)


async def test_a_column_registered_while_a_destruction_runs_is_counted_not_only_covered(
    app: tuple[Settings, KeyManager, RotationContext],
) -> None:
    s, km, rc = app
    await columns.register(km.sessions, COLUMN, pk="id", scope=SCOPE)
    await _write(s, 1, await km.encrypt(SCOPE, "sk-row-1", context=f"{COLUMN}:1"))
    # Sealed under v1 by the application, written only after v1 was retired (a value in flight).
    late = await km.encrypt(SCOPE, "sk-row-2-in-flight", context=f"{COLUMN}:2")
    await rotation.rotate_dek(rc, SCOPE)
    await retire.retire_dek(rc, SCOPE, 1, force_now=True)
    await _write(s, 2, late)
    await expire_window(s.database_url, SCOPE, 1)
    (run,) = [r for b in [b async for b in _due(km)] for r in b.opened]  # the scheduler's scan

    # The operator re-registers the column (unregister, register: the only way to change it).
    await columns.unregister(km.sessions, COLUMN)
    blocker = await asyncpg.connect(s.database_url)
    try:
        tx = blocker.transaction()
        await tx.start()
        await blocker.execute("SELECT 1 FROM data_keys WHERE version = 1 FOR UPDATE")
        job = asyncio.create_task(destruction.destroy_dek(rc, SCOPE, 1, run_id=run.id))
        await _wait_for_lock_wait(blocker)  # the job started while the column was unregistered
        await columns.register(km.sessions, COLUMN, pk="id", scope=SCOPE)
        await tx.rollback()
        with pytest.raises(KeyStillInUse):
            await asyncio.wait_for(job, 30)
    finally:
        await blocker.close()
    km.invalidate()
    try:
        assert await km.decrypt(SCOPE, late, context=f"{COLUMN}:2") == "sk-row-2-in-flight"
    except KeyVersionTooOld:
        pytest.fail("v1 was destroyed while a registered column still held a value of it")
