"""Crash suite: ``keyrotor worker`` SIGKILLed at random points of every kind of run, and restarted.

For rotate_dek, rotate_kek, retire_dek and migrate_legacy a real worker subprocess is killed
``KILLS`` times at random points (a random fraction of the run's progress, 0 included, plus a
random pause so most kills land inside a batch), then restarted. After the run ends: every
value decrypts to its original, each row is on exactly one DEK version (the one its ciphertext
names), no run or range is left open, and the counts (run, ranges, audit, scope) agree.

Default sizes keep the suite fast; ``KEYROTOR_SLOW_TESTS=1`` runs the issue's full size
(100,000 rows, 20 kill points). The seed of each test is recorded (``KEYROTOR_RELIABILITY_SEED``
replays one).
"""

from __future__ import annotations

import json
import random
import urllib.request
from collections.abc import Awaitable, Callable
from typing import Any

import pytest

from keyrotor import KeyManager, Settings
from keyrotor.census import columns
from keyrotor.queue.client import KeyrotorClient, RunHandle
from tests.conftest import MASTER_KEY
from tests.legacy_helpers import legacy_rows
from tests.reliability.harness import (
    SLOW,
    Workers,
    assert_clean,
    assert_no_leaked_processes,
    assert_no_open_runs,
    crash_loop,
    db_texts,
    key_material,
    redis_payloads,
    seed_scopes,
    sized,
)
from tests.rotation_helpers import check_values, fetch, keyrotor, run_burst_worker, seed
from tests.servers import free_port

KILLS = sized(5, 20)
NEW_KEY = "crash-suite-master-key-v2-7e1d9c3b5a4f6e8d0c2b"


def sized_s(default: str, slow: str) -> str:
    return slow if SLOW else default


def _quiet(s: Settings) -> Settings:
    return s.model_copy(update={"listen_key_changes": False})


def _cli_run_id(*args: str, env: dict[str, str]) -> int:
    out = keyrotor(*args, "--json", env=env)
    assert out.returncode == 0, out.stderr
    doc = json.loads(out.stdout)
    return int(doc.get("id") or doc["run_id"])


async def _client_run_id(env: dict[str, str], ask: Callable[[KeyrotorClient], Awaitable[RunHandle]]) -> int:
    """Start a run as an application would (the enqueue client the CLI uses too)."""
    async with KeyrotorClient(Settings.from_env(env)) as client:
        return (await ask(client)).run_id


async def _hygiene(
    s: Settings, workers: Workers, values: list[str], record: Callable[..., None], **extra: Any
) -> None:
    """No plaintext, DEK, wrapped DEK or master key in logs, Redis, audit rows or run errors;
    and no process of the killed workers left behind."""
    await assert_no_leaked_processes(s.queue_name, workers)
    # The metrics of the last (live) worker: names, labels and values.
    with urllib.request.urlopen(f"http://127.0.0.1:{s.metrics_port}/metrics", timeout=10) as resp:
        metrics = resp.read().decode()
    assert "keyrotor_" in metrics
    forbidden = values + await key_material(s, extra_master_keys=extra.get("masters", ()))
    scanned = assert_clean([workers.output()], forbidden, where="worker logs")
    scanned += assert_clean([metrics], forbidden, where="metric labels and values")
    scanned += assert_clean(await redis_payloads(s.queue_name), forbidden, where="arq payloads in Redis")
    scanned += assert_clean(await db_texts(s.database_url), forbidden, where="audit rows and run errors")
    record("hygiene", needles=len(forbidden), bytes_scanned=scanned)


@pytest.fixture
def wenv(wenv: dict[str, str]) -> dict[str, str]:
    """A metrics port of this test's own (scraped by the hygiene scan), and a 1 s job lease, so
    that a killed worker's job is free again a second after the kill."""
    return {**wenv, "KEYROTOR_METRICS_PORT": str(free_port()), "KEYROTOR_JOB_LEASE_SECONDS": "1"}


