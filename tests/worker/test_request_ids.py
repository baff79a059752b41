"""Request ids travel with the work: a caller's correlation id is recorded on the run it opens or
joins, every log event of the run's jobs (driver and range jobs, in a real `keyrotor worker`)
carries it, and so do the run's audit events. An invalid id is refused, with nothing written.
"""

from __future__ import annotations

import asyncio
import json
import random
import secrets
import string
import time
import uuid
from functools import partial
from pathlib import Path
from typing import Any

import pytest
import redis.asyncio as aioredis

from keyrotor import KeyManager, Settings, runs
from keyrotor.census import columns
from keyrotor.queue.client import KeyrotorClient
from keyrotor.runs import InvalidRequestId
from keyrotor.store import db
from keyrotor.worker.logs import Redactor
from tests.conftest import MASTER_KEY
from tests.legacy_helpers import legacy_rows
from tests.rotation_helpers import (
    WORKER_REDIS_URL,
    WorkerProcess,
    check_values,
    fetch,
    keyrotor,
    run_burst_worker,
    seed,
)

SCOPE = "tenant-9/openai"
CREATOR = "checkout-api:7f3a/req-0001"
JOINER = "billing@eu-1.req_42"
RETIRER = "ops:retire-1"


async def audit(database_url: str, event_type: str) -> list[dict[str, Any]]:
    rows = await fetch(
        database_url,
        "SELECT success, metadata FROM encryption_audit_log WHERE event_type = $1 ORDER BY id",
        event_type,
    )
    return [{"success": r["success"], **json.loads(r["metadata"])} for r in rows]


async def queued_keys(queue: str) -> list[bytes]:
    client: Any = aioredis.Redis.from_url(WORKER_REDIS_URL)
    try:
        return [k async for k in client.scan_iter(match=f"*{queue}*", count=1000)]
    finally:
        await client.aclose()


