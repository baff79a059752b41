"""Outage suite: the database goes away under a running worker, and comes back.

The machine's Postgres is shared, so it is never stopped: one test stops a throwaway server of
its own (tests/reliability/pg_cluster.py) with ``pg_ctl stop -m immediate``. Another closes this
test's own database on the shared server (``ALLOW_CONNECTIONS false``) and terminates every
connection to it: to the worker that is a Postgres outage (connections die, new ones are
refused). Each lasts ``OUTAGE_S`` seconds (5 by default, the issue's 30 under
``KEYROTOR_SLOW_TESTS=1``). The worker must pause, retry
with backoff (its CPU use during the outage is measured: no busy loop), and resume; nothing is
written half, and the counts agree at the end.

Connections killed mid-batch (``pg_terminate_backend``) are tested here for retirement and KEK
rewrap; tests/worker/test_rotation_worker.py does it for DEK rotation, and Redis loss; a KEK
provider down during rotate_kek is tests/jobs/test_kek_providers.py.
"""

from __future__ import annotations

import asyncio
import json
import os
import random
import time
from collections.abc import Callable

import asyncpg
import pytest

from keyrotor import KeyManager, Settings
from keyrotor.queue.client import KeyrotorClient
from keyrotor.store import db
from tests.conftest import MASTER_KEY
from tests.reliability.harness import (
    Workers,
    assert_no_open_runs,
    json_lines,
    run_row,
    seed_scopes,
    sized,
    wait_run,
)
from tests.reliability.pg_cluster import throwaway_cluster
from tests.rotation_helpers import check_values, fetch, run_burst_worker, seed

OUTAGE_S = sized(5, 30)
CLK_TCK = os.sysconf("SC_CLK_TCK")


def _cpu_s(pid: int) -> float:
    with open(f"/proc/{pid}/stat") as fh:
        fields = fh.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / CLK_TCK  # utime + stime


def _admin_url(database_url: str) -> str:
    return database_url.rsplit("/", 1)[0] + "/postgres"


async def _close_database(database_url: str) -> None:
    dbname = database_url.rsplit("/", 1)[1]
    admin = await asyncpg.connect(_admin_url(database_url))
    try:
        await admin.execute(f'ALTER DATABASE "{dbname}" ALLOW_CONNECTIONS false')
        await admin.execute(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = $1", dbname
        )
    finally:
        await admin.close()


async def _open_database(database_url: str) -> None:
    dbname = database_url.rsplit("/", 1)[1]
    admin = await asyncpg.connect(_admin_url(database_url))
    try:
        await admin.execute(f'ALTER DATABASE "{dbname}" ALLOW_CONNECTIONS true')
    finally:
        await admin.close()


