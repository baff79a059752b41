"""The scheduler as real processes: concurrent ``--once`` runs, leader and hot standby (SIGKILL
the leader), and end to end with a real worker."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import time
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from keyrotor import Settings
from tests.rotation_helpers import BIN, check_values, keyrotor, seed
from tests.scheduler.conftest import Proc, queued_jobs, seed_scopes, sql
from tests.scheduler.test_scan import rotate_jobs


async def wait_until(predicate: Any, timeout_s: float, what: str) -> float:
    """Poll ``await predicate()`` until truthy; returns the seconds it took."""
    started = time.monotonic()
    while time.monotonic() - started < timeout_s:
        if await predicate():
            return time.monotonic() - started
        await asyncio.sleep(0.05)
    raise AssertionError(f"timed out after {timeout_s}s waiting for {what}")


async def test_two_once_processes_enqueue_each_rotation_once(senv: dict[str, str], rq: Any) -> None:
    url = senv["DATABASE_URL"]
    due = await seed_scopes(url, 400, due_at=datetime.now(UTC) - timedelta(hours=2))
    env = {
        "PATH": os.environ.get("PATH", ""),
        "HOME": os.environ.get("HOME", "/root"),
        **senv,
        "KEYROTOR_SCAN_BATCH_SIZE": "25",
    }
    procs = [
        subprocess.Popen(
            [str(BIN), "scheduler", "--once", "--json"],
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.DEVNULL,
            text=True,
        )
        for _ in range(2)
    ]
    outputs = [p.communicate(timeout=60)[0] for p in procs]
    assert [p.returncode for p in procs] == [0, 0]
    reports = [json.loads(o) for o in outputs]
    opened = sorted(r["scope"] for rep in reports for r in rep["rotations"])
    print("rotations opened per process:", [len(rep["rotations"]) for rep in reports])
    assert opened == due
    assert rotate_jobs(await queued_jobs(rq, senv["KEYROTOR_QUEUE_NAME"])) == dict.fromkeys(due, 1)
    runs = await sql(url, "SELECT scope_id, count(*) FROM rotations GROUP BY scope_id HAVING count(*) > 1")
    assert runs == []
    # One replica check for the hour, whichever process got there first.
    assert sum(r["replica_job"] is not None for r in reports) == 1


async def test_two_schedulers_one_leads_the_standby_takes_over_within_an_interval(
    senv: dict[str, str], rq: Any, procs: list[Proc], tmp_path: Path
) -> None:
    url = senv["DATABASE_URL"]
    env = {**senv, "KEYROTOR_SCAN_INTERVAL_SECONDS": "1"}
    key = senv["KEYROTOR_SCHEDULER_LEADER_KEY"]
    a, b, leader = _two_schedulers(env, tmp_path, procs, rq, key)

    await wait_until(leader, 30, "a leader")
    first = await leader()
    assert first is not None
    standby = b if first is a else a
    # The leader scans and enqueues; the standby does not.
    due = await seed_scopes(url, 3, due_at=datetime.now(UTC) - timedelta(minutes=1))
    queue = senv["KEYROTOR_QUEUE_NAME"]

    async def enqueued(n: int) -> bool:
        return sum(rotate_jobs(await queued_jobs(rq, queue)).values()) >= n

    await wait_until(lambda: enqueued(3), 5, "the leader to enqueue")
    await asyncio.sleep(1.5)  # a few more ticks of both
    assert "run_enqueued" in first.output() and "run_enqueued" not in standby.output()
    assert "scheduler_became_leader" not in standby.output()

    first.kill()
    took = await wait_until(lambda: _is(leader, standby), 10, "the standby to take over")
    print(f"takeover after SIGKILL: {took:.2f}s")
    # Within one scan interval (the standby's next tick), plus half an interval for a loaded machine.
    assert took <= 1.5, f"takeover took {took:.2f}s with a 1 s scan interval"
    assert "scheduler_became_leader" in standby.output()
    more = await seed_scopes(url, 2, due_at=datetime.now(UTC) - timedelta(seconds=1), prefix="more")
    await wait_until(lambda: enqueued(5), 5, "the new leader to enqueue")
    assert rotate_jobs(await queued_jobs(rq, queue)) == dict.fromkeys(due + more, 1)
    assert standby.terminate() == 0
    # A clean exit with no standby left marks the leader key as stepping down, for one interval.
    assert (await rq.get(key)).decode() == f"{_instance(standby)} (stepping down)"
    assert 0 < await rq.pttl(key) <= 5_000
    await wait_until(lambda: _gone(rq, key), 10, "the stepping-down mark to expire")


def _two_schedulers(
    env: dict[str, str], tmp_path: Path, procs: list[Proc], rq: Any, key: str
) -> tuple[Proc, Proc, Callable[[], Awaitable[Proc | None]]]:
    """Two ``keyrotor scheduler`` processes, and a function naming the one the leader key names."""
    a = Proc(env, tmp_path / "a.log", "scheduler")
    b = Proc(env, tmp_path / "b.log", "scheduler")
    procs += [a, b]

    async def leader() -> Proc | None:
        value = await rq.get(key)
        return None if value is None else next((p for p in (a, b) if f":{p.pid}:" in value.decode()), None)

    return a, b, leader


def _instance(proc: Proc) -> str:
    """The instance id ``proc`` logged when it started."""
    for line in proc.output().splitlines():
        if '"scheduler_started"' in line:
            return str(json.loads(line)["instance"])
    raise AssertionError("the scheduler did not log scheduler_started")


async def _gone(rq: Any, key: str) -> bool:
    return bool(await rq.get(key) is None)


async def _is(leader: Any, proc: Proc) -> bool:
    return bool(await leader() is proc)


async def test_a_leader_stopped_cleanly_hands_over_at_once_and_health_never_fails(
    senv: dict[str, str], rq: Any, procs: list[Proc], tmp_path: Path
) -> None:
    """SIGTERM is an orderly handover: the standby takes the lead at once, not at its next scan,
    and `keyrotor health`'s scheduler check stays green throughout."""
    from keyrotor.worker.cli.health import scheduler_health

    # A scan interval long enough that a takeover at the standby's next tick would show.
    env = {**senv, "KEYROTOR_SCAN_INTERVAL_SECONDS": "6"}
    key = senv["KEYROTOR_SCHEDULER_LEADER_KEY"]
    settings = Settings.from_env(env)
    a, b, leader = _two_schedulers(env, tmp_path, procs, rq, key)
    await wait_until(leader, 30, "a leader")
    first = await leader()
    assert first is not None
    standby = b if first is a else a
    # Both have their leadership connection (the standby's first tick ran).
    await wait_until(lambda: _sessions(senv["DATABASE_URL"], 2), 30, "both schedulers' connections")

    failures: list[dict[str, Any]] = []

    async def sample() -> None:
        while True:
            result = await scheduler_health(settings, rq)
            if result["status"] == "fail":
                failures.append(result)
            await asyncio.sleep(0.02)

    sampler = asyncio.create_task(sample())
    try:
        await asyncio.sleep(0.2)
        first.proc.send_signal(signal.SIGTERM)
        took = await wait_until(lambda: _is(leader, standby), 10, "the standby to take over")
        await wait_until(lambda: _exited(first), 20, "the old leader to exit")
        await asyncio.sleep(0.3)
    finally:
        sampler.cancel()
    print(f"handover after SIGTERM: {took:.2f}s")
    assert first.proc.returncode == 0
    assert took < 2.0, f"the standby took {took:.2f}s (its scan interval is 6 s)"
    assert failures == [], failures[:3]
    assert "scheduler_became_leader" in standby.output()


