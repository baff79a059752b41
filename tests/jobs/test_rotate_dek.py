"""DEK rotation through the real queue: in-process arq workers on the real Redis and Postgres."""

from __future__ import annotations

import asyncio
import random
from datetime import UTC, datetime, timedelta

import pytest

from keyrotor import KeyManager
from keyrotor.kek.factory import local_keyring
from keyrotor.queue.client import KeyrotorClient
from keyrotor.rotation import dek as rotation
from keyrotor.rotation.context import RotationContext
from keyrotor.runs import RunInfo
from keyrotor.store import db, repo
from tests.jobs.conftest import settings_of
from tests.rotation_helpers import check_values, fetch, run_burst_worker, seed


async def test_small_scope_rotates_in_one_transaction(wenv: dict[str, str]) -> None:
    s = settings_of(wenv)
    anthropic = await seed(s, "anthropic", 40)
    openai = await seed(s, "openai", 10)
    async with KeyrotorClient(s) as client:
        handle = await client.rotate("anthropic")
        quiet = s.model_copy(update={"listen_key_changes": False})
        async with KeyManager(quiet) as km, db.transaction(km.sessions) as session:
            before = {x["scope"]: x for x in await repo.status(session)}
        assert before["anthropic"]["run"] == {
            "id": handle.run_id,
            "state": "pending",
            "rows_done": 0,
            "rows_total": None,
        }
        assert before["openai"]["run"] is None
        await run_burst_worker(s)
        run = await handle.result(timeout_s=5)
    assert run.state == "completed" and run.detail["mode"] == "single_transaction"
    assert (run.from_version, run.to_version, run.rows_done, run.rows_total) == (1, 2, 40, 40)
    assert await check_values(s, "anthropic", anthropic) == {2: 40}
    assert await check_values(s, "openai", openai) == {1: 10}

    keys = await fetch(
        s.database_url,
        "SELECT d.version, d.state, d.grace_until, d.activated_at FROM data_keys d "
        "JOIN key_scopes k ON k.id = d.scope_id WHERE k.name = 'anthropic' ORDER BY d.version",
    )
    assert [(k["version"], k["state"]) for k in keys] == [(1, "grace"), (2, "active")]
    used = await fetch(
        s.database_url,
        "SELECT d.encryptions FROM data_keys d JOIN key_scopes k ON k.id = d.scope_id "
        "WHERE k.name = 'anthropic' AND d.version = 2",
    )
    assert used[0][0] == 40  # the rows the rotation re-encrypted
    grace = keys[0]["grace_until"] - keys[1]["activated_at"]
    assert grace == timedelta(days=7)  # the scope's grace_period_days, counted from promotion
    scope = (await fetch(s.database_url, "SELECT * FROM key_scopes WHERE name = 'anthropic'"))[0]
    assert scope["dek_rotation_count"] == 1 and scope["active_version"] == 2
    assert scope["next_rotation_at"] - scope["last_rotation_at"] == timedelta(days=scope["interval_days"])
    audit = await fetch(s.database_url, "SELECT * FROM encryption_audit_log WHERE event_type = 'rotate'")
    assert len(audit) == 1 and audit[0]["success"] and audit[0]["key_version"] == 2
    assert audit[0]["scope"] == "anthropic"


