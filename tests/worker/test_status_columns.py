"""``keyrotor status`` counts the registered application columns in a scope's rows: a README
user keeps its values in its own table, and a "rows by version" of ``v1: 0`` told them the
scope held nothing. ``--json`` keeps ``rows_by_version`` (keyrotor's ``secrets`` only) and adds
the columns' figures beside it."""

from __future__ import annotations

import json

from keyrotor import Settings
from tests.app_columns import ROWS, register_both, users_and_tenants
from tests.cli_helpers import keyrotor


async def test_status_counts_the_registered_columns(env: dict[str, str]) -> None:
    await users_and_tenants(Settings.from_env(env))
    register_both(env)

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
