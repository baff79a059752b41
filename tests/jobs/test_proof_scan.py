"""The retirement proof looks for the old backend's values in every table only for an imported DEK.

A value the old backend's second phase sealed carries no version, so only the DEK that sealed it
finds it, in any table and under any scope: the proof of an imported DEK tries it on every value
not yet ``kr1``, with every registered table locked. A DEK keyrotor made never sealed such a
value, so its proof counts the scope's rows only, and another scope's table is neither read nor
locked (a tenant's writes never wait for another tenant's retirement). What tells the two apart
is ``data_keys.imported`` (migration 0019), which must survive a KEK rewrap. Real Postgres.
"""

from __future__ import annotations

import asyncio
import base64
import os
import time
from collections.abc import AsyncIterator

import asyncpg
import pytest

from keyrotor import KeyManager, Settings
from keyrotor.census import columns
from keyrotor.census import report as census_report
from keyrotor.census.locations import second_phase_location
from keyrotor.crypto import legacy_format
from keyrotor.legacy import second_phase
from keyrotor.rotation import dek as rotation
from keyrotor.rotation import kek as kek_rotation
from keyrotor.rotation import retire
from keyrotor.rotation.context import RotationContext
from keyrotor.rotation.retire import KeyStillInUse
from keyrotor.store import db
from tests.conftest import MASTER_KEY
from tests.jobs.conftest import settings_of
from tests.rotation_helpers import fetch

SCOPE = "openai"
OURS = "app_keys.api_key"  # registered for SCOPE
THEIRS = "tenant_keys.api_key"  # registered for another tenant's scope
OTHER = "tenant-b/openai"
NEW_KEY = "second-master-key-4b8e2a6c0d9f1e3a5c7b9d0e2f4a6c8e"
# The proof must not wait for the tenant's writer at all; this bounds a slow machine's proof.
DEADLINE_S = 15.0

IMPORTED = (
    "SELECT d.version, d.imported FROM data_keys d JOIN key_scopes s ON s.id = d.scope_id "
    "WHERE s.name = $1 ORDER BY d.version"
)


@pytest.fixture
async def app(wenv: dict[str, str]) -> AsyncIterator[tuple[Settings, KeyManager, RotationContext]]:
    s = settings_of(wenv, KEYROTOR_LISTEN_KEY_CHANGES="false")
    await fetch(s.database_url, "CREATE TABLE app_keys (id bigint PRIMARY KEY, api_key text)")
    await fetch(s.database_url, "CREATE TABLE tenant_keys (id bigint PRIMARY KEY, api_key text)")
    async with KeyManager(s) as km:
        await columns.register(km.sessions, OURS, pk="id", scope=SCOPE)
        await columns.register(km.sessions, THEIRS, pk="id", scope=OTHER)
        yield s, km, RotationContext(km.sessions, km.kek, s)


def _old_dek() -> tuple[bytes, str]:
    """A DEK of the old backend and its ``encrypted_dek`` (under the legacy master key)."""
    dek = os.urandom(32)
    return dek, legacy_format.encrypt(base64.b64encode(dek).decode("ascii"), MASTER_KEY)


async def _tenant_has_an_old_value(s: Settings) -> None:
    """The other tenant's table still holds a value the old backend sealed (not migrated)."""
    sealed = second_phase.encrypt_second_phase("sk-tenant-b-0123456789", os.urandom(32))
    await fetch(s.database_url, "INSERT INTO tenant_keys (id, api_key) VALUES (1, $1)", sealed)


async def _writer_in(s: Settings) -> tuple[asyncpg.Connection, asyncpg.transaction.Transaction]:
    """An application transaction that wrote to the tenant's table and has not committed: it
    holds ROW EXCLUSIVE on it, which a SHARE lock waits for."""
    conn = await asyncpg.connect(s.database_url)
    tx = conn.transaction()
    await tx.start()
    await conn.execute("UPDATE tenant_keys SET api_key = api_key WHERE id = 1")
    return conn, tx


