"""Runs that meet a permanent error end visibly: failed with their error, and never re-driven.

A registered column whose table refuses every UPDATE with SQLSTATE 22003 (numeric value out of
range: the DataError an int4 key used to raise) stands for any permanent database error. The
rotation (in one transaction and in ranges), the retirement and the legacy migration each end
``failed`` with the error, the CLI exits 1 with it in one line, and a worker starting later
adopts none of them.
"""

from __future__ import annotations

import asyncio
import json
import time
from pathlib import Path
from typing import Any

import redis.asyncio as aioredis

from keyrotor import KeyManager, Settings
from tests.legacy_helpers import legacy_rows
from tests.rotation_helpers import WORKER_REDIS_URL, WorkerProcess, fetch, keyrotor

REFUSE = (
    """CREATE FUNCTION refuse_update() RETURNS trigger LANGUAGE plpgsql AS $$
    BEGIN
      RAISE EXCEPTION 'value out of range for type integer' USING ERRCODE = '22003';
    END $$""",
    "CREATE TRIGGER refuse BEFORE UPDATE ON settings FOR EACH ROW EXECUTE FUNCTION refuse_update()",
)


def _error_line(stderr: str) -> str:
    lines = [line for line in stderr.splitlines() if line.startswith("keyrotor: error:")]
    assert len(lines) == 1, stderr
    assert "Traceback" not in stderr
    return lines[0]


async def _runs(s: Settings) -> dict[int, tuple[str, str | None, int]]:
    rows = await fetch(s.database_url, "SELECT id, state, error, attempts FROM rotations ORDER BY id")
    return {r["id"]: (r["state"], r["error"], r["attempts"]) for r in rows}


async def _queued_jobs(queue: str) -> int:
    """How many jobs wait in arq's queue (a sorted set named after the queue), deferred ones too."""
    client: Any = aioredis.Redis.from_url(WORKER_REDIS_URL)
    try:
        return int(await client.zcard(queue))
    finally:
        await client.aclose()


async def test_permanent_errors_fail_the_run_once_and_adoption_leaves_it(
    wenv: dict[str, str], workers: list[WorkerProcess], tmp_path: Path
) -> None:
    env = {**wenv, "KEYROTOR_SMALL_SCOPE_ROWS": "8", "KEYROTOR_REENCRYPT_RANGE_ROWS": "4"}
    s = Settings.from_env(env)
    await fetch(
        s.database_url, "CREATE TABLE settings (id serial PRIMARY KEY, provider text NOT NULL, api_key text)"
    )
    plain: dict[int, tuple[str, str]] = {}
    async with KeyManager(s.model_copy(update={"listen_key_changes": False})) as km:
        for i, provider in enumerate(["openai"] * 12 + ["anthropic"] * 3):
            row_id = (
                await fetch(
                    s.database_url, "INSERT INTO settings (provider) VALUES ($1) RETURNING id", provider
                )
            )[0][0]
            plain[row_id] = (provider, f"sk-proj-{i:04d}-failure-test")
            token = await km.encrypt(provider, plain[row_id][1], context=f"settings.api_key:{row_id}")
            await fetch(s.database_url, "UPDATE settings SET api_key = $2 WHERE id = $1", row_id, token)
    legacy = legacy_rows(4)
    await fetch(
        s.database_url,
        "INSERT INTO settings (provider, api_key) SELECT * FROM unnest($1::text[], $2::text[])",
        [r[0] for r in legacy],
        [r[2] for r in legacy],
    )
    reg = keyrotor(
        "columns", "register", "settings.api_key", "--pk", "id", "--scope-column", "provider", env=env
    )
    assert reg.returncode == 0, reg.stderr
    for ddl in REFUSE:
        await fetch(s.database_url, ddl)
    before = await fetch(s.database_url, "SELECT id, api_key FROM settings ORDER BY id")

    w1 = WorkerProcess(env, tmp_path / "w1.log")
    workers.append(w1)
    await w1.wait_started()
    # anthropic (3 rows) in one transaction, openai (12) in ranges: both fail, once.
    for scope in ("anthropic", "openai"):
        out = keyrotor("rotate", scope, "--wait", "--timeout", "60", env=env, timeout=90)
        assert out.returncode == 1, out.stderr + w1.output()[-2000:]
        line = _error_line(out.stderr)
        assert "failed: StoreRejected: database refused the statement" in line and "SQLSTATE 22003" in line
    # openai's v1 is in grace (the ranged run promoted v2): retiring it meets the same refusal.
    out = keyrotor("retire", "openai", "1", "--force-now", "--timeout", "60", env=env, timeout=90)
    assert out.returncode == 1, out.stderr + w1.output()[-2000:]
    assert "SQLSTATE 22003" in _error_line(out.stderr)
    out = keyrotor("legacy", "migrate", "--wait", "--timeout", "60", env=env, timeout=90)
    assert out.returncode == 1, out.stderr + w1.output()[-2000:]
    assert "SQLSTATE 22003" in _error_line(out.stderr)

    failed = await _runs(s)
    assert len(failed) == 4
    for state, error, attempts in failed.values():
        assert state == "failed" and error is not None and "SQLSTATE 22003" in error
        assert attempts == 1
        assert not any(p in error for _prov, p in plain.values())
    assert await fetch(s.database_url, "SELECT id, api_key FROM settings ORDER BY id") == before

    # A worker starting now adopts no run (start-up adoption), and nothing drives them again.
    w1.close()
    w2 = WorkerProcess(env, tmp_path / "w2.log")
    workers.append(w2)
    await w2.wait_started()
    started = next(e for e in w2.events() if e.get("event") == "worker_started")
    assert started["open_runs"] == 0
    # With no run adopted, only a job still in the queue could drive a run again: a retry
    # waiting out its backoff, or a job of the killed w1 whose "in progress" marker expires
    # within one lease. The queue is empty, so neither exists; the watch below still covers one
    # lease and a margin past the longest retry backoff (1 s), the longest either takes to show.
    assert await _queued_jobs(env["KEYROTOR_QUEUE_NAME"]) == 0
    deadline = time.monotonic() + float(env["KEYROTOR_JOB_LEASE_SECONDS"]) + 2
    while time.monotonic() < deadline:
        assert await _runs(s) == failed
        await asyncio.sleep(0.5)
    assert '"job_retry"' not in w1.output() + w2.output()  # permanent: never retried
    runs = json.loads(keyrotor("runs", "--json", env=env).stdout)["runs"]
    assert {r["state"] for r in runs} == {"failed"}