def _outage_env(wenv: dict[str, str], n: int, **extra: str) -> dict[str, str]:
    """A worker env for an ``n``-row rotation paced to last through an outage: two ranges, small
    slowed batches, two job slots, short retry backoff."""
    return {
        **wenv,
        "KEYROTOR_SMALL_SCOPE_ROWS": "100",
        "KEYROTOR_REENCRYPT_RANGE_ROWS": str(n // 2),
        "KEYROTOR_REENCRYPT_BATCH_ROWS": "200",
        "KEYROTOR_TEST_BATCH_DELAY_S": "0.05",
        "KEYROTOR_WORKER_MAX_JOBS": "2",
        "KEYROTOR_RETRY_BACKOFF_SECONDS": "0.5",
        "KEYROTOR_RETRY_BACKOFF_MAX_SECONDS": "4",
        **extra,
    }


async def test_database_outage_mid_rotation_pauses_backs_off_and_resumes(
    wenv: dict[str, str], workers: Workers, record: Callable[..., None]
) -> None:
    n = sized(4_000, 50_000)
    env = _outage_env(wenv, n)
    s = Settings.from_env(env)
    values = await seed(s, "anthropic", n)
    worker = workers.start(env)
    await worker.wait_started()
    async with KeyrotorClient(s) as client:
        run_id = (await client.rotate("anthropic")).run_id
    await wait_run(s.database_url, run_id, rows_done=n // 4)
    cpu0, t0 = _cpu_s(worker.proc.pid), time.monotonic()
    await _close_database(s.database_url)
    try:
        await asyncio.sleep(OUTAGE_S)
        assert worker.proc.poll() is None, "the worker died in the outage"
        cpu = _cpu_s(worker.proc.pid) - cpu0
        wall = time.monotonic() - t0
    finally:
        await _open_database(s.database_url)
    reopened = time.monotonic()
    stalled = await run_row(s.database_url, run_id)
    resumed = await wait_run(s.database_url, run_id, rows_done=stalled["rows_done"] + 1, timeout_s=120)
    resume_s = time.monotonic() - reopened
    events = json_lines(worker.output())
    retries = [e for e in events if e.get("event") == "job_retry"]
    run = await wait_run(s.database_url, run_id, terminal=True, timeout_s=120)
    assert run["state"] == "completed" and run["rows_done"] == n, dict(run)
    assert await check_values(s, "anthropic", values) == {2: n}
    await assert_no_open_runs(s.database_url)
    # No busy loop: the worker slept through the outage (backoff), not spun.
    assert cpu < 0.25 * wall, f"worker used {cpu:.2f}s of CPU in a {wall:.1f}s outage"
    # It retried with backoff (max 4 s here) and resumed on its own, not at the next adoption.
    assert retries and resume_s < 15, (resume_s, resumed["state"], len(retries))
    record(
        "outage",
        what=f"database closed for {OUTAGE_S}s mid rotate_dek",
        rows=n,
        outage_s=round(wall, 1),
        worker_cpu_s=round(cpu, 2),
        job_retries=len(retries),
        resumed_after_s=round(resume_s, 1),
        resumed=True,
    )


async def test_postgres_server_stopped_mid_rotation_loses_nothing(
    wenv: dict[str, str], workers: Workers, record: Callable[..., None]
) -> None:
    """A real server stop (``pg_ctl stop -m immediate``: a crash to its clients and its WAL).

    Batch transactions commit with ``synchronous_commit = off``, so the crash may take back the
    last batches the worker saw commit; their rows must then still open with the old DEK (in
    grace), and the run's cursor and counters, written in the same transactions, go back with
    them. The worker pauses while the server is down and finishes the run once it is back.
    """
    with throwaway_cluster() as cluster:
        url = cluster.url("keyrotor_outage")
        await db.ensure_database(url)
        engine = db.create_engine(url)
        try:
            await db.upgrade(engine)
        finally:
            await engine.dispose()
        n = sized(4_000, 50_000)
        env = _outage_env(wenv, n, DATABASE_URL=url)
        s = Settings.from_env(env)
        values = await seed(s, "anthropic", n)
        worker = workers.start(env)
        await worker.wait_started()
        async with KeyrotorClient(s) as client:
            run_id = (await client.rotate("anthropic")).run_id
        seen = await wait_run(url, run_id, rows_done=n // 4)
        cpu0, t0 = _cpu_s(worker.proc.pid), time.monotonic()
        await asyncio.to_thread(cluster.stop, "immediate")
        await asyncio.sleep(OUTAGE_S)
        assert worker.proc.poll() is None, "the worker died in the outage"
        cpu, wall = _cpu_s(worker.proc.pid) - cpu0, time.monotonic() - t0
        await asyncio.to_thread(cluster.start)
        after_restart = await run_row(url, run_id)
        run = await wait_run(url, run_id, terminal=True, timeout_s=180)
        assert run["state"] == "completed" and run["rows_done"] == n, dict(run)
        # Every value opens to what it was, each row on the new version alone.
        assert await check_values(s, "anthropic", values) == {2: n}
        await assert_no_open_runs(url)
        assert cpu < 0.25 * wall, f"worker used {cpu:.2f}s of CPU in a {wall:.1f}s outage"
        record(
            "outage",
            what=f"Postgres server stopped (immediate) for {OUTAGE_S}s mid rotate_dek",
            rows=n,
            outage_s=round(wall, 1),
            worker_cpu_s=round(cpu, 2),
            rows_done_seen_before_stop=seen["rows_done"],
            rows_done_after_restart=after_restart["rows_done"],
            resumed=True,
        )


async def _terminate_loop(database_url: str, stop: asyncio.Event, rng: random.Random) -> int:
    """Kill the database's busy connections at random moments until ``stop``; returns how many."""
    dbname = database_url.rsplit("/", 1)[1]
    admin = await asyncpg.connect(_admin_url(database_url))
    killed = 0
    try:
        while not stop.is_set():
            rows = await admin.fetch(
                "SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                "WHERE datname = $1 AND pid <> pg_backend_pid() AND state <> 'idle'",
                dbname,
            )
            killed += sum(1 for r in rows if r[0])
            # A batch transaction lasts milliseconds: look often until the first kill (on a
            # quiet machine a whole phase can pass between slow looks), then at random moments.
            await asyncio.sleep(rng.uniform(0.002, 0.02) if killed == 0 else rng.uniform(0.05, 0.4))
    finally:
        await admin.close()
    return killed


@pytest.mark.timeout(sized(600, 1200))
async def test_connections_killed_mid_batch_during_retirement_and_kek_rewrap(
    wenv: dict[str, str], workers: Workers, rng: random.Random, record: Callable[..., None]
) -> None:
    base = Settings.from_env({**wenv, "KEYROTOR_ACTIVE_VERSION_TTL_SECONDS": "3600"})
    n, late_n = sized(1_000, 20_000), sized(1_500, 20_000)
    async with KeyManager(base.model_copy(update={"listen_key_changes": False})) as stale:
        await stale.encrypt("openai", "warm-up", context="secret:warm-up")  # a location the census counts
        values = await seed(base, "openai", n)
        async with KeyrotorClient(base) as client:
            handle = await client.rotate("openai")
            await run_burst_worker(base)
            await handle.result(timeout_s=30)
        late = {f"late{i:06d}": f"sk-proj-late-{i:06d}-{rng.getrandbits(80):020x}" for i in range(late_n)}
        await stale.put_secrets("openai", list(late.items()))
    values.update(late)
    await seed_scopes(base, [f"tenant-{i:03d}/google" for i in range(sized(30, 200))], 1)
    env = {
        **wenv,
        "KEYROTOR_REENCRYPT_BATCH_ROWS": "100",
        "KEYROTOR_REENCRYPT_ROWS_PER_SECOND": "500",
        "KEYROTOR_KEK_REWRAP_BATCH": "4",
        "KEYROTOR_KEK_CALLS_PER_SECOND": "40",
    }
    worker = workers.start(env)
    await worker.wait_started()
    killed = 0

    async def under_fire(run_id: int) -> asyncpg.Record:
        nonlocal killed
        stop = asyncio.Event()
        killer = asyncio.create_task(_terminate_loop(base.database_url, stop, rng))
        try:
            # At full size the retirement sweeps 20,000 stragglers at 500 rows/s (40 s of
            # throttle alone) while its batches are killed: the deadline grows with the size.
            return await wait_run(base.database_url, run_id, terminal=True, timeout_s=sized(120, 360))
        finally:
            stop.set()
            killed += await killer

    async with KeyrotorClient(Settings.from_env(env)) as client:
        retire_id = (await client.retire("openai", 1, force_now=True)).run_id
    retired = await under_fire(retire_id)
    # Then the KEK moves to version 2 and every DEK is rewrapped, still under fire.
    worker.kill()
    moved = {
        **env,
        "ENCRYPTION_KEY": "outage-suite-master-key-v2-3c5e7a9b1d2f4e6a8c",
        "ENCRYPTION_KEY_VERSION": "2",
        "ENCRYPTION_KEYS_PREVIOUS": json.dumps({"1": MASTER_KEY}),
    }
    worker = workers.start(moved)
    await worker.wait_started(60)
    async with KeyrotorClient(Settings.from_env(moved)) as client:
        kek_id = (await client.rotate_kek()).run_id
    rewrapped = await under_fire(kek_id)
    assert retired["state"] == "completed" and retired["rows_done"] == late_n, dict(retired)
    assert rewrapped["state"] == "completed", dict(rewrapped)
    deks = await fetch(base.database_url, "SELECT state, kek_version FROM data_keys")
    live = [d for d in deks if d["state"] != "destroyed"]
    assert {d["kek_version"] for d in live} == {2} and rewrapped["rows_done"] == len(live)
    audit = await fetch(
        base.database_url, "SELECT count(*) FROM encryption_audit_log WHERE event_type = 'rewrap'"
    )
    assert audit[0][0] == len(live)  # each DEK rewrapped once: killed batches wrote nothing
    only_new = Settings.from_env(
        {**wenv, "ENCRYPTION_KEY": moved["ENCRYPTION_KEY"], "ENCRYPTION_KEY_VERSION": "2"}
    )
    assert await check_values(only_new, "openai", values) == {2: n + late_n}
    await assert_no_open_runs(base.database_url)
    assert killed > 0
    out = workers.output()
    record(
        "outage",
        what="pg_terminate_backend at random during retire_dek and rotate_kek",
        stragglers=late_n,
        deks=len(live),
        connections_killed=killed,
        store_unavailable_lines=out.count("StoreUnavailable"),
    )
