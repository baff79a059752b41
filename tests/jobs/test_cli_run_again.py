"""The real CLI: ``legacy migrate --wait`` after a failure runs again; ``retire --timeout``."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

from keyrotor import KeyManager
from keyrotor.census import columns
from keyrotor.queue.client import KeyrotorClient
from tests.jobs.conftest import settings_of
from tests.jobs.test_legacy_migration import _app, _quiet
from tests.legacy_helpers import legacy_rows
from tests.rotation_helpers import WorkerProcess, fetch, keyrotor, run_burst_worker

WRONG = "not-the-old-backends-master-key-at-all"


async def _registered(s_env: dict[str, str], n: int) -> None:
    s = settings_of(s_env)
    await _app(s, legacy_rows()[:n])
    async with KeyManager(_quiet(s)) as km:
        await columns.register(km.sessions, "settings.api_key", pk="id", scope_column="provider")


async def test_legacy_migrate_after_a_failed_run_runs_again(wenv: dict[str, str], tmp_path: Path) -> None:
    env = {**wenv, "KEYROTOR_LEGACY_WORKERS": "1", "KEYROTOR_LEGACY_RANGE_ROWS": "0"}
    await _registered(env, 12)
    bad = {**env, "KEYROTOR_LEGACY_KEY": WRONG}
    worker = WorkerProcess(bad, tmp_path / "bad.log")
    try:
        await worker.wait_started()
        first = keyrotor("legacy", "migrate", "--wait", "--timeout", "60", env=bad)
        assert first.returncode == 1 and "run 1 failed" in first.stderr, first.stderr
        # Right after: a new run, which fails on its own (still the wrong key), not run 1's failure.
        second = keyrotor("legacy", "migrate", "--wait", "--timeout", "60", env=bad)
        assert second.returncode == 1 and "run 2 failed" in second.stderr, second.stderr
    finally:
        worker.close()
    worker = WorkerProcess(env, tmp_path / "good.log")
    try:
        await worker.wait_started()
        third = keyrotor("legacy", "migrate", "--wait", "--json", "--timeout", "60", env=env)
    finally:
        worker.close()
    assert third.returncode == 0, third.stderr
    doc = json.loads(third.stdout)
    assert doc["run_id"] == 3 and doc["state"] == "completed" and doc["migrated"] == 12 and not doc["joined"]
    states = await fetch(env["DATABASE_URL"], "SELECT id, state FROM rotations ORDER BY id")
    assert [tuple(r) for r in states] == [(1, "failed"), (2, "failed"), (3, "completed")]


async def test_joining_an_open_run_whose_driver_failed_drives_it_again(
    wenv: dict[str, str], tmp_path: Path
) -> None:
    # A job timeout far below one batch's scrypt work (~28 ms a value on one pool process):
    # every driver of the run fails with a timeout while the run stays open.
    env = {**wenv, "KEYROTOR_LEGACY_WORKERS": "1", "KEYROTOR_LEGACY_RANGE_ROWS": "0"}
    await _registered(env, 64)
    short = {**env, "KEYROTOR_JOB_TIMEOUT_SECONDS": "0.3", "KEYROTOR_LEGACY_BATCH_ROWS": "64"}
    worker = WorkerProcess(short, tmp_path / "short.log")
    try:
        await worker.wait_started()
        for _ in range(2):  # the run's driver, then the re-drive that joining enqueues: both fail
            out = keyrotor("legacy", "migrate", "--wait", "--timeout", "60", env=short)
            assert out.returncode == 1 and "job failed with TimeoutError" in out.stderr, out.stderr
    finally:
        worker.close()
    run = (await fetch(env["DATABASE_URL"], "SELECT state FROM rotations WHERE id = 1"))[0]
    assert run["state"] in ("pending", "running")  # open: only its jobs failed
    worker = WorkerProcess(env, tmp_path / "good.log")
    try:
        await worker.wait_started()
        # Joins run 1 and follows a driver of its own, not the failures kept from before.
        again = keyrotor("legacy", "migrate", "--wait", "--json", "--timeout", "90", env=env)
    finally:
        worker.close()
    assert again.returncode == 0, again.stderr
    doc = json.loads(again.stdout)
    assert doc["run_id"] == 1 and doc["joined"] and doc["state"] == "completed" and doc["migrated"] == 64


async def test_retire_always_waits_and_its_timeout_says_the_run_goes_on(wenv: dict[str, str]) -> None:
    s = settings_of(wenv)
    async with KeyManager(_quiet(s)) as km:
        await km.put_secret("openai", "prod", "sk-proj-retire-timeout-0001-8c2e4a")
    async with KeyrotorClient(s) as client:
        handle = await client.rotate("openai")
        await run_burst_worker(s)
        await handle.result(timeout_s=10)
    # Three commands at once (each a Python start-up of 1-2 s): the help and the refused
    # timeout never reach the database, so neither touches what the third one waits on.
    helped, out, bad = await asyncio.gather(
        asyncio.to_thread(keyrotor, "retire", "--help", env=wenv),
        # No worker runs: the retirement stays pending and the command gives up waiting, in one line.
        asyncio.to_thread(keyrotor, "retire", "openai", "1", "--force-now", "--timeout", "0.5", env=wenv),
        asyncio.to_thread(keyrotor, "retire", "openai", "1", "--timeout", "-1", env=wenv),
    )
    helptext = helped.stdout
    assert "--wait" not in helptext and "stop waiting after" in " ".join(helptext.split())
    assert out.returncode == 1
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1 and "did not end within 0.5s; it goes on on the workers" in lines[0], out.stderr
    assert bad.returncode == 2 and "Traceback" not in bad.stderr
    # The run went on: a worker completes it.
    await run_burst_worker(s)
    run = (await fetch(s.database_url, "SELECT state FROM rotations WHERE kind = 'retire'"))[0]
    assert run["state"] == "completed"