async def test_a_fanned_out_rotation_carries_its_requesters_ids_on_every_job_event_and_audit_event(
    wenv: dict[str, str], workers: list[WorkerProcess], tmp_path: Path
) -> None:
    env = {
        **wenv,
        "KEYROTOR_LOG_LEVEL": "DEBUG",
        # 40 rows in two id ranges of 20 (batches of 10): a driver job and two range jobs.
        "KEYROTOR_SMALL_SCOPE_ROWS": "10",
        "KEYROTOR_REENCRYPT_RANGE_ROWS": "20",
        "KEYROTOR_REENCRYPT_BATCH_ROWS": "10",
    }
    settings = Settings.from_env(env)
    values = await seed(settings, SCOPE, 40)

    async with KeyrotorClient(settings) as client:
        # Requested before any worker runs, so the second enqueuer joins the open run.
        handle = await client.rotate(SCOPE, request_id=CREATOR)
        assert handle.created
        joined = keyrotor("rotate", SCOPE, "--request-id", JOINER, "--json", env=env)
        assert joined.returncode == 0, joined.stderr
        doc = json.loads(joined.stdout)
        assert doc["id"] == handle.run_id and doc["joined"]
        assert doc["detail"]["request_ids"] == [CREATOR, JOINER]
        again = await client.rotate(SCOPE, request_id=CREATOR)  # the same caller again: once
        assert again.run_id == handle.run_id and not again.created
        assert (await handle.status()).request_ids == [CREATOR, JOINER]

        worker = WorkerProcess(env, tmp_path / "worker.log")
        workers.append(worker)
        await worker.wait_started()
        run = await handle.result(timeout_s=60)
        assert run.rows_done == 40 and run.request_ids == [CREATOR, JOINER]
        assert await check_values(settings, SCOPE, values) == {2: 40}

        # A retirement requested by a third caller carries only that caller's id.
        retired = await client.retire(SCOPE, 1, force_now=True, request_id=RETIRER)
        assert (await retired.result(timeout_s=60)).request_ids == [RETIRER]
        # The run is read as done at its announcement, which comes before the job's last log
        # line: stopped at once, the worker may cancel the job before it logs.
        deadline = time.monotonic() + 30
        while not any(e.get("event") == "dek_retired" for e in worker.events()):
            assert time.monotonic() < deadline, "the retirement job never logged dek_retired"
            await asyncio.sleep(0.1)
    assert worker.terminate() == 0

    events = worker.events()
    rotation_jobs = [e for e in events if e.get("job") in ("rotate_dek", "reencrypt_range")]
    assert {e["job"] for e in rotation_jobs} == {"rotate_dek", "reencrypt_range"}
    # The driver and each of the two range jobs (ids name the range, never the request).
    job_ids = {e["job_id"] for e in rotation_jobs}
    assert len(job_ids) == 3, job_ids
    assert not any(CREATOR in j or JOINER in j for j in job_ids)
    for event in rotation_jobs:
        assert event["request_id"] == CREATOR, event
        assert event["request_ids"] == [CREATOR, JOINER], event
        assert event["run_id"] == run.id, event
    kinds = {e["event"] for e in rotation_jobs}
    assert {"dek_pending", "rotation_fanned_out", "batch_reencrypted", "rotation_completed"} <= kinds
    retire_events = [e for e in events if e.get("job") == "retire_dek"]
    assert retire_events and all(e["request_id"] == RETIRER for e in retire_events)
    assert all("request_ids" not in e for e in retire_events)
    assert MASTER_KEY not in worker.output()

    (rotate,) = await audit(settings.database_url, "rotate")
    assert rotate["success"] and rotate["run_id"] == run.id
    assert (rotate["request_id"], rotate["request_ids"]) == (CREATOR, [CREATOR, JOINER])
    (retire,) = await audit(settings.database_url, "retire")
    assert retire["request_id"] == RETIRER and "request_ids" not in retire

    listed = keyrotor("runs", "--json", env=env)
    assert listed.returncode == 0, listed.stderr
    by_id = {r["id"]: r for r in json.loads(listed.stdout)["runs"]}
    assert by_id[run.id]["detail"]["request_ids"] == [CREATOR, JOINER]
    assert by_id[retired.run_id]["detail"]["request_ids"] == [RETIRER]
    # ... and each requester finds its own runs by its id, joiners included.
    for rid, expected in ((CREATOR, [run.id]), (JOINER, [run.id]), (RETIRER, [retired.run_id])):
        mine = keyrotor("runs", "--json", "--request-id", rid, env=env)
        assert mine.returncode == 0, mine.stderr
        assert [r["id"] for r in json.loads(mine.stdout)["runs"]] == expected
    async with KeyrotorClient(settings) as client:
        assert [r.id for r in await client.runs(request_id=JOINER)] == [run.id]
        assert await client.runs(request_id="nobody-asked") == []
    bad = keyrotor("runs", "--request-id", "sk-proj-" + "Ab1" * 12, env=env)
    assert bad.returncode == 2 and len(bad.stderr.strip().splitlines()) == 1


async def test_a_fanned_out_legacy_migration_carries_its_request_id_on_every_job_event(
    wenv: dict[str, str], workers: list[WorkerProcess], tmp_path: Path
) -> None:
    env = {
        **wenv,
        "KEYROTOR_LEGACY_BATCH_ROWS": "4",
        "KEYROTOR_LEGACY_WORKERS": "1",
        "KEYROTOR_LEGACY_RANGE_ROWS": "8",
    }
    settings = Settings.from_env(env)
    rows = legacy_rows()[:24]
    await fetch(
        settings.database_url,
        "CREATE TABLE settings (id bigserial PRIMARY KEY, provider text NOT NULL, api_key text)",
    )
    await fetch(
        settings.database_url,
        "INSERT INTO settings (provider, api_key) SELECT * FROM unnest($1::text[], $2::text[])",
        [r[0] for r in rows],
        [r[2] for r in rows],
    )
    async with KeyManager(settings.model_copy(update={"listen_key_changes": False})) as km:
        await columns.register(km.sessions, "settings.api_key", pk="id", scope_column="provider")
    worker = WorkerProcess(env, tmp_path / "worker.log")
    workers.append(worker)
    await worker.wait_started()
    out = keyrotor("legacy", "migrate", "--request-id", "migrations/legacy@2", "--wait", "--json", env=env)
    assert out.returncode == 0, out.stderr + worker.output()[-2000:]
    doc = json.loads(out.stdout)
    assert doc["state"] == "completed" and doc["migrated"] == 24
    assert worker.terminate() == 0

    jobs = [e for e in worker.events() if e.get("job") in ("migrate_legacy", "migrate_legacy_range")]
    assert {e["job"] for e in jobs} == {"migrate_legacy", "migrate_legacy_range"}
    assert len({e["job_id"] for e in jobs if e["job"] == "migrate_legacy_range"}) == 3  # 24 values, 8 a range
    assert all(e["request_id"] == "migrations/legacy@2" for e in jobs), jobs
    (run,) = await fetch(settings.database_url, "SELECT detail FROM rotations WHERE id = $1", doc["run_id"])
    assert json.loads(run["detail"])["request_ids"] == ["migrations/legacy@2"]


