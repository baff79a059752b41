"""``keyrotor status`` counts the registered application columns in a scope's rows: a README
user keeps its values in its own table, and a "rows by version" of ``v1: 0`` told them the
scope held nothing. ``--json`` keeps ``rows_by_version`` (keyrotor's ``secrets`` only) and adds
the columns' figures beside it."""

from __future__ import annotations

import json

import asyncpg

from keyrotor import KeyManager, Settings
from tests.cli_helpers import keyrotor

ROWS = 12


async def _users_and_tenants(settings: Settings) -> None:
    """``users.api_key`` (every row in ``anthropic``) and ``tenant_keys.value`` (the scope named by
    each row), plus one secret of keyrotor's own in ``anthropic``."""
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


async def test_status_counts_the_registered_columns(env: dict[str, str]) -> None:
    await _users_and_tenants(Settings.from_env(env))
    for args in (
        ("users.api_key", "--pk", "id", "--scope", "anthropic"),
        ("tenant_keys.value", "--pk", "id", "--scope-column", "provider"),
    ):
        res = keyrotor("columns", "register", *args, env=env)
        assert res.returncode == 0, res.stderr

    res = keyrotor("status", "--json", env=env)
    assert res.returncode == 0, res.stderr
    doc = json.loads(res.stdout)
    scopes = {s["scope"]: s for s in doc["scopes"]}
    # Unchanged for scripts: keyrotor's own secrets table.
    assert scopes["anthropic"]["rows_by_version"] == {"1": 1} and scopes["anthropic"]["rows_total"] == 1
    assert scopes["openai"]["rows_by_version"] == {"1": 0}
    # Added: the registered columns, and everything together.
    assert scopes["anthropic"]["column_rows_by_version"] == {"1": ROWS + 2}
    assert scopes["anthropic"]["all_rows_by_version"] == {"1": ROWS + 3}
    assert scopes["anthropic"]["all_rows_total"] == ROWS + 3
    assert scopes["openai"]["column_rows_by_version"] == {"1": 1}
    assert scopes["openai"]["all_rows_by_version"] == {"1": 1} and scopes["openai"]["all_rows_total"] == 1
    # The columns' own entries are as they were (no per-scope breakdown added to them).
    assert {c["column"]: c["rows_by_version"] for c in doc["columns"]} == {
        "users.api_key": {"1": ROWS},
        "tenant_keys.value": {"1": 3},
    }
    one = json.loads(keyrotor("status", "openai", "--json", env=env).stdout)["scopes"]
    assert [s["all_rows_by_version"] for s in one] == [{"1": 1}]

    # What a user reads first, the scopes table, counts every row of the scope.
    table = keyrotor("status", env={**env, "COLUMNS": "250"})
    assert table.returncode == 0, table.stderr
    line = next(x for x in table.stdout.splitlines() if "anthropic" in x)
    assert f"v1: {ROWS + 3}" in line, table.stdout
    assert "secrets + columns" in table.stdout, table.stdout
