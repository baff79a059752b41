"""A column unregistered while a fanned-out rotation runs: the run still ends, nothing is lost."""

from __future__ import annotations

import json

from keyrotor import KeyManager
from keyrotor.queue.client import KeyrotorClient
from keyrotor.queue.enqueue import connect_queue, enqueue_range
from keyrotor.rotation import dek as rotation
from keyrotor.rotation.context import RotationContext
from keyrotor.rotation.retire import LocationNotCovered
from tests.jobs.conftest import settings_of
from tests.rotation_helpers import check_values, fetch, keyrotor, run_burst_worker, seed

SCOPE = "openai"
KEYS = [-5, 1, 2, 3, 40, 41]


async def test_a_range_of_a_column_unregistered_meanwhile_is_skipped_and_the_run_completes(
    wenv: dict[str, str],
) -> None:
    env = {**wenv, "KEYROTOR_SMALL_SCOPE_ROWS": "1", "KEYROTOR_REENCRYPT_RANGE_ROWS": "3"}
    s = settings_of(env).model_copy(update={"listen_key_changes": False})
    values = await seed(s, SCOPE, 6)
    await fetch(s.database_url, "CREATE TABLE ends (id bigint PRIMARY KEY, api_key text)")
    cli = keyrotor("columns", "register", "ends.api_key", "--pk", "id", "--scope", SCOPE, env=env)
    assert cli.returncode == 0, cli.stderr
    async with KeyManager(s) as km:
        for k in KEYS:
            token = await km.encrypt(SCOPE, f"sk-col-{k}", context=f"ends.api_key:{k}")
            await fetch(s.database_url, "INSERT INTO ends VALUES ($1, $2)", k, token)
        # The driver plans the ranges of both targets (as the rotate_dek job does) ...
        rc = RotationContext(km.sessions, km.kek, s)
        progress = await rotation.rotate_dek(rc, SCOPE)
    run_id = progress.run.id
    assert {r.target for r in progress.ranges} == {"secrets", "ends.api_key"}
    # ... then the column is unregistered before its ranges run on a worker.
    cli = keyrotor("columns", "unregister", "ends.api_key", env=env)
    assert cli.returncode == 0, cli.stderr
    redis = await connect_queue(s)
    try:
        for r in progress.ranges:
            assert await enqueue_range(redis, s, r)
    finally:
        await redis.aclose()
    worker = await run_burst_worker(s)
    assert worker.jobs_failed == 0

    run = (
        await fetch(
            s.database_url, "SELECT state, rows_done, rows_total, detail FROM rotations WHERE id = $1", run_id
        )
    )[0]
    assert run["state"] == "completed", run
    assert run["rows_done"] == len(values)  # the secrets; the unregistered column's rows are not counted
    # Nor are they in the run's total: `runs` and `status` show a completed run as done, not 6/12.
    assert run["rows_total"] == len(values), run
    detail = json.loads(run["detail"])
    assert detail["registered_columns"] == detail["skipped_columns"] == ["ends.api_key"]
    (event,) = await fetch(
        s.database_url, "SELECT metadata FROM encryption_audit_log WHERE event_type = 'rotate' AND success"
    )
    assert json.loads(event["metadata"])["skipped_columns"] == ["ends.api_key"]
    assert await fetch(s.database_url, "SELECT count(*) FROM rotation_ranges WHERE state <> 'done'") == [(0,)]
    # Every value still decrypts: the column's rows stay on v1, in grace.
    assert await check_values(s, SCOPE, values) == {2: 6}
    rows = await fetch(s.database_url, "SELECT id, api_key FROM ends ORDER BY id")
    assert [r["api_key"].split(":")[1] for r in rows] == ["1"] * len(KEYS)
    async with KeyManager(s) as km:
        for r in rows:
            assert (
                await km.decrypt(SCOPE, r["api_key"], context=f"ends.api_key:{r['id']}")
                == f"sk-col-{r['id']}"
            )
    async with KeyrotorClient(s) as client:
        # Retirement does not count the column's values as gone: it refuses, naming the location.
        try:
            await client.retire(SCOPE, 1, force_now=True)
        except LocationNotCovered as exc:
            assert "ends.api_key" in str(exc)
        else:
            raise AssertionError("v1 was retired with values of an unregistered column on it")
        # A later rotation opens a run of its own; it does not join the one above.
        handle = await client.rotate(SCOPE)
        assert handle.created and handle.run_id != run_id
    key = await fetch(
        s.database_url,
        "SELECT d.state FROM data_keys d JOIN key_scopes k ON k.id = d.scope_id "
        "WHERE k.name = $1 AND d.version = 1",
        SCOPE,
    )
    assert key == [("grace",)]