async def test_kek_rotation_and_a_failed_rotation_audit_their_request_id(wenv: dict[str, str]) -> None:
    await seed(Settings.from_env(wenv), "openai", 5)
    await seed(Settings.from_env(wenv), SCOPE, 5)
    # A new master key version: the KEK rotation has every DEK to rewrap.
    settings = Settings.from_env(
        {
            **wenv,
            "ENCRYPTION_KEY": "request-id-test-master-key-v2-8e1f0c3b5a7d",
            "ENCRYPTION_KEY_VERSION": "2",
            "ENCRYPTION_KEYS_PREVIOUS": json.dumps({"1": MASTER_KEY}),
        }
    )
    rows = await fetch(settings.database_url, "SELECT id, ciphertext FROM secrets ORDER BY id LIMIT 2")
    # A value copied into another row does not decrypt there (its AAD names its row).
    await fetch(
        settings.database_url,
        "UPDATE secrets SET ciphertext = $2 WHERE id = $1",
        rows[1]["id"],
        rows[0]["ciphertext"],
    )
    async with KeyrotorClient(settings) as client:
        kek = await client.rotate_kek(request_id="kek-req-1")
        await run_burst_worker(settings)
        assert (await kek.result(timeout_s=5)).state == "completed"
        failing = await client.rotate("openai", request_id="fail-req-1")
        await run_burst_worker(settings)
        assert (await failing.wait(timeout_s=5)).state == "failed"
    rewraps = await audit(settings.database_url, "rewrap")
    assert len(rewraps) == 2  # one DEK a scope
    assert all(r["request_id"] == "kek-req-1" and r["run_id"] == kek.run_id for r in rewraps)
    (failed,) = await audit(settings.database_url, "rotate")
    assert not failed["success"] and failed["request_id"] == "fail-req-1"


BAD_IDS = [
    "",
    "x" * 129,
    "has space",
    "line\nlevel=error forged=1",
    'quote"d',
    "key=value",
    "sk-ant-api03-" + "Ab9" * 20,  # a key pasted by mistake is refused, not logged
    "ünïcode",
]


@pytest.mark.parametrize("bad", BAD_IDS, ids=range(len(BAD_IDS)))
async def test_an_invalid_request_id_is_refused_by_the_client_with_nothing_written(
    wenv: dict[str, str], bad: str
) -> None:
    settings = Settings.from_env(wenv)
    await seed(settings, SCOPE, 3)
    async with KeyrotorClient(settings) as client:
        for ask in (
            partial(client.rotate, SCOPE, request_id=bad),
            partial(client.rotate_kek, request_id=bad),
            partial(client.retire, SCOPE, 1, force_now=True, request_id=bad),
        ):
            with pytest.raises(InvalidRequestId) as caught:
                await ask()
            message = str(caught.value)
            assert "1 to 128 characters of letters, digits and . _ : / @ -" in message
            assert "\n" not in message and (len(bad) < 3 or bad not in message)
            assert "sk-ant" not in message and "x" * 20 not in message
        # Joining an open run with a bad id changes nothing either.
        handle = await client.rotate(SCOPE, request_id="good-1")
        with pytest.raises(InvalidRequestId):
            await client.rotate(SCOPE, request_id=bad)
        assert (await handle.status()).request_ids == ["good-1"]
    assert len(await fetch(settings.database_url, "SELECT id FROM rotations")) == 1