async def _lock_waiters(conn: asyncpg.Connection) -> int:
    return int(
        await conn.fetchval(
            "SELECT count(*) FROM pg_stat_activity "
            "WHERE wait_event_type = 'Lock' AND datname = current_database()"
        )
    )


async def test_a_keyrotor_dek_retires_while_another_tenants_table_is_being_written(
    app: tuple[Settings, KeyManager, RotationContext],
) -> None:
    s, km, rc = app
    await _tenant_has_an_old_value(s)
    await fetch(
        s.database_url,
        "INSERT INTO app_keys (id, api_key) VALUES (1, $1)",
        await km.encrypt(SCOPE, "sk-row-1", context=f"{OURS}:1"),
    )
    await rotation.rotate_dek(rc, SCOPE)
    assert [tuple(r) for r in await fetch(s.database_url, IMPORTED, SCOPE)] == [(1, False), (2, False)]

    conn, tx = await _writer_in(s)
    try:
        # Before: the proof locked tenant_keys in SHARE mode to scan it for the old backend's
        # values, so it waited for this writer (and every writer after it waited for the proof).
        done = await asyncio.wait_for(retire.retire_dek(rc, SCOPE, 1, force_now=True), DEADLINE_S)
        assert await _lock_waiters(conn) == 0
    finally:
        await tx.rollback()
        await conn.close()
    assert done.destroy_after is not None
    value = (await fetch(s.database_url, "SELECT api_key FROM app_keys WHERE id = 1"))[0][0]
    assert value.startswith("kr1:2:")


async def test_an_imported_dek_still_scans_and_locks_every_registered_table(
    app: tuple[Settings, KeyManager, RotationContext],
) -> None:
    """The same tenant's writer holds back an imported DEK's proof (it must read that table),
    and a value the imported DEK sealed there, under the other tenant's row, keeps it."""
    s, km, rc = app
    dek, wrapped = _old_dek()
    sealed = second_phase.encrypt_second_phase("sk-filed-under-tenant-b-0123456789", dek)
    await fetch(s.database_url, "INSERT INTO tenant_keys (id, api_key) VALUES (1, $1)", sealed)
    assert (await second_phase.import_dek(km, SCOPE, wrapped)).version == 2
    assert [tuple(r) for r in await fetch(s.database_url, IMPORTED, SCOPE)] == [(1, False), (2, True)]
    async with db.transaction(km.sessions) as session:
        await census_report.ignore(
            session, second_phase_location(SCOPE, 2), reason="only registered tables", actor="test"
        )

    conn, tx = await _writer_in(s)
    try:
        proof = asyncio.create_task(retire.retire_dek(rc, SCOPE, 2, force_now=True))
        deadline = time.monotonic() + DEADLINE_S
        while not await _lock_waiters(conn):  # the proof waits for the writer's table
            assert time.monotonic() < deadline and not proof.done(), "the proof never waited"
            await asyncio.sleep(0.02)
    finally:
        await tx.rollback()
        await conn.close()
    with pytest.raises(KeyStillInUse, match=r"sealed with DEK v2 .*tenant_keys\.api_key: 1"):
        await asyncio.wait_for(proof, DEADLINE_S)


