"""Rotation covers application-owned ciphertext columns registered as targets, like `secrets`."""

from __future__ import annotations

from typing import Any

import pytest

from keyrotor import KeyManager
from keyrotor.errors import ConfigurationError
from keyrotor.rotation import dek as rotation
from keyrotor.rotation.context import RotationContext
from keyrotor.rotation.reencrypt import SECRETS, Target
from tests.jobs.conftest import settings_of
from tests.rotation_helpers import check_values, fetch, seed


def _settings_context(row_id: int, _extra: tuple[Any, ...]) -> str:
    return f"settings.api_key:{row_id}"


API_KEYS = Target(
    name="settings.api_key",
    table="app_settings",
    id_column="id",
    value_column="api_key",
    context=_settings_context,
    scope="openai",  # every row of the column belongs to one scope; no version column
)


@pytest.mark.parametrize("small", ["1000", "10"])  # one transaction, and fanned out in ranges
async def test_rotation_reencrypts_a_registered_application_column(wenv: dict[str, str], small: str) -> None:
    s = settings_of(wenv, KEYROTOR_SMALL_SCOPE_ROWS=small, KEYROTOR_REENCRYPT_RANGE_ROWS="70")
    secrets = await seed(s, "openai", 40)
    await fetch(s.database_url, "CREATE TABLE app_settings (id bigserial PRIMARY KEY, api_key text)")
    ids = [
        r[0]
        for r in await fetch(
            s.database_url, "INSERT INTO app_settings SELECT FROM generate_series(1, 150) RETURNING id"
        )
    ]
    plain = {i: f"sk-proj-app-{i:04d}" for i in ids}
    quiet = s.model_copy(update={"listen_key_changes": False})
    async with KeyManager(quiet) as km:
        for i in ids:
            token = await km.encrypt("openai", plain[i], context=f"settings.api_key:{i}")
            await fetch(s.database_url, "UPDATE app_settings SET api_key = $2 WHERE id = $1", i, token)
        rc = RotationContext(km.sessions, km.kek, s, targets=[SECRETS, API_KEYS])
        progress = await rotation.rotate_dek(rc, "openai")
        for r in progress.ranges:
            await rotation.reencrypt_range(rc, r.run_id, r.lo, r.hi, target=r.target)
        run = (await fetch(s.database_url, "SELECT * FROM rotations"))[0]
        assert run["state"] == "completed" and run["rows_done"] == 190
        if small == "10":
            targets = {r["target"] for r in await fetch(s.database_url, "SELECT target FROM rotation_ranges")}
            assert targets == {"secrets", "settings.api_key"}
        for i, token in await fetch(s.database_url, "SELECT id, api_key FROM app_settings"):
            assert token.startswith("kr1:2:")
            assert await km.decrypt("openai", token, context=f"settings.api_key:{i}") == plain[i]
    assert await check_values(s, "openai", secrets) == {2: 40}


def test_targets_refuse_what_is_not_a_plain_identifier() -> None:
    with pytest.raises(ConfigurationError, match="identifier"):
        Target("x", "app; DROP TABLE secrets", "id", "v", _settings_context, scope="openai")
    with pytest.raises(ConfigurationError, match="exactly one"):
        Target("x", "app", "id", "v", _settings_context)