async def test_large_scope_fans_out_into_ranges(wenv: dict[str, str]) -> None:
    s = settings_of(
        wenv,
        KEYROTOR_SMALL_SCOPE_ROWS="100",
        KEYROTOR_REENCRYPT_RANGE_ROWS="400",
        KEYROTOR_REENCRYPT_BATCH_ROWS="150",
    )
    values = await seed(s, "tenant-7/openai", 2000)
    async with KeyrotorClient(s) as client:
        handle = await client.rotate("tenant-7/openai")
        worker = await run_burst_worker(s, max_jobs=4)
        run = await handle.result(timeout_s=5)
        assert worker.jobs_failed == 0
        assert run.detail == {"mode": "ranges", "ranges": 5}
        assert run.rows_done == run.rows_total == 2000
        ranges = await fetch(s.database_url, "SELECT * FROM rotation_ranges WHERE run_id = $1", run.id)
        assert len(ranges) == 5 and all(r["state"] == "done" for r in ranges)
        assert sum(r["rows_done"] for r in ranges) == 2000
        assert await check_values(s, "tenant-7/openai", values) == {2: 2000}

        # A second rotation moves every row again; v1 stays in grace, v2 joins it.
        again = await client.rotate("tenant-7/openai")
        assert again.run_id != handle.run_id
        await run_burst_worker(s, max_jobs=4)
        assert (await again.result(timeout_s=5)).to_version == 3
    assert await check_values(s, "tenant-7/openai", values) == {3: 2000}
    states = await fetch(
        s.database_url,
        "SELECT version, state FROM data_keys WHERE scope_id = $1 ORDER BY version",
        run.scope_id,
    )
    assert [tuple(r) for r in states] == [(1, "grace"), (2, "grace"), (3, "active")]
    # Re-encrypted rows count against each new DEK's encryption limit.
    usage = await fetch(
        s.database_url,
        "SELECT version, encryptions FROM data_keys WHERE scope_id = $1 ORDER BY version",
        run.scope_id,
    )
    assert [tuple(r) for r in usage][1:] == [(2, 2000), (3, 2000)]


async def test_tampered_row_fails_the_run_naming_it_and_writes_nothing_of_its_batch(
    wenv: dict[str, str],
) -> None:
    s = settings_of(
        wenv,
        KEYROTOR_SMALL_SCOPE_ROWS="100",
        KEYROTOR_REENCRYPT_RANGE_ROWS="100000",
        KEYROTOR_REENCRYPT_BATCH_ROWS="50",
    )
    values = await seed(s, "anthropic", 400)
    ids = [r["id"] for r in await fetch(s.database_url, "SELECT id FROM secrets ORDER BY id")]
    bad = ids[129]  # in the third batch (ids[100:150])
    ct = (await fetch(s.database_url, "SELECT ciphertext FROM secrets WHERE id = $1", bad))[0][0]
    flipped = ct[:-3] + ("A" if ct[-3] != "A" else "B") + ct[-2:]
    await fetch(s.database_url, "UPDATE secrets SET ciphertext = $2 WHERE id = $1", bad, flipped)
    async with KeyrotorClient(s) as client:
        handle = await client.rotate("anthropic")
        await run_burst_worker(s)
        run = await handle.wait(timeout_s=5)
    assert run.state == "failed"
    assert f"secrets row id={bad}" in (run.error or "")
    assert "sk-ant" not in (run.error or "")
    versions = await fetch(s.database_url, "SELECT id, dek_version FROM secrets ORDER BY id")
    done = [r["id"] for r in versions if r["dek_version"] == 2]
    assert done == ids[:100]  # batches 1-2 committed; the failing batch wrote nothing
    # The old DEK is in grace: every row (but the tampered one) still decrypts.
    del values[f"k{129:06d}"]
    async with KeyManager(s.model_copy(update={"listen_key_changes": False})) as km:
        for i, name in enumerate(sorted(values)):
            if i % 20 == 0:
                assert await km.get_secret("anthropic", name) == values[name]
    audit = await fetch(
        s.database_url, "SELECT success, error_message FROM encryption_audit_log WHERE event_type = 'rotate'"
    )
    assert [(a["success"], f"id={bad}" in a["error_message"]) for a in audit] == [(False, True)]


