"""Dry runs count the rows of the application's registered columns, not only keyrotor's own
``secrets``: a new user following the README keeps its values in its own table, and
``rotate --dry-run`` must not tell them there is nothing to re-encrypt."""

from __future__ import annotations

import json

from keyrotor import Settings
from tests.app_columns import ROWS, register_both, users_and_tenants
from tests.rotation_helpers import keyrotor
from tests.scheduler.conftest import sql


async def test_dry_runs_count_the_registered_columns(senv: dict[str, str]) -> None:
    await users_and_tenants(Settings.from_env(senv))
    register_both(senv)

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
