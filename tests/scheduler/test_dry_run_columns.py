"""Dry runs count the rows of the application's registered columns, not only keyrotor's own
``secrets``: a new user following the README keeps its values in its own table, and
``rotate --dry-run`` must not tell them there is nothing to re-encrypt."""

from __future__ import annotations

import json

import asyncpg

from keyrotor import KeyManager, Settings
from tests.rotation_helpers import keyrotor
from tests.scheduler.conftest import sql

ROWS = 12


async def _users_and_tenants(settings: Settings) -> None:
    """``users.api_key`` (every row in ``anthropic``) and ``tenant_keys.value`` (the scope named by
    each row), with values sealed the README's way, plus one secret of keyrotor's own."""
    conn = await asyncpg.connect(settings.database_url)
    try:
        await conn.execute("CREATE TABLE users (id serial PRIMARY KEY, api_key text)")
        await conn.execute("CREATE TABLE tenant_keys (id uuid PRIMARY KEY, provider text, value text)")
        async with KeyManager(settings) as km:
            for i in range(1, ROWS + 1):
                token = await km.encrypt("anthropic", f"sk-ant-{i}", context=f"users.api_key:{i}")
                await conn.execute("INSERT INTO users (id, api_key) VALUES ($1, $2)", i, token)
            for i in range(3):
                pk = await conn.fetchval("SELECT gen_random_uuid()")
                scope = "anthropic" if i < 2 else "openai"
                token = await km.encrypt(scope, f"sk-{i}", context=f"tenant_keys.value:{pk}")
                await conn.execute("INSERT INTO tenant_keys VALUES ($1, $2, $3)", pk, scope, token)
            await km.put_secret("anthropic", "prod", "sk-ant-own")
    finally:
        await conn.close()


async def test_dry_runs_count_the_registered_columns(senv: dict[str, str]) -> None:
    await _users_and_tenants(Settings.from_env(senv))
    for args in (
        ("users.api_key", "--pk", "id", "--scope", "anthropic"),
        ("tenant_keys.value", "--pk", "id", "--scope-column", "provider"),
    ):
        res = keyrotor("columns", "register", *args, env=senv)
        assert res.returncode == 0, res.stderr

    res = keyrotor("rotate", "anthropic", "--dry-run", "--json", env=senv)
    assert res.returncode == 0, res.stderr
    plan = json.loads(res.stdout)
    # 12 users, 2 tenant rows of anthropic, 1 secret; openai's tenant row is not anthropic's.
    assert plan["rows_by_version"] == {"1": ROWS + 2 + 1} and plan["rows_total"] == ROWS + 3
    res = keyrotor("rotate", "openai", "--dry-run", "--json", env=senv)
    assert res.returncode == 0 and json.loads(res.stdout)["rows_by_version"] == {"1": 1}, res.stderr

    # The scheduler's dry run counts the same rows for a due scope.
    await sql(senv["DATABASE_URL"], "UPDATE key_scopes SET next_rotation_at = now() - interval '1 day'")
    res = keyrotor("scheduler", "--once", "--dry-run", "--json", env=senv)
    assert res.returncode == 0, res.stderr
    rows = {p["scope"]: p["rows_by_version"] for p in json.loads(res.stdout)["rotations"]}
    assert rows == {"anthropic": {"1": ROWS + 3}, "openai": {"1": 1}}