async def test_small_scope_failure_rolls_back_everything_and_a_new_run_adopts_the_pending_dek(
    wenv: dict[str, str],
) -> None:
    s = settings_of(wenv)
    values = await seed(s, "google", 30)
    row = (await fetch(s.database_url, "SELECT id, ciphertext FROM secrets ORDER BY id LIMIT 1"))[0]
    await fetch(
        s.database_url, "UPDATE secrets SET ciphertext = $2 WHERE id = $1", row["id"], row["ciphertext"][:-4]
    )
    async with KeyrotorClient(s) as client:
        handle = await client.rotate("google")
        await run_burst_worker(s)
        run = await handle.wait(timeout_s=5)
        assert run.state == "failed" and f"id={row['id']}" in (run.error or "")
        keys = await fetch(s.database_url, "SELECT version, state FROM data_keys ORDER BY version")
        assert [tuple(k) for k in keys] == [(1, "active"), (2, "pending")]  # promotion rolled back too
        assert {r[0] for r in await fetch(s.database_url, "SELECT dek_version FROM secrets")} == {1}

        await fetch(
            s.database_url, "UPDATE secrets SET ciphertext = $2 WHERE id = $1", row["id"], row["ciphertext"]
        )
        retry = await client.rotate("google")
        await run_burst_worker(s)
        assert (await retry.result(timeout_s=5)).to_version == 2  # the pending v2, not a v3
    assert await check_values(s, "google", values) == {2: 30}


async def test_application_writes_during_rotation_are_never_lost(wenv: dict[str, str]) -> None:
    s = settings_of(
        wenv,
        KEYROTOR_SMALL_SCOPE_ROWS="100",
        KEYROTOR_REENCRYPT_RANGE_ROWS="1000",
        KEYROTOR_REENCRYPT_BATCH_ROWS="100",
        # Long enough for the application to write throughout, on a loaded machine too: each of
        # its writes now waits for its audit event's commit.
        KEYROTOR_TEST_BATCH_DELAY_S="0.05",
    )
    expected = await seed(s, "anthropic", 3000)
    names = sorted(expected)
    writes = 0
    async with KeyrotorClient(s) as client, KeyManager(s) as app:
        handle = await client.rotate("anthropic")
        worker = asyncio.create_task(run_burst_worker(s, max_jobs=3))

        async def hammer() -> None:
            nonlocal writes
            rng = random.Random(7)
            while not worker.done():
                batch = {n: f"sk-ant-updated-{writes}-{n}" for n in rng.sample(names, 5)}
                await app.put_secrets("anthropic", list(batch.items()))
                expected.update(batch)
                writes += len(batch)
                await asyncio.sleep(0.002)

        await asyncio.gather(worker, hammer())
        run = await handle.result(timeout_s=5)
    assert writes > 100  # the application wrote throughout the rotation
    per_version = await check_values(s, "anthropic", expected)
    assert sum(per_version.values()) == 3000 and set(per_version) <= {1, 2}
    assert run.rows_done >= 3000 - per_version.get(1, 0) - writes


async def test_two_enqueuers_and_two_workers_make_one_run(wenv: dict[str, str]) -> None:
    s = settings_of(wenv, KEYROTOR_SMALL_SCOPE_ROWS="100", KEYROTOR_REENCRYPT_RANGE_ROWS="300")
    values = await seed(s, "openai", 1500)
    async with KeyrotorClient(s) as a, KeyrotorClient(s) as b:
        h1, h2 = await asyncio.gather(a.rotate("openai"), b.rotate("openai"))
        assert h1.run_id == h2.run_id and h1.job.job_id == h2.job.job_id
        assert sorted([h1.created, h2.created]) == [False, True]
        w1, w2 = await asyncio.gather(run_burst_worker(s), run_burst_worker(s))
        run = await h1.result(timeout_s=5)
    assert w1.jobs_failed == w2.jobs_failed == 0
    # One driver and five ranges (a range picked up twice after a lost lease is harmless).
    assert w1.jobs_complete + w2.jobs_complete >= 1 + 5
    assert len(await fetch(s.database_url, "SELECT * FROM rotations")) == 1
    assert run.rows_done == 1500
    scope = (await fetch(s.database_url, "SELECT * FROM key_scopes"))[0]
    assert (scope["dek_rotation_count"], scope["latest_version"]) == (1, 2)
    assert await check_values(s, "openai", values) == {2: 1500}


