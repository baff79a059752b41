"""The rotation worker as operators run it: `keyrotor worker` processes, the CLI, real services.

Workers are real subprocesses; they are SIGKILLed and SIGTERMed mid-run. Every test has its
own database, queue and channel, so tests never see each other's jobs.
"""

from __future__ import annotations

import asyncio
import base64
import json
import os
import re
import subprocess
import time
from pathlib import Path

import asyncpg
import redis.asyncio as aioredis

from keyrotor import Settings
from keyrotor.kek.base import WrapContext, WrappedDek
from keyrotor.kek.factory import local_keyring
from keyrotor.kek.install_salt import read_install_salt
from tests.conftest import MASTER_KEY
from tests.rotation_helpers import (
    BIN,
    WORKER_REDIS_URL,
    WorkerProcess,
    check_values,
    fetch,
    import_lines,
    keyrotor,
    seed,
    value_for,
    worker_env,
)

SLOW = os.environ.get("KEYROTOR_SLOW_TESTS") == "1"


def start(workers: list[WorkerProcess], env: dict[str, str], tmp_path: Path, *args: str) -> WorkerProcess:
    w = WorkerProcess(env, tmp_path / f"worker-{len(workers)}.log", *args)
    workers.append(w)
    return w


async def run_state(database_url: str, scope: str) -> asyncpg.Record | None:
    rows = await fetch(
        database_url,
        "SELECT r.* FROM rotations r JOIN key_scopes k ON k.id = r.scope_id WHERE k.name = $1 "
        "ORDER BY r.id DESC LIMIT 1",
        scope,
    )
    return rows[0] if rows else None


async def wait_for(
    database_url: str, scope: str, *, rows_done: int = 0, state: str | None = None
) -> asyncpg.Record:
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        run = await run_state(database_url, scope)
        if run is not None and run["rows_done"] >= rows_done and (state is None or run["state"] == state):
            return run
        await asyncio.sleep(0.02)
    raise AssertionError(f"run of {scope} did not reach rows_done={rows_done} state={state}: {run}")


