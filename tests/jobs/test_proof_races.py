"""The retirement proof against what changes while it runs, in process on the real Postgres.

A destruction (or retirement) reads the registered columns twice: once when its job starts, to
know which tables to count, and once inside the proof's transaction, to know which locations the
census covers. A column registered between the two was covered but never counted.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import os
import time
from collections.abc import AsyncIterator
from datetime import UTC, datetime

import asyncpg
import pytest

from keyrotor import KeyManager, Settings
from keyrotor.census import columns
from keyrotor.census import report as census_report
from keyrotor.census.locations import second_phase_location
from keyrotor.crypto import legacy_format
from keyrotor.errors import KeyVersionTooOld, PermanentError
from keyrotor.legacy import migration as legacy_migration
from keyrotor.legacy import second_phase
from keyrotor.rotation import dek as rotation
from keyrotor.rotation import destruction, retire
from keyrotor.rotation.context import RotationContext
from keyrotor.rotation.retire import KeyStillInUse
from keyrotor.schedule import scan as schedule
from keyrotor.store import db
from tests.conftest import MASTER_KEY
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


async def test_an_imported_dek_is_kept_while_a_value_it_sealed_is_not_migrated(
    app: tuple[Settings, KeyManager, RotationContext],
) -> None:
    s, km, rc = app
    await columns.register(km.sessions, COLUMN, pk="id", scope=SCOPE)
    dek = os.urandom(32)
    wrapped = legacy_format.encrypt(
        base64.b64encode(dek).decode("ascii"), MASTER_KEY
    )  # the old encrypted_dek
    imported = await second_phase.import_dek(km, SCOPE, wrapped)
    assert (imported.version, imported.state) == (2, "grace")
    # The operator says the registered column is the only one holding its values (else the
    # version is kept for its location alone): what keeps it below is the unmigrated value.
    async with db.transaction(km.sessions) as session:
        await census_report.ignore(
            session, second_phase_location(SCOPE, 2), reason="only app_keys.api_key", actor="test"
        )
    # The old backend's second phase sealed this value with that DEK; `legacy migrate` not run yet.
    await _write(s, 1, second_phase.encrypt_second_phase("sk-second-phase-0123456789", dek))

    # The scheduler: the imported version's grace ends, then its destruction window.
    await fetch(s.database_url, "UPDATE data_keys SET grace_until = now() - interval '1 second'")
    cfg = schedule.ScanConfig()
    async for batch in schedule.open_due_retirements(km.sessions, datetime.now(UTC), cfg):
        for run in batch.opened:
            with contextlib.suppress(PermanentError):
                await retire.retire_dek(rc, SCOPE, 2, run_id=run.id)
    with pytest.raises(KeyStillInUse, match=r"old backend sealed with DEK v2 .*app_keys\.api_key: 1"):
        await retire.retire_dek(rc, SCOPE, 2, force_now=True)
    await expire_window(s.database_url, SCOPE, 2)
    async for batch in _due(km):
        for run in batch.opened:
            with contextlib.suppress(PermanentError):
                await destruction.destroy_dek(rc, SCOPE, 2, run_id=run.id)

    report = await legacy_migration.migrate_legacy(km, workers=1)
    assert (report.migrated, report.failed) == (1, 0), "the imported DEK was erased under an unmigrated value"
    # Migrated, nothing needs the imported DEK any more: it retires.
    assert (await retire.retire_dek(rc, SCOPE, 2, force_now=True)).destroy_after is not None