async def test_running_jobs_again_is_harmless(wenv: dict[str, str]) -> None:
    s = settings_of(wenv, KEYROTOR_SMALL_SCOPE_ROWS="10", KEYROTOR_REENCRYPT_RANGE_ROWS="30")
    values = await seed(s, "anthropic", 60)
    async with KeyrotorClient(s) as client:
        handle = await client.rotate("anthropic")
        await run_burst_worker(s)
        run = await handle.result(timeout_s=5)
        async with KeyManager(s.model_copy(update={"listen_key_changes": False})) as km:
            rc = RotationContext(km.sessions, km.kek, s)
            again = await rotation.rotate_dek(rc, "anthropic", run_id=run.id)
            assert again.run.state == "completed" and again.ranges == []
            ranges = await fetch(s.database_url, "SELECT lo, hi FROM rotation_ranges")
            for r in ranges:
                progress = await rotation.reencrypt_range(rc, run.id, r["lo"], r["hi"])
                assert progress.state == "completed" and progress.rows == 0
        # Asking again while the run's result is kept does not re-run it.
        assert (await client.rotate("anthropic")).run_id != run.id  # a new request is a new run...
    scope = (await fetch(s.database_url, "SELECT dek_rotation_count FROM key_scopes"))[0]
    assert scope[0] == 1  # ...which no worker has run yet
    assert await check_values(s, "anthropic", values) == {2: 60}


async def test_key_change_listener_switches_to_the_new_dek_at_once(wenv: dict[str, str]) -> None:
    s = settings_of(wenv, KEYROTOR_ACTIVE_VERSION_TTL_SECONDS="3600")
    await seed(s, "anthropic", 5)
    async with KeyManager(s) as app, KeyrotorClient(s) as client:
        assert app.key_listener is not None
        await asyncio.wait_for(app.key_listener.subscribed.wait(), 5)
        assert (await app.encrypt("anthropic", "sk-ant-x")).startswith("kr1:1:")
        handle = await client.rotate("anthropic")
        await run_burst_worker(s)
        await handle.result(timeout_s=5)
        for _ in range(200):
            if app.key_listener.received >= 2:  # pending, then rotated
                break
            await asyncio.sleep(0.05)
        assert (await app.encrypt("anthropic", "sk-ant-y")).startswith("kr1:2:")


async def test_row_budget_throttles_reencryption(wenv: dict[str, str]) -> None:
    s = settings_of(
        wenv,
        KEYROTOR_SMALL_SCOPE_ROWS="10",
        KEYROTOR_REENCRYPT_ROWS_PER_SECOND="400",
        KEYROTOR_REENCRYPT_RANGE_ROWS="10000",
    )
    await seed(s, "anthropic", 700)
    async with KeyrotorClient(s) as client:
        handle = await client.rotate("anthropic")
        started = datetime.now(UTC)
        await run_burst_worker(s)
        run = await handle.result(timeout_s=5)
    # 400 rows of budget at once, then 400 rows a second: 700 rows cannot finish in under ~0.75 s.
    assert run.finished_at is not None and run.started_at is not None
    assert run.finished_at - started >= timedelta(seconds=0.7)


