"""Retiring (then destroying) an imported second-phase DEK never loses a value it still opens.

The old backend sealed second-phase values directly with its DEK: they carry no version and no
location was ever recorded for them, so the proof must not take "nothing counted" for "nothing
needs it". Real Postgres; the values are made with the assumed second-phase layout.
"""

from __future__ import annotations

import base64
import os

import pytest

from keyrotor import KeyManager, Settings
from keyrotor.census import columns
from keyrotor.census import report as census_report
from keyrotor.crypto import legacy_format as legacy
from keyrotor.legacy import migration as legacy_migration
from keyrotor.legacy import second_phase
from keyrotor.rotation import retire
from keyrotor.rotation.context import RotationContext
from keyrotor.rotation.retire import KeyStillInUse, LocationNotCovered
from keyrotor.store import db
from tests.conftest import MASTER_KEY
from tests.jobs.conftest import settings_of
from tests.rotation_helpers import fetch

# The old backend's own table: the operator never registered it.
CREATE = "CREATE TABLE settings (id bigserial PRIMARY KEY, provider text NOT NULL, api_key text)"
PLAIN = "sk-ant-api03-second-phase-0123456789abcdefghijklmnopqrstuvwxyz"


def _quiet(s: Settings) -> Settings:
    return s.model_copy(update={"listen_key_changes": False})


def _old_dek() -> tuple[bytes, str]:
    """A DEK of the old backend and its 144-character ``encrypted_dek`` (under the legacy key)."""
    dek = os.urandom(32)
    return dek, legacy.encrypt(base64.b64encode(dek).decode("ascii"), MASTER_KEY)


async def _dek_state(url: str, scope: str, version: int) -> str:
    rows = await fetch(
        url,
        "SELECT d.state FROM data_keys d JOIN key_scopes k ON k.id = d.scope_id "
        "WHERE k.name = $1 AND d.version = $2",
        scope,
        version,
    )
    return str(rows[0]["state"])


async def test_an_unregistered_table_of_second_phase_values_keeps_the_imported_dek(
    wenv: dict[str, str],
) -> None:
    s = settings_of(wenv)
    dek, wrapped = _old_dek()
    await fetch(s.database_url, CREATE)
    await fetch(
        s.database_url,
        "INSERT INTO settings (id, provider, api_key) VALUES (1, 'anthropic', $1)",
        second_phase.encrypt_second_phase(PLAIN, dek),
    )
    async with KeyManager(_quiet(s)) as km:
        imported = await second_phase.import_dek(km, "anthropic", wrapped)
        assert imported.version == 2
        # The operator migrates what keyrotor knows of (nothing: the table is not registered)...
        report = await legacy_migration.migrate_legacy(km, workers=1)
        assert report.migrated == 0
        rc = RotationContext(km.sessions, km.kek, s)
        # ... and retires the imported DEK: the value in `settings` still needs it.
        with pytest.raises(LocationNotCovered, match=r"anthropic: DEK v2 is kept.*second phase"):
            await retire.retire_dek(rc, "anthropic", 2, force_now=True)
        assert await _dek_state(s.database_url, "anthropic", 2) == "grace"

        # The way out: register the table, migrate, then say that no other table holds any.
        await columns.register(km.sessions, "settings.api_key", pk="id", scope_column="provider")
        assert (await legacy_migration.migrate_legacy(km, workers=1)).migrated == 1
        with pytest.raises(LocationNotCovered):
            await retire.retire_dek(rc, "anthropic", 2, force_now=True)
        async with db.transaction(km.sessions) as session:
            await census_report.ignore(
                session,
                "(second phase: anthropic v2)",
                reason="settings.api_key migrated; no other table held its values",
                actor="test",
            )
        done = await retire.retire_dek(rc, "anthropic", 2, force_now=True)
        assert done.destroy_after is not None
        value = (await fetch(s.database_url, "SELECT api_key FROM settings WHERE id = 1"))[0][0]
        assert await km.decrypt("anthropic", value, context="settings.api_key:1") == PLAIN


async def test_a_new_import_is_not_covered_by_an_old_acknowledgement(wenv: dict[str, str]) -> None:
    """An acknowledgement names one imported DEK: importing another one (here: the scope deleted
    and made again, so the same version number) is kept until acknowledged in turn."""
    s = settings_of(wenv)
    async with KeyManager(_quiet(s)) as km:
        await second_phase.import_dek(km, "anthropic", _old_dek()[1])
        async with db.transaction(km.sessions) as session:
            await census_report.ignore(session, "(second phase: anthropic v2)", reason="migrated", actor="t")
        await fetch(s.database_url, "DELETE FROM key_scopes WHERE name = 'anthropic'")
        km.invalidate("anthropic")
        await second_phase.import_dek(km, "anthropic", _old_dek()[1])
        rc = RotationContext(km.sessions, km.kek, s)
        with pytest.raises(LocationNotCovered):
            await retire.retire_dek(rc, "anthropic", 2, force_now=True)


