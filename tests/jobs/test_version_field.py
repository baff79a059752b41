"""A registered column's value whose version field is not canonical (``kr1:01:...``).

Such a value never decrypts (the envelope refuses a version with a leading zero). Every statement
of a rotation must agree on which version it is on -- none -- or a range keeps finding a row of
its version that its batches never select.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from keyrotor import KeyManager
from keyrotor.errors import MalformedCiphertext
from keyrotor.queue.client import KeyrotorClient
from tests.jobs.conftest import settings_of
from tests.rotation_helpers import WorkerProcess, fetch, keyrotor

SCOPE = "openai"
KEYS = [1, 2, 3, 4, 5, 6]
ODD = 4


async def test_a_value_with_a_leading_zero_version_does_not_hold_a_fanned_out_run(
    wenv: dict[str, str], tmp_path: Path
) -> None:
    env = {**wenv, "KEYROTOR_SMALL_SCOPE_ROWS": "1", "KEYROTOR_REENCRYPT_RANGE_ROWS": "2"}
    s = settings_of(env).model_copy(update={"listen_key_changes": False})
    await fetch(s.database_url, "CREATE TABLE ends (id bigint PRIMARY KEY, api_key text)")
    cli = keyrotor("columns", "register", "ends.api_key", "--pk", "id", "--scope", SCOPE, env=env)
    assert cli.returncode == 0, cli.stderr
    async with KeyManager(s) as km:
        for k in KEYS:
            token = await km.encrypt(SCOPE, f"sk-col-{k}", context=f"ends.api_key:{k}")
            if k == ODD:
                token = token.replace("kr1:1:", "kr1:01:", 1)
            await fetch(s.database_url, "INSERT INTO ends VALUES ($1, $2)", k, token)
        odd = (await fetch(s.database_url, "SELECT api_key FROM ends WHERE id = $1", ODD))[0][0]
        with pytest.raises(MalformedCiphertext):
            await km.decrypt(SCOPE, odd, context=f"ends.api_key:{ODD}")
    proc = WorkerProcess(env, tmp_path / "worker.log")
    try:
        await proc.wait_started()
        async with KeyrotorClient(s) as client:
            run = await (await client.rotate(SCOPE)).result(timeout_s=20)
    finally:
        proc.close()
    assert run.state == "completed", run
    assert run.rows_done == run.rows_total == len(KEYS) - 1
    rows = {r["id"]: r["api_key"] for r in await fetch(s.database_url, "SELECT id, api_key FROM ends")}
    assert rows[ODD] == odd  # left as it was: it is no value of any version
    async with KeyManager(s) as km:
        for k in KEYS:
            if k != ODD:
                assert rows[k].startswith("kr1:2:")
                assert await km.decrypt(SCOPE, rows[k], context=f"ends.api_key:{k}") == f"sk-col-{k}"