async def test_kek_call_budget_paces_a_kek_rotation(wenv: dict[str, str]) -> None:
    s = settings_of(wenv)
    async with KeyManager(s.model_copy(update={"listen_key_changes": False})) as km:
        for i in range(45):
            await km.put_secret(f"tenant-{i}/openai", "prod", f"sk-proj-budget-{i:04d}")
    # KEK v2, with a budget of 15 provider calls a second (the KMS quota is the account's).
    moved = settings_of(
        wenv,
        ENCRYPTION_KEY="kek-budget-master-key-v2-9c7e5a3b1d2f4e6a8c0b",
        ENCRYPTION_KEY_VERSION="2",
        ENCRYPTION_KEYS_PREVIOUS=f'{{"1": "{s.encryption_key.get_secret_value()}"}}',  # type: ignore[union-attr]
        KEYROTOR_KEK_CALLS_PER_SECOND="15",
    )
    async with KeyrotorClient(moved) as client:
        handle = await client.rotate_kek()
        started = datetime.now(UTC)
        await run_burst_worker(moved)
        run = await handle.result(timeout_s=5)
    assert run.state == "completed" and run.rows_done == 45
    # Rewraps go in chunks of one second's budget (15), each 1 s after the last: 45 take over 2 s.
    assert run.finished_at is not None
    assert run.finished_at - started >= timedelta(seconds=1.9)
    assert {r["kek_version"] for r in await fetch(s.database_url, "SELECT kek_version FROM data_keys")} == {2}


@pytest.mark.parametrize("scope_rows", [5])
async def test_worker_with_the_wrong_kek_refuses(wenv: dict[str, str], scope_rows: int) -> None:
    from keyrotor.errors import KekMismatch

    s = settings_of(wenv)
    await seed(s, "anthropic", scope_rows)
    wrong = settings_of(wenv, ENCRYPTION_KEY="another-master-key-5c1e9a7b3d2f4e6a8b0c1d2e3f4a5b6c")
    with pytest.raises(KekMismatch, match="ENCRYPTION_KEY"):
        await run_burst_worker(wrong)
    # (A KeyManager with the wrong KEK does not open: the audit chain's key does not unwrap.)
    engine = db.create_engine(wrong.database_url)
    try:
        rc = RotationContext(db.sessionmaker(engine), local_keyring(wrong), wrong)
        with pytest.raises(KekMismatch, match="cannot unwrap DEK v1 of scope 'anthropic'"):
            await rotation.rotate_dek(rc, "anthropic")
    finally:
        await engine.dispose()
    run = (await fetch(s.database_url, "SELECT state, attempts FROM rotations"))[0]
    assert tuple(run) == ("pending", 0)  # untouched: a correctly configured worker will run it
    assert len(await fetch(s.database_url, "SELECT * FROM data_keys")) == 1


async def test_a_waiter_hears_the_completion_instead_of_sleeping_out_its_poll(
    wenv: dict[str, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    # Polls so far apart that only the "rotated" announcement can end the wait in time.
    monkeypatch.setattr("keyrotor.queue.client._FIRST_POLL_S", 600.0)
    s = settings_of(wenv)
    await seed(s, "anthropic", 20)
    reads: list[str] = []
    first_read = asyncio.Event()

    def seen(run: RunInfo) -> None:
        reads.append(run.state)
        first_read.set()

    async with KeyrotorClient(s) as client:
        handle = await client.rotate("anthropic")
        waiter = asyncio.create_task(handle.wait(poll_s=600, on_progress=seen))
        await asyncio.wait_for(first_read.wait(), 10)  # subscribed before this first read
        await run_burst_worker(s)
        run = await asyncio.wait_for(waiter, 30)
    # Read once first, then once per announcement heard (pending, active, rotated) at most.
    assert run.state == "completed" and reads[0] == "pending" and len(reads) <= 4


async def test_a_waiter_without_pub_sub_still_polls(wenv: dict[str, str]) -> None:
    from arq.connections import ArqRedis

    from keyrotor.queue.client import _Announcements

    unreachable = ArqRedis(host="127.0.0.1", port=1, socket_connect_timeout=1)
    try:
        async with _Announcements(unreachable, "nowhere") as heard:
            loop = asyncio.get_running_loop()
            t0 = loop.time()
            await asyncio.wait_for(heard.next(0.05), 5)
            assert loop.time() - t0 >= 0.04  # slept its interval, no error
    finally:
        await unreachable.aclose()
