"""``columns unregister`` of a column whose values are still on an old DEK version: the
retirement of that version must then refuse (the location is no longer counted by anyone)."""

from __future__ import annotations

import pytest

from keyrotor import KeyManager
from keyrotor.census import columns
from keyrotor.rotation import dek as rotation
from keyrotor.rotation import retire
from keyrotor.rotation.context import RotationContext
from keyrotor.rotation.retire import LocationNotCovered
from tests.jobs.conftest import settings_of
from tests.rotation_helpers import fetch

SCOPE = "openai"
COLUMN = "app_keys.api_key"


async def test_retirement_refuses_a_version_left_in_an_unregistered_column(wenv: dict[str, str]) -> None:
    s = settings_of(wenv, KEYROTOR_LISTEN_KEY_CHANGES="false")
    await fetch(s.database_url, "CREATE TABLE app_keys (id bigint PRIMARY KEY, api_key text)")
    async with KeyManager(s) as km:
        rc = RotationContext(km.sessions, km.kek, s)
        await columns.register(km.sessions, COLUMN, pk="id", scope=SCOPE)
        token = await km.encrypt(SCOPE, "sk-row-1", context=f"{COLUMN}:1")
        await fetch(s.database_url, "INSERT INTO app_keys VALUES (1, $1)", token)
        await columns.unregister(km.sessions, COLUMN)
        await rotation.rotate_dek(rc, SCOPE)  # the column is no target now: row 1 stays on v1
        with pytest.raises(LocationNotCovered, match=COLUMN):
            await retire.retire_dek(rc, SCOPE, 1, force_now=True)
        km.invalidate()
        assert await km.decrypt(SCOPE, token, context=f"{COLUMN}:1") == "sk-row-1"
