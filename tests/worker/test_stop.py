"""A worker told to stop (SIGTERM) stops within its grace plus a bounded margin, whatever its jobs
wait on, and loses nothing: a protected step still running when the grace ends is cancelled and
rolls back, and the run resumes from its last commit on the next worker."""

from __future__ import annotations

import asyncio
import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import asyncpg

from keyrotor import Settings
from keyrotor.worker.stopping import EXIT_STEPS_CANCELLED, EXIT_STOP_OVERDUE, STOP_MARGIN_S
from tests.rotation_helpers import WorkerProcess, check_values, fetch, keyrotor, process_env, seed
from tests.worker.test_rotation_worker import run_state, start, wait_for

GRACE_S = 2.0


async def _wait_blocked_by(database_url: str, pid: int, *, want: bool, timeout_s: float = 20) -> None:
    """Wait until some backend is (``want``) or no backend is (not ``want``) waiting on ``pid``'s locks."""
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        rows = await fetch(
            database_url, "SELECT count(*) FROM pg_stat_activity WHERE $1 = ANY(pg_blocking_pids(pid))", pid
        )
        if (rows[0][0] > 0) == want:
            return
        await asyncio.sleep(0.05)
    raise AssertionError(
        f"no change within {timeout_s}s: a backend {'is not' if want else 'is still'} blocked"
    )


async def test_a_protected_step_stuck_on_a_lock_is_cancelled_after_the_grace_and_the_run_resumes(
    wenv: dict[str, str], workers: list[WorkerProcess], tmp_path: Path
) -> None:
    env = {
        **wenv,
        "KEYROTOR_SMALL_SCOPE_ROWS": "100",
        "KEYROTOR_REENCRYPT_BATCH_ROWS": "200",
        "KEYROTOR_TEST_BATCH_DELAY_S": "0.1",
        "KEYROTOR_WORKER_STOP_GRACE_SECONDS": str(GRACE_S),
        "KEYROTOR_METRICS_PORT": "0",
    }
    settings = Settings.from_env(env)
    values = await seed(settings, "openai", 3000)
    worker = start(workers, env, tmp_path)
    await worker.wait_started()
    asked = keyrotor("rotate", "openai", "--json", env=env)
    assert asked.returncode == 0, asked.stderr
    run_id = json.loads(asked.stdout)["id"]
    await wait_for(settings.database_url, "openai", rows_done=400)

    # Hold the run row as another transaction would: the range's next batch (a protected step)
    # needs it for the run's counters, just before its commit, and waits for it without limit.
    holder = await asyncpg.connect(settings.database_url)
    try:
        tx = holder.transaction()
        await tx.start()
        await holder.execute("SELECT 1 FROM rotations WHERE id = $1 FOR UPDATE", run_id)
        await _wait_blocked_by(settings.database_url, holder.get_server_pid(), want=True)

        t0 = time.monotonic()
        worker.proc.send_signal(signal.SIGTERM)
        try:
            code = worker.proc.wait(GRACE_S + STOP_MARGIN_S + 3)
        except subprocess.TimeoutExpired:
            raise AssertionError(f"the worker did not stop:\n{worker.output()[-3000:]}") from None
        took = time.monotonic() - t0
        assert took >= GRACE_S - 0.2, took  # the step had its grace
        assert took < GRACE_S + STOP_MARGIN_S, took
        assert code == EXIT_STEPS_CANCELLED, worker.output()[-3000:]  # forced: a protected step was cancelled
        events = worker.events()
        names = [e.get("event") for e in events]
        assert "worker_stop_grace_expired" in names and "worker_stopped" in names
        cancelled = [e for e in events if e.get("event") == "protected_step_cancelled"]
        assert cancelled and cancelled[0]["outcome"] == "rolled_back", cancelled
        assert cancelled[0]["step"] == "reencrypt" and cancelled[0]["job"] == "reencrypt_range"

        # The step's transaction rolled back (its backend no longer waits on the lock) with
        # nothing half-written: the rows on v2 are exactly the run's committed counters.
        await _wait_blocked_by(settings.database_url, holder.get_server_pid(), want=False)
        await tx.rollback()
    finally:
        await holder.close()
    run = await run_state(settings.database_url, "openai")
    assert run is not None and run["state"] == "running"
    on_v2 = await fetch(settings.database_url, "SELECT count(*) FROM secrets WHERE dek_version = 2")
    assert on_v2[0][0] == run["rows_done"] and run["rows_done"] % 200 == 0

    again = start(workers, {**env, "KEYROTOR_TEST_BATCH_DELAY_S": "0"}, tmp_path)
    await again.wait_started()
    done = await wait_for(settings.database_url, "openai", state="completed")
    assert done["id"] == run_id and done["rows_done"] == 3000
    assert await check_values(settings, "openai", values) == {2: 3000}
    assert again.terminate() == 0  # nothing to wait for: a clean stop


def test_the_watchdog_ends_a_stop_that_overruns_its_limit(tmp_path: Path) -> None:
    # The event loop blocked for good (a synchronous call that never returns): only the
    # watchdog's thread can still end the process, at the grace plus STOP_MARGIN_S.
    script = (
        "import asyncio, time\n"
        "from keyrotor.worker.stopping import Stop\n"
        "async def main():\n"
        "    stop = Stop(0.5, hard_exit=True, unwritten_audit=lambda: 7)\n"
        "    stop.begin('SIGTERM', 1)\n"
        "    stop.stage = 'shutdown: KeyManager (usage counts, audit writer)'\n"
        "    time.sleep(60)\n"
        "asyncio.run(main())\n"
    )
    t0 = time.monotonic()
    done = subprocess.run(
        [sys.executable, "-c", script],
        env=process_env({}),
        capture_output=True,
        text=True,
        timeout=0.5 + STOP_MARGIN_S + 20,
        check=False,
    )
    took = time.monotonic() - t0
    assert done.returncode == EXIT_STOP_OVERDUE, done.stdout + done.stderr
    assert 0.5 + STOP_MARGIN_S - 0.5 < took < 0.5 + STOP_MARGIN_S + 10, took
    out = done.stdout + done.stderr
    assert "worker_stop_overdue" in out and "audit writer" in out and "7" in out