async def _sessions(database_url: str, n: int) -> bool:
    found = await sql(
        database_url,
        "SELECT count(*) FROM pg_stat_activity WHERE application_name = 'keyrotor-scheduler' "
        "AND datname = current_database()",
    )
    return int(found[0][0]) >= n


async def _exited(proc: Proc) -> bool:
    return proc.proc.poll() is not None


async def test_a_hung_leader_loses_the_lead_to_the_standby_and_stays_standby_when_it_wakes(
    senv: dict[str, str], rq: Any, procs: list[Proc], tmp_path: Path
) -> None:
    """SIGSTOP keeps the leader's socket (and so its session lock) open; its lease must lapse."""
    env = {**senv, "KEYROTOR_SCAN_INTERVAL_SECONDS": "1", "KEYROTOR_SCHEDULER_LEADER_TIMEOUT_SECONDS": "3"}
    key = senv["KEYROTOR_SCHEDULER_LEADER_KEY"]
    a, b, leader = _two_schedulers(env, tmp_path, procs, rq, key)

    await wait_until(leader, 30, "a leader")
    hung = await leader()
    assert hung is not None
    standby = b if hung is a else a
    os.kill(hung.pid, signal.SIGSTOP)
    try:
        # The lease (3 s without a ping) lapses, then the standby's next tick (1 s) takes the lock.
        took = await wait_until(lambda: _is(leader, standby), 20, "the standby to take over")
        print(f"takeover from a hung leader: {took:.2f}s")
        # The heartbeat names the new leader a moment before its log line reaches the file.
        await wait_until(lambda: _has(standby, "scheduler_became_leader"), 5, "the standby to say so")
    finally:
        os.kill(hung.pid, signal.SIGCONT)
    # The old leader wakes up, finds its session gone, and does not lead again.
    await wait_until(lambda: _has(hung, "scheduler_lost_leadership"), 15, "the old leader to notice")
    await asyncio.sleep(2.5)  # a few ticks of both
    assert await leader() is standby
    assert hung.output().count("scheduler_became_leader") == 1
    assert hung.terminate() == 0 and standby.terminate() == 0