async def test_cli_end_to_end_with_secrets_hygiene(
    wenv: dict[str, str], workers: list[WorkerProcess], tmp_path: Path
) -> None:
    env = {**wenv, "KEYROTOR_REENCRYPT_RANGE_ROWS": "600"}
    values = {
        "anthropic": {f"prod-{i}": value_for("anthropic", i) for i in range(1500)},  # fans out (>= 1000)
        "openai": {f"prod-{i}": value_for("openai", i) for i in range(40)},
        "tenant-9/google": {f"k-{i}": value_for("google", i) for i in range(25)},
    }
    imported = keyrotor("secrets", "import", "-", "--json", env=env, stdin=import_lines(values))
    assert imported.returncode == 0, imported.stderr
    assert json.loads(imported.stdout)["imported"] == 1565
    worker = start(workers, env, tmp_path)
    await worker.wait_started()

    for scope in ("anthropic", "openai"):
        done = keyrotor("rotate", scope, "--wait", "--json", env=env, timeout=60)
        assert done.returncode == 0, done.stderr
        run = json.loads(done.stdout)
        assert (run["state"], run["from_version"], run["to_version"]) == ("completed", 1, 2)
        assert run["rows_done"] == len(values[scope])

    status = keyrotor("status", "--json", env=env)
    assert status.returncode == 0, status.stderr
    by_scope = {s["scope"]: s for s in json.loads(status.stdout)["scopes"]}
    for scope in ("anthropic", "openai"):
        s = by_scope[scope]
        assert s["active_version"] == 2 and s["rotation_count"] == 1 and s["run"] is None
        assert s["rows_by_version"] == {"1": 0, "2": len(values[scope])}
        k1, k2 = s["keys"]
        assert (k1["state"], k2["state"]) == ("grace", "active") and k1["grace_until"] is not None
    untouched = by_scope["tenant-9/google"]
    assert untouched["rotation_count"] == 0 and untouched["rows_by_version"] == {"1": 25}

    settings = Settings.from_env(env)
    for scope, vals in values.items():
        await check_values(settings, scope, vals)

    runs = keyrotor("runs", "--json", "--limit", "5", env=env)
    assert [r["scope"] for r in json.loads(runs.stdout)["runs"]] == ["openai", "anthropic"]

    # A tampered value: the run fails naming the row, and `rotate --wait` exits non-zero saying so.
    bad = (
        await fetch(
            settings.database_url,
            "SELECT s.id, s.ciphertext FROM secrets s JOIN key_scopes k ON k.id = s.scope_id "
            "WHERE k.name = 'tenant-9/google' ORDER BY s.id LIMIT 1",
        )
    )[0]
    await fetch(
        settings.database_url, "UPDATE secrets SET ciphertext = $2 WHERE id = $1", bad[0], bad[1][:-4]
    )
    failed = keyrotor("rotate", "tenant-9/google", "--wait", env=env, timeout=60)
    assert failed.returncode == 1
    assert f"secrets row id={bad[0]} could not be re-encrypted" in failed.stderr
    assert "Traceback" not in failed.stderr
    assert '"exception"' in worker.output()  # the job's failure, logged as a structured traceback

    refused = keyrotor("retire", "openai", "1", env=env)
    assert refused.returncode != 0 and "grace until" in refused.stderr and "--force-now" in refused.stderr
    retired = keyrotor("retire", "openai", "1", "--force-now", "--json", env=env, timeout=60)
    assert retired.returncode == 0, retired.stderr
    assert json.loads(retired.stdout)["state"] == "completed"

    # Secrets hygiene: no plaintext, DEK, wrapped DEK or master key in the worker's logs or in
    # anything arq keeps in Redis (job arguments and results).
    deks = await fetch(
        settings.database_url, "SELECT k.name, d.* FROM data_keys d JOIN key_scopes k ON k.id = d.scope_id"
    )
    keyring = local_keyring(settings, await read_install_salt(settings.database_url))
    forbidden = [MASTER_KEY] + [v for vals in values.values() for v in vals.values()]
    for d in deks:
        if d["encrypted_dek"] is not None:
            blob = bytes(d["encrypted_dek"])
            dek = keyring.unwrap_sync(
                WrappedDek(d["kek_id"], d["kek_version"], blob), WrapContext(d["name"], d["version"])
            )
            forbidden += [
                dek.hex(),
                base64.b64encode(dek).decode(),
                base64.b64encode(blob).decode(),
                blob.hex(),
            ]
    client = aioredis.Redis.from_url(WORKER_REDIS_URL)
    try:
        payloads = [
            await client.get(key)
            async for key in client.scan_iter(match=f"arq:*{env['KEYROTOR_QUEUE_NAME']}*")
            if (await client.type(key)) == b"string"
        ]
    finally:
        await client.aclose()
    assert any(p and b"rotate_dek" in p for p in payloads)  # results of the drivers are kept
    for p in payloads:  # job payloads and results are JSON, never pickle
        if p:
            json.loads(p)
    haystacks = [worker.output()] + [repr(p) + (p or b"").decode("latin-1") for p in payloads]
    for hay in haystacks:
        for secret in forbidden:
            assert secret not in hay
    lines = worker.events()
    assert any(e.get("event") == "batch_reencrypted" and e.get("scope") == "anthropic" for e in lines)
    assert all("job_id" in e for e in lines if e.get("event") == "batch_reencrypted")


