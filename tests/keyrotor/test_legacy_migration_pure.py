"""The pure parts of the legacy migration and of managed columns (no database)."""

from __future__ import annotations

import os

import pytest
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from keyrotor.census import columns
from keyrotor.errors import DecryptionFailed, InvalidInput, MalformedCiphertext
from keyrotor.legacy import migration as legacy_migration


def test_second_phase_layout_round_trips_and_fails_loudly() -> None:
    dek = os.urandom(32)
    value = legacy_migration.encrypt_second_phase("sk-ant-api03-xyz", dek)
    assert legacy_migration.decrypt_second_phase(value, AESGCM(dek)) == "sk-ant-api03-xyz"
    with pytest.raises(DecryptionFailed, match="failed authentication"):
        legacy_migration.decrypt_second_phase(value, AESGCM(os.urandom(32)))
    with pytest.raises(MalformedCiphertext):
        legacy_migration.decrypt_second_phase("not base64!", AESGCM(dek))
    others = [AESGCM(os.urandom(32)), AESGCM(dek)]
    assert legacy_migration.try_second_phase(value, others) == "sk-ant-api03-xyz"
    assert legacy_migration.try_second_phase(value, others[:1]) is None


def test_provider_shape_is_reported_not_enforced() -> None:
    assert legacy_migration.shape_warning("anthropic", "sk-ant-api03-" + "a" * 40) is None
    assert legacy_migration.shape_warning("tenant-4/openai", "sk-proj-" + "b" * 40) is None
    assert legacy_migration.shape_warning("google", "AIza" + "c" * 35) is None
    assert "anthropic" in (legacy_migration.shape_warning("anthropic", "hunter2") or "")
    assert legacy_migration.shape_warning("internal", "anything") is None


def test_column_names_are_parsed_strictly_and_quoted() -> None:
    assert columns.parse_column("settings.api_key") == ("settings", "api_key")
    assert columns.parse_column("app.settings.api_key") == ("app.settings", "api_key")
    for bad in ("api_key", "a.b.c.d", 'settings.api_key"--', "settings.api key", "1x.y"):
        with pytest.raises(InvalidInput):
            columns.parse_column(bad)
    col = columns.ManagedColumn(
        "app.settings", "api_key", "id", "provider", None, "app.settings.api_key:{pk}"
    )
    assert col.context(42) == "app.settings.api_key:42"
    assert '"app"."settings"' in col.index_sql() and "split_part(\"api_key\", ':', 2)" in col.index_sql()
    target = col.target()
    assert target.name == "app.settings.api_key" and target.context(7, ()) == "app.settings.api_key:7"
    assert target.covers("openai") and target.covers("anthropic")
    select = target.sql.select(after=True, upper=True, skip_locked=False)
    assert "(SELECT name FROM key_scopes WHERE id = $1::bigint)" in select