async def _has(proc: Proc, event: str) -> bool:
    return event in proc.output()


async def test_end_to_end_a_scope_made_due_is_rotated_with_no_other_action(
    senv: dict[str, str], rq: Any, procs: list[Proc], tmp_path: Path
) -> None:
    url = senv["DATABASE_URL"]
    env = {**senv, "KEYROTOR_SCAN_INTERVAL_SECONDS": "1"}
    settings = Settings.from_env(env)
    values = await seed(settings, "anthropic", 50)
    await seed(settings, "openai", 5)
    procs.append(Proc(env, tmp_path / "worker.log", "worker"))
    procs.append(Proc(env, tmp_path / "scheduler.log", "scheduler"))
    await wait_until(lambda: _leads(rq, senv), 30, "the scheduler to lead")

    res = keyrotor("policy", "set", "anthropic", "--next-rotation-at", "2020-01-01T00:00:00Z", env=env)
    assert res.returncode == 0, res.stderr
    made_due = time.monotonic()

    async def rotated() -> bool:
        rows = await sql(
            url,
            "SELECT r.state FROM rotations r JOIN key_scopes s ON s.id = r.scope_id "
            "WHERE s.name = 'anthropic'",
        )
        return [r[0] for r in rows] == ["completed"]

    async def opened() -> bool:
        return bool(await sql(url, "SELECT 1 FROM rotations"))

    await wait_until(opened, 10, "the scheduler to open the rotation")
    opened_after = time.monotonic() - made_due
    await wait_until(rotated, 30, "the rotation to complete")
    rotated_after = time.monotonic() - made_due
    print(f"rotation opened {opened_after:.2f}s, completed {rotated_after:.2f}s after the scope came due")
    # Within two scan intervals (1 s each), plus half an interval for a loaded machine.
    assert opened_after <= 2.5, f"opened {opened_after:.2f}s after it came due (scan interval 1 s)"
    assert rotated_after <= 2.5, f"rotated {rotated_after:.2f}s after it came due (scan interval 1 s)"
    assert await check_values(settings, "anthropic", values) == {2: 50}
    (scope,) = await sql(
        url,
        "SELECT active_version, dek_rotation_count, next_rotation_at - last_rotation_at, "
        "(SELECT trigger FROM rotations) FROM key_scopes WHERE name = 'anthropic'",
    )
    assert tuple(scope) == (2, 1, timedelta(days=90), "schedule")
    # openai was not due: untouched.
    assert (await sql(url, "SELECT active_version FROM key_scopes WHERE name = 'openai'"))[0][0] == 1
    status = json.loads(keyrotor("status", "anthropic", "--json", env=env).stdout)["scopes"][0]
    assert status["next_rotation_at"] is not None and status["run"] is None and status["queued"] is False