async def test_sigkill_mid_run_loses_nothing(
    wenv: dict[str, str], workers: list[WorkerProcess], tmp_path: Path
) -> None:
    n = 100_000 if SLOW else 10_000
    env = {
        **wenv,
        "KEYROTOR_REENCRYPT_RANGE_ROWS": str(n // 4),
        "KEYROTOR_REENCRYPT_BATCH_ROWS": "500",
        "KEYROTOR_TEST_BATCH_DELAY_S": "0.03",
        "KEYROTOR_WORKER_MAX_JOBS": "2",
    }
    settings = Settings.from_env(env)
    values = await seed(settings, "anthropic", n)
    first = start(workers, env, tmp_path)
    await first.wait_started()
    asked = keyrotor("rotate", "anthropic", "--json", env=env)
    assert asked.returncode == 0, asked.stderr
    run_id = json.loads(asked.stdout)["id"]

    # Kill it after some batches, then again later in the run, each time mid-flight.
    await wait_for(settings.database_url, "anthropic", rows_done=n // 8)
    first.kill()
    second = start(workers, env, tmp_path)
    await wait_for(settings.database_url, "anthropic", rows_done=n // 2)
    second.kill()
    # A client asking meanwhile joins the open run.
    joined = keyrotor("rotate", "anthropic", "--json", env=env)
    assert joined.returncode == 0, joined.stderr
    assert json.loads(joined.stdout)["id"] == run_id and json.loads(joined.stdout)["joined"]
    start(workers, env, tmp_path)
    done = await wait_for(settings.database_url, "anthropic", state="completed")
    # Every row re-encrypted exactly once (compare-and-swap writes counted in their transactions).
    assert done["id"] == run_id and done["rows_done"] == n
    assert await check_values(settings, "anthropic", values) == {2: n}
    runs = await fetch(settings.database_url, "SELECT count(*) FROM rotations")
    assert runs[0][0] == 1
    ranges = await fetch(settings.database_url, "SELECT sum(rows_done), count(*) FROM rotation_ranges")
    assert tuple(ranges[0]) == (n, 4)


async def test_sigterm_finishes_the_batch_in_hand_and_the_run_resumes(
    wenv: dict[str, str], workers: list[WorkerProcess], tmp_path: Path
) -> None:
    env = {
        **wenv,
        "KEYROTOR_SMALL_SCOPE_ROWS": "100",
        "KEYROTOR_REENCRYPT_BATCH_ROWS": "200",
        "KEYROTOR_TEST_BATCH_DELAY_S": "0.15",
    }
    settings = Settings.from_env(env)
    values = await seed(settings, "openai", 4000)
    worker = start(workers, env, tmp_path)
    await worker.wait_started()
    assert keyrotor("rotate", "openai", env=env).returncode == 0
    await wait_for(settings.database_url, "openai", rows_done=600)
    t0 = time.monotonic()
    assert worker.terminate() == 0
    assert time.monotonic() - t0 < 10
    assert "cancelled, will be run again" in worker.output()
    assert '"worker_stopped"' in worker.output()
    run = await run_state(settings.database_url, "openai")
    assert run is not None and run["state"] == "running"
    on_v2 = await fetch(settings.database_url, "SELECT count(*) FROM secrets WHERE dek_version = 2")
    assert on_v2[0][0] == run["rows_done"] and run["rows_done"] % 200 == 0  # whole batches only

    again = start(workers, {**env, "KEYROTOR_TEST_BATCH_DELAY_S": "0"}, tmp_path)
    await again.wait_started()
    done = await wait_for(settings.database_url, "openai", state="completed")
    assert done["rows_done"] == 4000
    assert await check_values(settings, "openai", values) == {2: 4000}


async def test_two_workers_and_two_enqueuers_make_exactly_one_run(
    wenv: dict[str, str], workers: list[WorkerProcess], tmp_path: Path
) -> None:
    env = {
        **wenv,
        "KEYROTOR_SMALL_SCOPE_ROWS": "100",
        "KEYROTOR_REENCRYPT_RANGE_ROWS": "1000",
        "KEYROTOR_REENCRYPT_BATCH_ROWS": "250",
        # 24 batches: about 1.8 s for one worker alone, so the other, started with it, takes part.
        "KEYROTOR_TEST_BATCH_DELAY_S": "0.15",
        # Two jobs at a time each: one worker polling first cannot take all six ranges alone.
        "KEYROTOR_WORKER_MAX_JOBS": "2",
    }
    settings = Settings.from_env(env)
    values = await seed(settings, "anthropic", 6000)
    full_env = {"PATH": os.environ.get("PATH", ""), "HOME": os.environ.get("HOME", "/root"), **env}
    # Both enqueuers before any worker: the second must find the first's run open, however
    # long each takes to start on a loaded machine (one that started a second late once found
    # the run completed and, rightly, opened another).
    procs = [
        subprocess.Popen(
            [str(BIN), "rotate", "anthropic", "--wait", "--json", "--request-id", f"enqueuer-{i}"],
            env=full_env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for i in range(2)
    ]
    deadline = time.monotonic() + 60
    while True:
        rows = await fetch(settings.database_url, "SELECT detail->'request_ids' FROM rotations")
        ids = [sorted(json.loads(r[0] or "[]")) for r in rows]
        if ids == [["enqueuer-0", "enqueuer-1"]]:
            break
        assert len(rows) <= 1 and all(p.poll() is None for p in procs), (ids, [p.poll() for p in procs])
        assert time.monotonic() < deadline, ids
        await asyncio.sleep(0.05)
    for _ in range(2):
        start(workers, env, tmp_path)
    outs = [p.communicate(timeout=120) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], [o[1] for o in outs]
    docs = [json.loads(o[0]) for o in outs]
    assert docs[0]["id"] == docs[1]["id"] and sorted(d["joined"] for d in docs) == [False, True]
    assert all(d["state"] == "completed" and d["rows_done"] == 6000 for d in docs)
    assert (await fetch(settings.database_url, "SELECT count(*) FROM rotations"))[0][0] == 1
    scope = (await fetch(settings.database_url, "SELECT dek_rotation_count, latest_version FROM key_scopes"))[
        0
    ]
    assert tuple(scope) == (1, 2)
    # Both workers took part.
    assert all("batch_reencrypted" in w.output() for w in workers)
    assert await check_values(settings, "anthropic", values) == {2: 6000}


async def test_postgres_connections_lost_mid_run_retry_and_resume(
    wenv: dict[str, str], workers: list[WorkerProcess], tmp_path: Path
) -> None:
    env = {
        **wenv,
        "KEYROTOR_SMALL_SCOPE_ROWS": "100",
        "KEYROTOR_REENCRYPT_BATCH_ROWS": "200",
        "KEYROTOR_TEST_BATCH_DELAY_S": "0.05",
    }
    settings = Settings.from_env(env)
    values = await seed(settings, "google", 3000)
    worker = start(workers, env, tmp_path)
    await worker.wait_started()
    assert keyrotor("rotate", "google", env=env).returncode == 0
    await wait_for(settings.database_url, "google", rows_done=800)
    dbname = settings.database_url.rsplit("/", 1)[1]
    admin = await asyncpg.connect(settings.database_url.rsplit("/", 1)[0] + "/postgres")
    try:
        # Drop the worker's connections until one of them dies mid-batch.
        deadline = time.monotonic() + 10
        while '"job_retry"' not in worker.output() and time.monotonic() < deadline:
            await admin.execute(
                "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                "WHERE datname = $1 AND pid <> pg_backend_pid() AND state <> 'idle'",
                dbname,
            )
            await asyncio.sleep(0.005)
    finally:
        await admin.close()
    assert '"job_retry"' in worker.output()
    assert "StoreUnavailable" in worker.output()
    done = await wait_for(settings.database_url, "google", state="completed")
    assert done["rows_done"] == 3000
    assert await check_values(settings, "google", values) == {2: 3000}


async def test_worker_with_the_wrong_key_refuses_to_start(
    wenv: dict[str, str], workers: list[WorkerProcess], tmp_path: Path
) -> None:
    await seed(Settings.from_env(wenv), "anthropic", 3)
    wrong = start(
        workers, {**wenv, "ENCRYPTION_KEY": "wrong-master-key-0a9b8c7d6e5f4a3b2c1d0e9f8a7b6c5d"}, tmp_path
    )
    assert wrong.proc.wait(30) != 0
    out = wrong.output()
    # The audit chain's key is the first thing it unwraps (KeyManager.open), then the DEKs.
    assert re.search(r"cannot unwrap (audit key 1|DEK v1 of scope 'anthropic')", out), out
    assert "ENCRYPTION_KEY" in out
    assert "Traceback" not in out


async def test_redis_lost_mid_run_the_run_resumes_where_it_stopped(
    env: dict[str, str], workers: list[WorkerProcess], tmp_path: Path
) -> None:
    """A Redis of this test's own is killed (and comes back empty) in the middle of a run."""
    port = 20_000 + os.getpid() % 20_000

    def redis_server() -> subprocess.Popen[bytes]:
        proc = subprocess.Popen(
            ["redis-server", "--port", str(port), "--bind", "127.0.0.1", "--save", "", "--appendonly", "no"],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        for _ in range(100):
            if (
                subprocess.run(["redis-cli", "-p", str(port), "ping"], capture_output=True).stdout.strip()
                == b"PONG"
            ):
                return proc
            time.sleep(0.05)
        raise AssertionError("private redis-server did not start")

    server = redis_server()
    try:
        wenv = {
            **worker_env(env),
            "REDIS_URL": f"redis://127.0.0.1:{port}/0",
            "KEYROTOR_SMALL_SCOPE_ROWS": "100",
            "KEYROTOR_REENCRYPT_RANGE_ROWS": "1000",
            "KEYROTOR_REENCRYPT_BATCH_ROWS": "200",
            "KEYROTOR_WORKER_MAX_JOBS": "1",
            "KEYROTOR_TEST_BATCH_DELAY_S": "0.05",
        }
        settings = Settings.from_env(wenv)
        values = await seed(settings, "anthropic", 5000)
        first = start(workers, wenv, tmp_path)
        await first.wait_started()
        assert keyrotor("rotate", "anthropic", env=wenv).returncode == 0
        await wait_for(settings.database_url, "anthropic", rows_done=1000)
        server.kill()
        server.wait(10)
        # arq's worker cannot poll without Redis: it finishes the job in hand (its range) and
        # exits; the ranges still queued are lost with Redis.
        assert first.proc.wait(30) != 0
        stopped = await run_state(settings.database_url, "anthropic")
        assert stopped is not None and stopped["state"] == "running" and stopped["rows_done"] < 5000
        server = redis_server()  # back, but empty: the queued jobs are gone
        start(workers, wenv, tmp_path)  # (a supervisor would restart it) adopts the open run
        done = await wait_for(settings.database_url, "anthropic", state="completed")
        assert done["id"] == stopped["id"] and done["rows_done"] == 5000
        assert await check_values(settings, "anthropic", values) == {2: 5000}
    finally:
        server.kill()
        server.wait(10)


async def test_arq_cli_runs_the_same_worker_settings(wenv: dict[str, str]) -> None:
    settings = Settings.from_env(wenv)
    values = await seed(settings, "openai", 30)
    asked = keyrotor("rotate", "openai", "--json", env=wenv)
    assert asked.returncode == 0, asked.stderr
    full_env = {"PATH": os.environ.get("PATH", ""), "HOME": os.environ.get("HOME", "/root"), **wenv}
    proc = subprocess.run(
        [str(BIN.parent / "arq"), "keyrotor.worker.main.WorkerSettings", "--burst"],
        env=full_env,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr
    assert '"worker_started"' in proc.stdout and '"rotation_completed"' in proc.stdout
    run = await run_state(settings.database_url, "openai")
    assert run is not None and run["state"] == "completed"
    assert await check_values(settings, "openai", values) == {2: 30}


async def test_rotate_kek_through_the_cli_rewraps_without_touching_a_value(
    wenv: dict[str, str], workers: list[WorkerProcess], tmp_path: Path
) -> None:
    settings = Settings.from_env(wenv)
    values = {scope: await seed(settings, scope, 20) for scope in ("openai", "tenant-2/anthropic")}
    before = await fetch(settings.database_url, "SELECT id, ciphertext FROM secrets ORDER BY id")
    new_key = "cli-kek-rotation-master-key-v2-5d3c1b9a7e6f4d2c"
    moved = {
        **wenv,
        "ENCRYPTION_KEY": new_key,
        "ENCRYPTION_KEY_VERSION": "2",
        "ENCRYPTION_KEYS_PREVIOUS": json.dumps({"1": MASTER_KEY}),
    }
    worker = start(workers, moved, tmp_path)
    await worker.wait_started()

    done = keyrotor("rotate-kek", "--wait", "--json", env=moved, timeout=60)
    assert done.returncode == 0, done.stderr
    run = json.loads(done.stdout)
    assert (run["kind"], run["state"], run["to_version"]) == ("kek", "completed", 2)
    assert run["rows_done"] == run["rows_total"] == 2  # one DEK a scope
    keys = await fetch(settings.database_url, "SELECT kek_version FROM data_keys")
    assert {k["kek_version"] for k in keys} == {2}
    # The cheap rotation: DEKs rewrapped, not one stored value rewritten.
    assert await fetch(settings.database_url, "SELECT id, ciphertext FROM secrets ORDER BY id") == before
    only_new = Settings.from_env({**wenv, "ENCRYPTION_KEY": new_key, "ENCRYPTION_KEY_VERSION": "2"})
    for scope, vals in values.items():
        assert await check_values(only_new, scope, vals) == {1: 20}

    again = keyrotor("rotate-kek", "--wait", env=moved, timeout=60)
    assert again.returncode == 0, again.stderr
    assert "KEK rewrap" in again.stderr and "completed, 0/" in again.stderr
    assert new_key not in worker.output() and MASTER_KEY not in worker.output()