async def test_the_imported_mark_survives_a_kek_rewrap(wenv: dict[str, str]) -> None:
    """A KEK rotation rewraps every DEK: the imported one's proof still scans every table."""
    s = settings_of(wenv, KEYROTOR_LISTEN_KEY_CHANGES="false")
    await fetch(s.database_url, "CREATE TABLE tenant_keys (id bigint PRIMARY KEY, api_key text)")
    dek, wrapped = _old_dek()
    sealed = second_phase.encrypt_second_phase("sk-filed-under-tenant-b-0123456789", dek)
    await fetch(s.database_url, "INSERT INTO tenant_keys (id, api_key) VALUES (1, $1)", sealed)
    async with KeyManager(s) as km:
        await columns.register(km.sessions, THEIRS, pk="id", scope=OTHER)
        await second_phase.import_dek(km, SCOPE, wrapped)
        async with db.transaction(km.sessions) as session:
            await census_report.ignore(
                session, second_phase_location(SCOPE, 2), reason="only registered tables", actor="test"
            )
    moved = settings_of(
        wenv,
        KEYROTOR_LISTEN_KEY_CHANGES="false",
        ENCRYPTION_KEY=NEW_KEY,
        ENCRYPTION_KEY_VERSION="2",
        ENCRYPTION_KEYS_PREVIOUS=f'{{"1": "{MASTER_KEY}"}}',
    )
    async with KeyManager(moved) as km:
        rc = RotationContext(km.sessions, km.kek, moved)
        result = await asyncio.wait_for(kek_rotation.rotate_kek(rc), DEADLINE_S)
        assert result.run.state == "completed" and result.kek_version == 2
        rows = await fetch(
            s.database_url,
            "SELECT d.version, d.kek_version, d.imported FROM data_keys d "
            "JOIN key_scopes s ON s.id = d.scope_id WHERE s.name = $1 ORDER BY d.version",
            SCOPE,
        )
        assert [tuple(r) for r in rows] == [(1, 2, False), (2, 2, True)]
        with pytest.raises(KeyStillInUse, match=r"sealed with DEK v2 .*tenant_keys\.api_key: 1"):
            await retire.retire_dek(rc, SCOPE, 2, force_now=True)


async def test_migration_0019_marks_every_dek_it_cannot_prove_keyrotor_made(wenv: dict[str, str]) -> None:
    """A database at 0018 has no mark. A DEK is taken for keyrotor's own only if it was made
    active by a rotation here (an imported DEK never is) and nothing says it was imported (its
    `(second phase: ...)` location, its import's audit event); a DEK a promotion stamped active
    (a copy without dates: an imported one's looks the same) is taken for imported."""
    s = settings_of(wenv, KEYROTOR_LISTEN_KEY_CHANGES="false")
    async with KeyManager(s) as km:
        rc = RotationContext(km.sessions, km.kek, s)
        for scope in ("plain", "by-location", "by-event", "promoted"):
            await km.encrypt(scope, "sk-warm-up")  # v1: keyrotor's own, active
        await rotation.rotate_dek(rc, "plain")  # v2 active, v1 grace: both keyrotor's own
        for scope in ("by-location", "by-event"):  # v2: imported
            await second_phase.import_dek(km, scope, _old_dek()[1])
    url = s.database_url
    # Imported DEKs that once came through a promotion carry an activated_at (promotion stamps one).
    await fetch(url, "UPDATE data_keys SET activated_at = now() - interval '1 day' WHERE version = 2")
    await fetch(
        url,
        "DELETE FROM key_locations k USING key_scopes s WHERE s.id = k.scope_id AND s.name = 'by-event' "
        "AND k.location LIKE '(second phase: %'",
    )
    # "promoted" v1 was adopted by a promotion that stamped it active (its copy had no dates).
    await fetch(
        url,
        "INSERT INTO replica_promotions (region, promoted_at, previous_primary, promoted_by, keys) "
        "SELECT 'eu-west-1', d.activated_at, 'us-east-1', 'test', 1 FROM data_keys d "
        "JOIN key_scopes s ON s.id = d.scope_id WHERE s.name = 'promoted'",
    )
    # The database as 0018 left it.
    await fetch(url, "ALTER TABLE data_keys DROP COLUMN imported")
    await fetch(url, "ALTER TABLE replica_keys DROP COLUMN imported")
    await fetch(url, "UPDATE alembic_version SET version_num = '0018_scoped_location_acks'")
    engine = db.create_engine(url)
    try:
        await db.upgrade(engine)
    finally:
        await engine.dispose()
    rows = await fetch(
        url,
        "SELECT s.name, d.version, d.imported FROM data_keys d JOIN key_scopes s ON s.id = d.scope_id "
        "ORDER BY s.name, d.version",
    )
    assert [tuple(r) for r in rows] == [
        ("by-event", 1, False),
        ("by-event", 2, True),
        ("by-location", 1, False),
        ("by-location", 2, True),
        ("plain", 1, False),
        ("plain", 2, False),
        ("promoted", 1, True),
    ]