async def test_an_invalid_request_id_is_refused_by_the_cli_in_one_line_with_nothing_written(
    wenv: dict[str, str],
) -> None:
    settings = Settings.from_env(wenv)
    await seed(settings, SCOPE, 3)
    bad = "req 1\nlevel=error"
    for args in (
        ("rotate", SCOPE),
        ("rotate-kek",),
        ("retire", SCOPE, "1", "--force-now"),
        ("kek", "migrate", "--to", "vault"),
        ("legacy", "migrate"),
    ):
        done = keyrotor(*args, "--request-id", bad, "--json", env=wenv)
        assert done.returncode == 2, (args, done.stdout, done.stderr)
        assert done.stdout == ""
        lines = done.stderr.splitlines()
        assert len(lines) == 1 and lines[0].startswith("keyrotor: error: invalid request id"), done.stderr
        assert "req 1" not in done.stderr
    assert await fetch(settings.database_url, "SELECT id FROM rotations") == []
    assert await queued_keys(wenv["KEYROTOR_QUEUE_NAME"]) == []


async def test_request_ids_are_kept_once_each_and_at_most_twenty(settings: Settings) -> None:
    await seed(settings, SCOPE, 1)
    engine = db.create_engine(settings.database_url, pool_size=2)
    try:
        sessions = db.sessionmaker(engine)
        sid = (await fetch(settings.database_url, "SELECT id FROM key_scopes WHERE name = $1", SCOPE))[0][0]
        for n, i in enumerate([0, 1, 0, *range(2, 30)]):
            async with db.transaction(sessions) as session:
                run, created = await runs.open_run(session, "dek", sid, trigger="api", request_id=f"r-{i}")
            assert created == (n == 0)
        async with db.transaction(sessions) as session:
            # Without an id, a joiner records nothing (and does not lock the run row).
            run, created = await runs.open_run(session, "dek", sid, trigger="schedule")
        assert not created
        assert run.request_ids == [f"r-{i}" for i in range(runs.MAX_REQUEST_IDS)]
        assert runs.request_context(run.request_ids)["request_id"] == "r-0"
        async with db.transaction(sessions) as session:
            assert await runs.request_ids_of(session, run.id) == run.request_ids
            assert await runs.request_ids_of(session, run.id + 1000) == []
    finally:
        await engine.dispose()
    # A row edited by hand never gets an invalid id into a log line.
    assert runs.request_context(["ok-1", "bad id\n"]) == {"request_id": "ok-1"}
    assert runs.request_context([]) == {}


def _sample_ids(n: int) -> list[str]:
    rng = random.Random(8)
    alphabet = string.ascii_letters + string.digits + "._:/@-"
    shapes = [
        str(uuid.UUID(int=rng.getrandbits(128))),  # dashed: short runs, accepted
        uuid.UUID(int=rng.getrandbits(128)).hex,  # a 32-hex trace id: a log would blank it
        "checkout:" + secrets.token_urlsafe(24),
        "sk-ant-api03-" + secrets.token_urlsafe(40),
        "AIza" + secrets.token_urlsafe(30),
        "https://user:pw@host/x",
        "kr1:2:" + secrets.token_urlsafe(20),
        "task-runner/" + "a" * 40,
    ]
    out = list(shapes)
    for _ in range(n):
        size = rng.choice([rng.randint(1, 31), rng.randint(32, 128)])
        out.append("".join(rng.choice(alphabet) for _ in range(size)))
    return out


def test_an_id_is_accepted_exactly_when_the_log_redaction_would_leave_it_whole() -> None:
    redactor = Redactor()
    accepted = refused = 0
    for value in _sample_ids(3000):
        try:
            runs.check_request_id(value)
        except InvalidRequestId as exc:
            refused += 1
            assert redactor.redact(value) != value, value
            assert value not in str(exc)
        else:
            accepted += 1
            assert redactor.redact(value) == value, value
    assert accepted > 500 and refused > 500