async def test_rotate_dek_survives_sigkills(
    wenv: dict[str, str], workers: Workers, rng: random.Random, record: Callable[..., None]
) -> None:
    n = sized(5_000, 100_000)
    env = {
        **wenv,
        "KEYROTOR_SMALL_SCOPE_ROWS": "100",
        "KEYROTOR_REENCRYPT_RANGE_ROWS": str(n // 4),
        "KEYROTOR_REENCRYPT_BATCH_ROWS": str(sized(100, 1_000)),
        # ~25 sequential batches of ~0.25 s: long enough for every kill point to land mid-run.
        "KEYROTOR_TEST_BATCH_DELAY_S": sized_s("0.2", "0.1"),
        "KEYROTOR_WORKER_MAX_JOBS": "2",
    }
    s = Settings.from_env(env)
    values = await seed(s, "anthropic", n)

    async def start() -> int:
        return await _client_run_id(env, lambda c: c.rotate("anthropic"))

    run_id, report = await crash_loop(
        workers, env, s.database_url, start, total=n, kills=KILLS, rng=rng, jitter_s=0.05
    )
    run = (await fetch(s.database_url, "SELECT * FROM rotations WHERE id = $1", run_id))[0]
    # Every row re-encrypted exactly once: compare-and-swap writes counted in their transactions.
    assert (run["rows_done"], run["rows_total"], run["to_version"]) == (n, n, 2)
    ranges = await fetch(
        s.database_url, "SELECT sum(rows_done), count(*) FROM rotation_ranges WHERE run_id = $1", run_id
    )
    assert tuple(ranges[0]) == (n, 4)
    assert await check_values(s, "anthropic", values) == {2: n}
    await assert_no_open_runs(s.database_url)
    scope = (await fetch(s.database_url, "SELECT dek_rotation_count, active_version FROM key_scopes"))[0]
    assert tuple(scope) == (1, 2)
    keys = await fetch(s.database_url, "SELECT version, state FROM data_keys ORDER BY version")
    assert [tuple(k) for k in keys] == [(1, "grace"), (2, "active")]
    audit = await fetch(
        s.database_url, "SELECT count(*) FROM encryption_audit_log WHERE event_type = 'rotate'"
    )
    assert audit[0][0] == 1
    assert report.landed_mid_run == KILLS, report.kills
    record(
        "crash",
        job="rotate_dek",
        rows=n,
        kills=len(report.kills),
        landed_mid_run=report.landed_mid_run,
        attempts=run["attempts"],
        seconds=report.seconds,
        kill_points=report.kills,
    )
    await _hygiene(s, workers, list(values.values()), record)


async def test_rotate_kek_survives_sigkills(
    wenv: dict[str, str], workers: Workers, rng: random.Random, record: Callable[..., None]
) -> None:
    scopes = sized(60, 600)
    per_scope = 5
    s = Settings.from_env(wenv)
    values = await seed_scopes(s, [f"tenant-{i:04d}/openai" for i in range(scopes)], per_scope)
    # Some scopes have a second DEK version: rotate every tenth first.
    async with KeyrotorClient(s) as client:
        handles = [await client.rotate(f"tenant-{i:04d}/openai") for i in range(0, scopes, 10)]
        await run_burst_worker(s)
        for handle in handles:
            await handle.result(timeout_s=30)
    deks = (await fetch(s.database_url, "SELECT count(*) FROM data_keys"))[0][0]
    moved = {
        **wenv,
        "ENCRYPTION_KEY": NEW_KEY,
        "ENCRYPTION_KEY_VERSION": "2",
        "ENCRYPTION_KEYS_PREVIOUS": json.dumps({"1": MASTER_KEY}),
        # A KEK budget slows the rewrap down enough for the kills to land inside it.
        "KEYROTOR_KEK_CALLS_PER_SECOND": sized_s("40", "200"),
        "KEYROTOR_KEK_REWRAP_BATCH": "4",
    }

    async def start() -> int:
        return await _client_run_id(moved, lambda c: c.rotate_kek())

    run_id, report = await crash_loop(
        workers, moved, s.database_url, start, total=deks, kills=KILLS, rng=rng, jitter_s=0.05
    )
    run = (await fetch(s.database_url, "SELECT * FROM rotations WHERE id = $1", run_id))[0]
    assert (run["rows_done"], run["to_version"]) == (deks, 2)
    assert run["rows_total"] in (deks, None) or run["rows_total"] <= deks
    keys = await fetch(s.database_url, "SELECT kek_version, count(*) FROM data_keys GROUP BY 1")
    assert [tuple(k) for k in keys] == [(2, deks)]
    # One rewrap audit event per DEK: a killed batch wrote neither its keys nor its events.
    audit = await fetch(
        s.database_url, "SELECT count(*) FROM encryption_audit_log WHERE event_type = 'rewrap'"
    )
    assert audit[0][0] == deks
    await assert_no_open_runs(s.database_url)
    only_new = Settings.from_env({**wenv, "ENCRYPTION_KEY": NEW_KEY, "ENCRYPTION_KEY_VERSION": "2"})
    for i, (scope, vals) in enumerate(values.items()):
        assert await check_values(only_new, scope, vals) == {2 if i % 10 == 0 else 1: per_scope}
    assert report.landed_mid_run == KILLS, report.kills
    record(
        "crash",
        job="rotate_kek",
        rows=deks,
        unit="DEKs",
        kills=len(report.kills),
        landed_mid_run=report.landed_mid_run,
        attempts=run["attempts"],
        seconds=report.seconds,
        kill_points=report.kills,
    )
    flat = [v for vals in values.values() for v in vals.values()]
    await _hygiene(only_new, workers, flat, record, masters=[MASTER_KEY])


async def test_retire_dek_survives_sigkills(
    wenv: dict[str, str], workers: Workers, rng: random.Random, record: Callable[..., None]
) -> None:
    n = sized(1_000, 100_000)
    # A restarted worker's row budget starts full: it may re-encrypt one second's worth (150
    # rows) at once, before the next kill. 2,000 rows keep five such bursts after kill points
    # of at most 0.7 short of the end, so every kill lands mid-run; with 1,000 the run could
    # finish before the last kill.
    stragglers = sized(2_000, 20_000)
    s = Settings.from_env({**wenv, "KEYROTOR_ACTIVE_VERSION_TTL_SECONDS": "3600"})
    async with KeyManager(_quiet(s)) as stale:
        await stale.encrypt("openai", "warm-up", context="secret:warm-up")  # caches v1 as active for an hour
        values = await seed(s, "openai", n)
        async with KeyrotorClient(s) as client:
            handle = await client.rotate("openai")
            await run_burst_worker(s)
            await handle.result(timeout_s=30)
        # A process with a stale cache keeps writing under v1: stragglers for retirement.
        late = {f"late{i:06d}": f"sk-proj-late-{i:06d}-{rng.getrandbits(96):024x}" for i in range(stragglers)}
        items = list(late.items())
        for i in range(0, len(items), 5_000):
            await stale.put_secrets("openai", items[i : i + 5_000])
    values.update(late)
    assert await check_values(s, "openai", values) == {2: n, 1: stragglers}
    env = {
        **wenv,
        "KEYROTOR_REENCRYPT_BATCH_ROWS": str(sized(50, 500)),
        "KEYROTOR_REENCRYPT_ROWS_PER_SECOND": str(sized(150, 2_000)),
    }

    async def start() -> int:
        return await _client_run_id(env, lambda c: c.retire("openai", 1, force_now=True))

    run_id, report = await crash_loop(
        workers, env, s.database_url, start, total=stragglers, kills=KILLS, rng=rng, jitter_s=0.03
    )
    run = (await fetch(s.database_url, "SELECT * FROM rotations WHERE id = $1", run_id))[0]
    assert run["kind"] == "retire" and run["rows_done"] == stragglers
    assert await check_values(s, "openai", values) == {2: n + stragglers}
    key = (await fetch(s.database_url, "SELECT * FROM data_keys WHERE version = 1"))[0]
    # Retired (decrypt-only), its wrapped key kept for the destruction window.
    assert key["state"] == "retired" and key["encrypted_dek"] is not None and key["destroy_after"] is not None
    audit = await fetch(
        s.database_url, "SELECT count(*) FROM encryption_audit_log WHERE event_type = 'retire'"
    )
    assert audit[0][0] == 1
    await assert_no_open_runs(s.database_url)
    assert report.landed_mid_run == KILLS, report.kills
    record(
        "crash",
        job="retire_dek",
        rows=stragglers,
        kills=len(report.kills),
        landed_mid_run=report.landed_mid_run,
        attempts=run["attempts"],
        seconds=report.seconds,
        kill_points=report.kills,
    )
    await _hygiene(s, workers, list(values.values()), record)


async def test_migrate_legacy_survives_sigkills(
    wenv: dict[str, str], workers: Workers, rng: random.Random, record: Callable[..., None]
) -> None:
    # Every legacy value costs a scrypt (~50 ms of CPU): sizes are small by nature.
    n = sized(90, 600)
    # One scrypt process: each restart spawns the pool again, and a spawn costs seconds here.
    env = {**wenv, "KEYROTOR_LEGACY_BATCH_ROWS": "6", "KEYROTOR_LEGACY_WORKERS": sized_s("1", "2")}
    s = Settings.from_env(env)
    rows = legacy_rows(n)
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
    async with KeyManager(_quiet(s)) as km:
        await columns.register(km.sessions, "settings.api_key", pk="id", scope_column="provider")

    async def start() -> int:
        return _cli_run_id("legacy", "migrate", env=env)

    run_id, report = await crash_loop(
        workers, env, s.database_url, start, total=n, kills=KILLS, rng=rng, jitter_s=0.1
    )
    run = (await fetch(s.database_url, "SELECT * FROM rotations WHERE id = $1", run_id))[0]
    assert run["kind"] == "legacy" and run["rows_done"] == n
    async with KeyManager(_quiet(s)) as km:
        for row in await fetch(s.database_url, "SELECT id, provider, api_key FROM settings"):
            provider, plain = expected[row["id"]]
            assert row["api_key"].startswith("kr1:1:"), row["id"]
            assert (
                await km.decrypt(provider, row["api_key"], context=f"settings.api_key:{row['id']}") == plain
            )
    await assert_no_open_runs(s.database_url)
    assert report.landed_mid_run == KILLS, report.kills
    record(
        "crash",
        job="migrate_legacy",
        rows=n,
        kills=len(report.kills),
        landed_mid_run=report.landed_mid_run,
        attempts=run["attempts"],
        seconds=report.seconds,
        kill_points=report.kills,
    )
    await _hygiene(s, workers, [r[1] for r in rows], record)
