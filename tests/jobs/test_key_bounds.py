"""Registered columns whose keys sit at the very ends of their type: rotated like any other row."""

from __future__ import annotations

from pathlib import Path

import pytest

from keyrotor import KeyManager
from keyrotor.census import columns
from keyrotor.legacy import migration as legacy_migration
from keyrotor.legacy import ranges as legacy_ranges
from keyrotor.queue.client import KeyrotorClient
from tests.jobs.conftest import settings_of
from tests.legacy_helpers import legacy_rows
from tests.rotation_helpers import WorkerProcess, fetch, keyrotor

SCOPE = "openai"


@pytest.mark.parametrize(
    ("pk_type", "keys"),
    [
        ("bigint", [-(2**63), -1, 0, 2**63 - 1]),
        ("int", [-(2**31), 2**31 - 1]),
        ("smallint", [-(2**15), 2**15 - 1]),
    ],
)
@pytest.mark.parametrize("small_scope_rows", ["1000", "1"])
async def test_keys_at_the_ends_of_their_type_are_rotated(
    wenv: dict[str, str], tmp_path: Path, pk_type: str, keys: list[int], small_scope_rows: str
) -> None:
    env = {**wenv, "KEYROTOR_SMALL_SCOPE_ROWS": small_scope_rows, "KEYROTOR_REENCRYPT_RANGE_ROWS": "1"}
    s = settings_of(env)
    await fetch(s.database_url, f"CREATE TABLE ends (id {pk_type} PRIMARY KEY, api_key text)")
    cli = keyrotor("columns", "register", "ends.api_key", "--pk", "id", "--scope", SCOPE, env=env)
    assert cli.returncode == 0, cli.stderr
    async with KeyManager(s) as km:
        for k in keys:
            token = await km.encrypt(SCOPE, f"sk-end-{k}", context=f"ends.api_key:{k}")
            await fetch(s.database_url, "INSERT INTO ends VALUES ($1, $2)", k, token)
    proc = WorkerProcess(env, tmp_path / "worker.log")
    try:
        await proc.wait_started()
        async with KeyrotorClient(s) as client:
            run = await (await client.rotate(SCOPE)).result(timeout_s=60)
        assert run.state == "completed", run
    finally:
        proc.close()
    rows = await fetch(s.database_url, "SELECT id, api_key FROM ends ORDER BY id")
    assert [r["api_key"].split(":")[1] for r in rows] == ["2"] * len(keys), rows
    async with KeyManager(s) as km:
        for r in rows:
            assert (
                await km.decrypt(SCOPE, r["api_key"], context=f"ends.api_key:{r['id']}")
                == f"sk-end-{r['id']}"
            )


async def test_legacy_ranges_at_the_ends_of_bigint_are_migrated(wenv: dict[str, str]) -> None:
    """A fanned-out legacy migration plans a range starting at -2**63 and one ending at 2**63-1."""
    s = settings_of(wenv).model_copy(update={"listen_key_changes": False})
    keys = [-(2**63), -(2**63) + 1, -1, 0, 2**63 - 2, 2**63 - 1]
    rows = legacy_rows()[: len(keys)]
    await fetch(s.database_url, "CREATE TABLE ends (id bigint PRIMARY KEY, provider text, api_key text)")
    for k, (provider, _plain, value) in zip(keys, rows, strict=True):
        await fetch(s.database_url, "INSERT INTO ends VALUES ($1, $2, $3)", k, provider, value)
    async with KeyManager(s) as km:
        await columns.register(km.sessions, "ends.api_key", pk="id", scope_column="provider")
        run, _ = await legacy_migration.open_legacy_run(km, trigger="test")
        plan = await legacy_ranges.fan_out(km, run.id, range_rows=1)
        assert plan is not None and len(plan.ranges) == len(keys)
        assert plan.ranges[0].lo == -(2**63) and plan.ranges[-1].hi == 2**63 - 1
        outcomes = [
            await legacy_ranges.migrate_range(km, r.run_id, r.target, r.lo, r.hi, workers=1)
            for r in plan.ranges
        ]
        assert [o.migrated for o in outcomes] == [1] * len(keys)
        assert sum(o.completed_run for o in outcomes) == 1
        stored = await fetch(s.database_url, "SELECT id, provider, api_key FROM ends ORDER BY id")
        assert [r["id"] for r in stored] == keys
        for r, (_provider, plain, _value) in zip(stored, rows, strict=True):
            assert r["api_key"].startswith("kr1:"), r["id"]
            assert await km.decrypt(r["provider"], r["api_key"], context=f"ends.api_key:{r['id']}") == plain