async def _leads(rq: Any, senv: dict[str, str]) -> bool:
    return bool(await rq.get(senv["KEYROTOR_SCHEDULER_LEADER_KEY"]))


async def test_scheduler_killed_mid_scan_and_restarted_queues_each_rotation_once(
    senv: dict[str, str], rq: Any, procs: list[Proc], tmp_path: Path
) -> None:
    """SIGKILL a `scheduler --once` in the middle of a large catch-up, run it again: every due scope
    has exactly one run and at most one queued job; the workers' adoption (the same enqueue, run
    here for every open run) queues the runs the dead process opened but never enqueued, once."""
    from keyrotor import runs
    from keyrotor.queue.enqueue import enqueue_driver
    from keyrotor.store import db
    from keyrotor.worker.scheduler import Scheduler

    url, queue = senv["DATABASE_URL"], senv["KEYROTOR_QUEUE_NAME"]
    due = await seed_scopes(url, 4_000, due_at=datetime.now(UTC) - timedelta(hours=1))
    env = {**senv, "KEYROTOR_SCAN_BATCH_SIZE": "10"}

    async def opened(n: int) -> bool:
        return bool((await sql(url, "SELECT count(*) FROM rotations"))[0][0] >= n)

    first = Proc(env, tmp_path / "first.log", "scheduler", "--once")
    procs.append(first)
    await wait_until(lambda: opened(200), 60, "the first scan to open runs")
    first.kill()
    killed_at = (await sql(url, "SELECT count(*) FROM rotations"))[0][0]
    print(f"killed after opening {killed_at} of {len(due)} runs")
    assert killed_at < len(due), "the scan finished before it was killed: nothing was tested"

    second = Proc(env, tmp_path / "second.log", "scheduler", "--once")
    procs.append(second)
    assert second.proc.wait(120) == 0, second.output()
    per_scope = await sql(
        url, "SELECT scope_id, count(*) FROM rotations GROUP BY scope_id HAVING count(*) <> 1"
    )
    assert per_scope == [] and await opened(len(due))
    queued = rotate_jobs(await queued_jobs(rq, queue))
    assert set(queued.values()) == {1}
    # Opened by the dead process, not enqueued: at most the page it was killed in (plus the
    # enqueues in flight), and the restarted scan skipped them as open.
    assert len(due) - len(queued) <= 10

    settings = Settings.from_env(env)
    async with Scheduler(settings) as s:
        async with db.transaction(s.sessions) as session:
            open_runs = await runs.list_runs(session, limit=10_000, open_only=True)
        for run in open_runs:
            await enqueue_driver(s.redis, settings, run)
    assert rotate_jobs(await queued_jobs(rq, queue)) == dict.fromkeys(due, 1)


async def test_the_leader_enqueues_check_replicas_once_a_slot(
    senv: dict[str, str], rq: Any, procs: list[Proc], tmp_path: Path
) -> None:
    """The replica check is an APScheduler interval job of the leader (hourly by default; 2 s
    here): one job a slot, named after the slot, and none from the standby."""
    env = {**senv, "KEYROTOR_SCAN_INTERVAL_SECONDS": "1", "KEYROTOR_REPLICA_CHECK_INTERVAL_SECONDS": "2"}
    procs += [Proc(env, tmp_path / "a.log", "scheduler"), Proc(env, tmp_path / "b.log", "scheduler")]
    queue = senv["KEYROTOR_QUEUE_NAME"]

    async def checks() -> list[str]:
        return [j for j in await queued_jobs(rq, queue) if ":check_replicas:" in j]

    await wait_until(lambda: _count_at_least(checks, 3), 20, "three replica checks")
    slots = [datetime.strptime(j.rsplit(":", 1)[1], "%Y%m%dT%H%M%SZ") for j in await checks()]
    assert all(s.second % 2 == 0 for s in slots)  # slot starts, one id each
    assert sum("replica_check_enqueued" in p.output() for p in procs) == 1  # the leader only


async def _count_at_least(fn: Any, n: int) -> bool:
    return len(await fn()) >= n