async def test_a_dek_imported_before_imports_recorded_a_location_gets_one(wenv: dict[str, str]) -> None:
    """Migration 0016: a database whose imported DEK has no location (the earlier code) keeps it
    from retirement once upgraded; a DEK that was once active gets nothing."""
    s = settings_of(wenv)
    async with KeyManager(_quiet(s)) as km:
        await second_phase.import_dek(km, "anthropic", _old_dek()[1])
    await fetch(s.database_url, "DELETE FROM key_locations WHERE location LIKE '(second phase: %'")
    # A database at 0015: without the tables and columns of the later migrations either.
    await fetch(s.database_url, "DROP TABLE replica_repair_intents, replica_repair_log")
    await fetch(
        s.database_url,
        "ALTER TABLE location_acks DROP CONSTRAINT pk_location_acks, DROP COLUMN scope, "
        "ADD CONSTRAINT pk_location_acks PRIMARY KEY (location)",
    )
    await fetch(s.database_url, "ALTER TABLE data_keys DROP COLUMN imported")
    await fetch(s.database_url, "ALTER TABLE replica_keys DROP COLUMN imported")
    await fetch(s.database_url, "UPDATE alembic_version SET version_num = '0015_replica_lifecycle'")
    engine = db.create_engine(s.database_url)
    try:
        await db.upgrade(engine)
    finally:
        await engine.dispose()
    rows = await fetch(s.database_url, "SELECT dek_version, location FROM key_locations ORDER BY 1, 2")
    assert [tuple(r) for r in rows] == [(2, "(second phase: anthropic v2)")]
    async with KeyManager(_quiet(s)) as km:
        with pytest.raises(LocationNotCovered, match="second phase: anthropic v2"):
            await retire.retire_dek(RotationContext(km.sessions, km.kek, s), "anthropic", 2, force_now=True)


async def test_a_value_in_a_row_of_another_scope_keeps_the_imported_dek(wenv: dict[str, str]) -> None:
    """The old backend sealed every provider's key with its DEK; the operator imported it into one
    scope. A row whose `--scope-column` names another scope is not migrated (its scope's DEKs do
    not open it), and must not be left without the only key that does."""
    s = settings_of(wenv)
    dek, wrapped = _old_dek()
    await fetch(s.database_url, CREATE)
    await fetch(
        s.database_url,
        "INSERT INTO settings (id, provider, api_key) VALUES (1, 'openai', $1)",
        second_phase.encrypt_second_phase(PLAIN, dek),
    )
    async with KeyManager(_quiet(s)) as km:
        await columns.register(km.sessions, "settings.api_key", pk="id", scope_column="provider")
        await km.encrypt("openai", "sk-proj-unrelated-0123456789abcdef", context="secret:x")  # scope openai
        await second_phase.import_dek(km, "anthropic", wrapped)
        async with db.transaction(km.sessions) as session:
            await census_report.ignore(
                session, "(second phase: anthropic v2)", reason="only settings.api_key", actor="test"
            )
        report = await legacy_migration.migrate_legacy(km, workers=1)
        assert (report.migrated, report.failed) == (0, 1)  # openai's DEKs do not open it
        rc = RotationContext(km.sessions, km.kek, s)
        with pytest.raises(KeyStillInUse, match=r"sealed with DEK v2 .*settings\.api_key: 1"):
            await retire.retire_dek(rc, "anthropic", 2, force_now=True)
        assert await _dek_state(s.database_url, "anthropic", 2) == "grace"
        # Imported into the row's scope too, the value migrates there; then v2 of anthropic retires.
        await second_phase.import_dek(km, "openai", wrapped)
        async with db.transaction(km.sessions) as session:
            await census_report.ignore(
                session, "(second phase: openai v2)", reason="only settings.api_key", actor="test"
            )
        assert (await legacy_migration.migrate_legacy(km, workers=1)).migrated == 1
        assert (await retire.retire_dek(rc, "anthropic", 2, force_now=True)).destroy_after is not None
        value = (await fetch(s.database_url, "SELECT api_key FROM settings WHERE id = 1"))[0][0]
        assert await km.decrypt("openai", value, context="settings.api_key:1") == PLAIN
