"""Registered columns whose keys sit at the very ends of their type: rotated like any other row."""

from __future__ import annotations

from pathlib import Path

import pytest

from keyrotor import KeyManager
from keyrotor.queue.client import KeyrotorClient
from tests.jobs.conftest import settings_of
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
    if pk_type == "bigint" and small_scope_rows == "1":
        pytest.xfail("a fanned-out range starting at -2**63 stores its cursor lo - 1: out of bigint range")
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
