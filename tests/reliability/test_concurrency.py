"""Concurrency suite: the application keeps writing while keyrotor rotates, retires and migrates.

- Application writers update, insert and delete rows of ``secrets`` through a DEK rotation and
  then a retirement run by two ``keyrotor worker`` processes: no update is lost (every row
  opens to the value last written), no deleted row comes back, no insert is lost.
- The same for an application-owned column during a legacy migration.
- Three workers and two long-running schedulers (the leader SIGKILLed half-way): exactly one
  run per due rotation.
"""

from __future__ import annotations

import asyncio
import random
import time
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path

from keyrotor import KeyManager, Settings
from keyrotor.census import columns
from keyrotor.legacy import migration as legacy_migration
from keyrotor.queue.client import KeyrotorClient
from tests.legacy_helpers import legacy_rows
from tests.reliability.harness import Workers, assert_no_open_runs, seed_scopes, sized, wait_run
from tests.rotation_helpers import check_values, cleanup_queue, fetch, seed, value_for
from tests.scheduler.conftest import Proc, scheduler_env


def _quiet(s: Settings) -> Settings:
    return s.model_copy(update={"listen_key_changes": False})


async def test_app_writes_and_deletes_through_rotation_and_retirement(
    wenv: dict[str, str], workers: Workers, rng: random.Random, record: Callable[..., None]
) -> None:
    n = sized(4_000, 50_000)
    env = {
        **wenv,
        "KEYROTOR_SMALL_SCOPE_ROWS": "100",
        "KEYROTOR_REENCRYPT_RANGE_ROWS": str(n // 4),
        "KEYROTOR_REENCRYPT_BATCH_ROWS": "200",
        "KEYROTOR_TEST_BATCH_DELAY_S": "0.15",
        "KEYROTOR_WORKER_MAX_JOBS": "2",
    }
    s = Settings.from_env(env)
    expected = await seed(s, "anthropic", n)
    # A third writer never hears of the new DEK (no listener): it keeps writing under v1 until
    # its cached active version expires (3 s here, KEYROTOR_ACTIVE_VERSION_TTL_SECONDS).
    stale_s = _quiet(s).model_copy(update={"active_version_ttl_s": 3.0})
    for _ in range(2):
        workers.start(env)
    for w in workers.started:
        await w.wait_started()
    stats = {"updates": 0, "inserts": 0, "deletes": 0, "stale_inserts": 0}
    deleted: set[str] = set()
    stop = asyncio.Event()

    async def app(km: KeyManager, seed_: int) -> None:
        # Each writer owns the names with its parity, so the expected state is exact.
        mine = sorted(name for i, name in enumerate(sorted(expected)) if i % 2 == seed_)
        r = random.Random(rng.random() + seed_)
        while not stop.is_set():
            op = r.random()
            if op < 0.6:
                batch = {name: value_for("updated", r.randrange(10**6)) for name in r.sample(mine, 5)}
                await km.put_secrets("anthropic", list(batch.items()))
                for name, v in batch.items():
                    expected[name] = v
                    deleted.discard(name)
                stats["updates"] += len(batch)
            elif op < 0.8:
                name = f"new-{seed_}-{stats['inserts']:06d}"
                value = value_for("new", stats["inserts"])
                await km.put_secret("anthropic", name, value)
                expected[name] = value
                mine.append(name)
                stats["inserts"] += 1
            else:
                name = r.choice(mine)
                # The application deletes rows with plain SQL, as it owns the table.
                await fetch(s.database_url, "DELETE FROM secrets WHERE name = $1", name)
                if name in expected:
                    del expected[name]
                    deleted.add(name)
                    stats["deletes"] += 1
            await asyncio.sleep(0.003)

    async def stale_app(km: KeyManager, until: asyncio.Event) -> None:
        i = 0
        while not until.is_set():
            name, value = f"stale-{i:06d}", value_for("stale", i)
            await km.put_secret("anthropic", name, value)
            expected[name] = value
            stats["stale_inserts"] = i = i + 1
            await asyncio.sleep(0.005)

    t0 = time.monotonic()
    async with (
        KeyManager(s) as km1,
        KeyManager(s) as km2,
        KeyManager(stale_s) as km3,
        KeyrotorClient(s) as client,
    ):
        await km3.encrypt(
            "anthropic", "warm-up", context="secret:warm-up"
        )  # caches v1 as active (a location the census counts)
        writers = [asyncio.create_task(app(km1, 0)), asyncio.create_task(app(km2, 1))]
        stale = asyncio.create_task(stale_app(km3, stop))
        try:
            rot = await client.rotate("anthropic")
            run = await wait_run(s.database_url, rot.run_id, terminal=True)
            assert run["state"] == "completed", dict(run)
            ret = await client.retire("anthropic", 1, force_now=True)
            run2 = await wait_run(s.database_url, ret.run_id, terminal=True)
            assert run2["state"] == "completed", dict(run2)
            await asyncio.sleep(0.5)  # and a little after both
        finally:
            stop.set()
            await asyncio.gather(*writers, stale)
    seconds = time.monotonic() - t0
    assert stats["updates"] > 100 and stats["deletes"] > 10 and stats["inserts"] > 10, stats
    assert stats["stale_inserts"] > 20, stats
    # No lost update or insert (each value is the last one written), and no resurrected row.
    per_version = await check_values(s, "anthropic", expected)
    assert per_version == {2: len(expected)}
    names = {r[0] for r in await fetch(s.database_url, "SELECT name FROM secrets")}
    assert not names & deleted
    key = (await fetch(s.database_url, "SELECT state, destroy_after FROM data_keys WHERE version = 1"))[0]
    assert key["state"] == "retired" and key["destroy_after"] is not None  # erased after its window
    await assert_no_open_runs(s.database_url)
    record(
        "concurrency",
        what="rotate_dek + retire_dek with 2 app writers and 1 stale writer",
        rows=n,
        **stats,
        rotated=run["rows_done"],
        stragglers=run2["rows_done"],
        seconds=round(seconds, 2),
    )


async def test_app_writes_and_deletes_through_legacy_migration(
    wenv: dict[str, str], rng: random.Random, record: Callable[..., None]
) -> None:
    s = _quiet(Settings.from_env(wenv))
    rows = legacy_rows(sized(120, 1_000))
    await fetch(
        s.database_url,
        "CREATE TABLE settings (id bigserial PRIMARY KEY, provider text NOT NULL, api_key text)",
    )
    ids = await fetch(
        s.database_url,
        "INSERT INTO settings (provider, api_key) SELECT * FROM unnest($1::text[], $2::text[]) RETURNING id",
        [r[0] for r in rows],
        [r[2] for r in rows],
    )
    expected = {rec["id"]: (r[0], r[1]) for rec, r in zip(ids, rows, strict=True)}
    deleted: set[int] = set()
    stats = {"updates": 0, "deletes": 0}
    async with KeyManager(s) as km:
        await columns.register(km.sessions, "settings.api_key", pk="id", scope_column="provider")
        stop = asyncio.Event()

        async def app() -> None:
            live = sorted(expected)
            while not stop.is_set():
                i = rng.choice(live)
                provider = expected[i][0]
                if rng.random() < 0.75:
                    plain = value_for(provider, rng.randrange(10**6))
                    token = await km.encrypt(provider, plain, context=f"settings.api_key:{i}")
                    await fetch(s.database_url, "UPDATE settings SET api_key = $2 WHERE id = $1", i, token)
                    expected[i] = (provider, plain)
                    stats["updates"] += 1
                else:
                    await fetch(s.database_url, "DELETE FROM settings WHERE id = $1", i)
                    del expected[i]
                    live.remove(i)
                    deleted.add(i)
                    stats["deletes"] += 1
                await asyncio.sleep(0.02)

        task = asyncio.create_task(app())
        try:
            report = await legacy_migration.migrate_legacy(km, workers=2, batch_rows=8)
        finally:
            stop.set()
            await task
        assert report.failed == 0 and stats["updates"] > 5 and stats["deletes"] > 1, stats
        left = await fetch(s.database_url, "SELECT id, provider, api_key FROM settings ORDER BY id")
        assert {r["id"] for r in left} == set(expected)  # no deleted row came back
        for r in left:
            provider, plain = expected[r["id"]]
            assert r["api_key"].startswith("kr1:1:")
            assert await km.decrypt(provider, r["api_key"], context=f"settings.api_key:{r['id']}") == plain
    rep = report.columns["settings.api_key"]
    record(
        "concurrency",
        what="migrate_legacy with an app writer",
        rows=len(rows),
        **stats,
        migrated=rep.migrated,
        left_to_app=len(rep.changed),
    )


async def test_three_workers_two_schedulers_one_run_per_due_rotation(
    env: dict[str, str], tmp_path: Path, record: Callable[..., None]
) -> None:
    senv = scheduler_env(env, KEYROTOR_SCAN_INTERVAL_SECONDS="0.5")
    s = Settings.from_env(senv)
    scopes = [f"tenant-{i:02d}/anthropic" for i in range(sized(12, 60))]
    values = await seed_scopes(s, scopes, 30)
    procs: list[Proc] = []
    try:
        procs += [Proc(senv, tmp_path / f"worker-{i}.log", "worker") for i in range(3)]
        procs += [Proc(senv, tmp_path / f"scheduler-{i}.log", "scheduler") for i in range(2)]
        half = len(scopes) // 2
        due = datetime.now(UTC) - timedelta(minutes=1)
        await fetch(
            s.database_url,
            "UPDATE key_scopes SET next_rotation_at = $2 WHERE name = ANY($1)",
            scopes[:half],
            due,
        )

        async def completed() -> int:
            rows = await fetch(s.database_url, "SELECT count(*) FROM rotations WHERE state = 'completed'")
            return int(rows[0][0])

        deadline = time.monotonic() + 60
        while await completed() < half and time.monotonic() < deadline:
            await asyncio.sleep(0.1)
        # SIGKILL whichever scheduler leads, then make the other half due: the standby takes over.
        leaders = [p for p in procs[3:] if "scheduler_became_leader" in p.output()]
        assert len(leaders) == 1
        leaders[0].kill()
        await fetch(
            s.database_url,
            "UPDATE key_scopes SET next_rotation_at = $2 WHERE name = ANY($1)",
            scopes[half:],
            due,
        )
        deadline = time.monotonic() + 60
        while await completed() < len(scopes) and time.monotonic() < deadline:
            await asyncio.sleep(0.1)
        await asyncio.sleep(2.0)  # a few more scans of the survivor
        runs = await fetch(
            s.database_url,
            "SELECT k.name, count(r.id), k.dek_rotation_count FROM key_scopes k "
            "LEFT JOIN rotations r ON r.scope_id = k.id GROUP BY k.name, k.dek_rotation_count",
        )
        assert {r[0]: (r[1], r[2]) for r in runs} == dict.fromkeys(scopes, (1, 1))
        await assert_no_open_runs(s.database_url)
        for scope, vals in values.items():
            assert await check_values(s, scope, vals) == {2: 30}
        worked = sum("rotation_completed" in p.output() for p in procs[:3])
    finally:
        for p in procs:
            p.close()
        await cleanup_queue(senv["KEYROTOR_QUEUE_NAME"])
    record(
        "concurrency",
        what="3 workers + 2 schedulers (leader SIGKILLed)",
        scopes=len(scopes),
        runs=len(scopes),
        workers_that_rotated=worked,
    )
