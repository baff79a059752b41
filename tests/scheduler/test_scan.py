"""The scan, in-process, with a controllable clock: due rotations and expired graces are opened
and enqueued exactly once however often and however concurrently it runs."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime, timedelta
from typing import Any

from arq.jobs import Job
from sqlalchemy import event, text

from keyrotor import KeyManager, Settings
from keyrotor.queue.enqueue import enqueue_driver
from keyrotor.queue.serialization import deserialize
from keyrotor.schedule import scan as schedule
from keyrotor.store import db
from keyrotor.worker.leadership import Leadership
from keyrotor.worker.scheduler import Scheduler, replica_job_id, scan_config
from tests.rotation_helpers import keyrotor
from tests.scheduler.conftest import queued_jobs, seed_scopes, sql

T0 = datetime(2030, 1, 1, tzinfo=UTC)  # the tests' "now": every due date is set relative to it


async def open_dek_runs(database_url: str) -> dict[str, int]:
    rows = await sql(
        database_url,
        "SELECT s.name, count(*) FROM rotations r JOIN key_scopes s ON s.id = r.scope_id "
        "WHERE r.kind = 'dek' GROUP BY s.name",
    )
    return {r[0]: r[1] for r in rows}


def rotate_jobs(jobs: list[str]) -> dict[str, int]:
    """scope -> number of queued rotate_dek jobs (ids are <queue>:rotate_dek:<scope>:<run>)."""
    out: dict[str, int] = {}
    for jid in jobs:
        parts = jid.split(":")
        if "rotate_dek" in parts:
            scope = parts[parts.index("rotate_dek") + 1]
            out[scope] = out.get(scope, 0) + 1
    return out


async def test_due_scopes_are_enqueued_once_across_repeated_scans(
    sched: Scheduler, senv: dict[str, str], rq: Any
) -> None:
    url = senv["DATABASE_URL"]
    due = await seed_scopes(url, 5, due_at=T0 - timedelta(days=1))
    await seed_scopes(url, 3, due_at=T0 + timedelta(seconds=1), prefix="later")
    first = await sched.scan(T0)
    assert sorted(str(r.scope) for r in first.rotations) == due
    assert all(r.trigger == "schedule" and r.detail["due_version"] == 2 for r in first.rotations)
    for _ in range(3):
        again = await sched.scan(T0)
        assert again.rotations == [] and again.enqueued == []
        assert again.skipped == {"dek:open_run": 5}
    jobs = await queued_jobs(rq, senv["KEYROTOR_QUEUE_NAME"])
    assert rotate_jobs(jobs) == dict.fromkeys(due, 1)
    assert await open_dek_runs(url) == dict.fromkeys(due, 1)
    # The job is the run's driver, under the same id an on-demand request for the run uses.
    run = first.rotations[0]
    assert f"{senv['KEYROTOR_QUEUE_NAME']}:rotate_dek:{run.scope}:{run.id}" in jobs
    info = await Job(
        first.enqueued[0], sched.redis, _queue_name=senv["KEYROTOR_QUEUE_NAME"], _deserializer=deserialize
    ).info()
    assert info is not None and info.function == "rotate_dek"
    assert info.kwargs["trigger"] == "schedule"


async def test_concurrent_scans_enqueue_each_rotation_once(senv: dict[str, str], rq: Any) -> None:
    url = senv["DATABASE_URL"]
    due = await seed_scopes(url, 400, due_at=T0 - timedelta(hours=1))
    settings = Settings.from_env({**senv, "KEYROTOR_SCAN_BATCH_SIZE": "37"})
    schedulers = [Scheduler(settings, instance_id=f"s{i}") for i in range(4)]
    for s in schedulers:
        await s.open()
    try:
        reports = await asyncio.gather(*(s.scan(T0) for s in schedulers for _ in range(2)))
    finally:
        for s in schedulers:
            await s.close()
    opened = [str(r.scope) for rep in reports for r in rep.rotations]
    assert sorted(opened) == due  # each scope opened by exactly one of the eight scans
    assert sum(len(rep.enqueued) for rep in reports) == 400
    assert rotate_jobs(await queued_jobs(rq, senv["KEYROTOR_QUEUE_NAME"])) == dict.fromkeys(due, 1)
    assert await open_dek_runs(url) == dict.fromkeys(due, 1)


async def test_downtime_catch_up_enqueues_everything_due_once(senv: dict[str, str], rq: Any) -> None:
    url = senv["DATABASE_URL"]
    # A month down: scopes came due at every hour of it; others are not due yet.
    due: list[str] = []
    for day in range(30):
        due += await seed_scopes(url, 40, due_at=T0 - timedelta(days=day, hours=3), start=day * 40)
    future = await seed_scopes(url, 200, due_at=T0 + timedelta(days=1), prefix="future")
    # Graces that ended during the downtime (one a day), and one that has not ended yet.
    await sql(
        url,
        "INSERT INTO data_keys (scope_id, version, state, encrypted_dek, kek_id, kek_version, grace_until) "
        "SELECT id, 0, 'grace', '\\x00'::bytea, 'test', 1, $1::timestamptz - (id % 30) * interval '1 day' "
        "FROM key_scopes WHERE name = ANY($2::text[])",
        T0 - timedelta(hours=1),
        future[:30],
    )
    await sql(
        url,
        "INSERT INTO data_keys (scope_id, version, state, encrypted_dek, kek_id, kek_version, grace_until) "
        "SELECT id, 0, 'grace', '\\x00'::bytea, 'test', 1, $1 FROM key_scopes WHERE name = $2",
        T0 + timedelta(days=3),
        future[30],
    )
    settings = Settings.from_env({**senv, "KEYROTOR_SCAN_BATCH_SIZE": "100"})
    async with Scheduler(settings) as s:
        report = await s.scan(T0)
        assert report.batches >= 12  # paged: 1200 due rows, 100 a transaction
        assert sorted(str(r.scope) for r in report.rotations) == sorted(due)
        assert sorted(str(r.scope) for r in report.retirements) == future[:30]
        again = await s.scan(T0 + timedelta(minutes=1))
        assert again.rotations == [] and again.retirements == []
    jobs = await queued_jobs(rq, senv["KEYROTOR_QUEUE_NAME"])
    assert rotate_jobs(jobs) == dict.fromkeys(due, 1)
    assert (
        sorted(j.split(":retire_dek:")[1].split(":")[0] for j in jobs if ":retire_dek:" in j) == future[:30]
    )


async def test_restarted_mid_scan_never_queues_a_rotation_twice(
    sched: Scheduler, senv: dict[str, str], rq: Any
) -> None:
    """A scheduler that dies after opening runs but before enqueueing them: the next scan skips
    them (open runs), and the workers' adoption enqueues their drivers under the same ids."""
    url = senv["DATABASE_URL"]
    due = await seed_scopes(url, 6, due_at=T0 - timedelta(minutes=5))
    crashed: list[Any] = []
    async for batch in schedule.open_due_rotations(sched.sessions, T0, sched.cfg):
        crashed += batch.opened  # ... and the process dies here, before enqueueing
    assert len(crashed) == 6 and await queued_jobs(rq, senv["KEYROTOR_QUEUE_NAME"]) == []
    report = await sched.scan(T0)
    assert report.rotations == [] and report.skipped == {"dek:open_run": 6}
    # The same enqueue the workers' adoption (worker/main.py) does, twice over.
    for _ in range(2):
        for run in crashed:
            await enqueue_driver(sched.redis, sched.settings, run)
    assert rotate_jobs(await queued_jobs(rq, senv["KEYROTOR_QUEUE_NAME"])) == dict.fromkeys(due, 1)
    # arq forgets ids (keep_result): with the queue emptied the open runs still block a re-open.
    await rq.delete(senv["KEYROTOR_QUEUE_NAME"])
    assert (await sched.scan(T0)).rotations == []
    assert await open_dek_runs(url) == dict.fromkeys(due, 1)


async def test_completed_rotation_is_not_due_again(sched: Scheduler, senv: dict[str, str]) -> None:
    """What the worker's completion does (next_rotation_at from completion), by SQL: the scope
    drops out of the scan, so a rotation that completed (scheduled or on demand) is not redone."""
    url = senv["DATABASE_URL"]
    await seed_scopes(url, 2, due_at=T0 - timedelta(days=2))
    report = await sched.scan(T0)
    assert len(report.rotations) == 2
    await sql(url, "UPDATE rotations SET state = 'completed', finished_at = $1", T0)
    await sql(
        url,
        "UPDATE key_scopes SET active_version = 2, latest_version = 2, last_rotation_at = $1, "
        "next_rotation_at = $1::timestamptz + make_interval(days => interval_days)",
        T0,
    )
    assert (await sched.scan(T0 + timedelta(hours=1))).rotations == []
    assert len((await sched.scan(T0 + timedelta(days=30))).rotations) == 2
    # The next run is named after the next version.
    due_versions = await sql(url, "SELECT (detail->>'due_version')::int FROM rotations ORDER BY id")
    assert [r[0] for r in due_versions] == [2, 2, 3, 3]


async def test_on_demand_open_run_is_joined_not_duplicated(sched: Scheduler, senv: dict[str, str]) -> None:
    url = senv["DATABASE_URL"]
    (name,) = await seed_scopes(url, 1, due_at=T0 - timedelta(days=1))
    from keyrotor.rotation.dek import request_rotation

    async with db.transaction(sched.sessions) as session:
        _run, created = await request_rotation(session, name, trigger="cli")
    assert created
    report = await sched.scan(T0)
    assert report.rotations == [] and report.skipped == {"dek:open_run": 1}
    assert [r["trigger"] for r in await sql(url, "SELECT trigger FROM rotations")] == ["cli"]


async def test_failed_scope_is_retried_with_exponential_backoff(
    sched: Scheduler, senv: dict[str, str]
) -> None:
    url = senv["DATABASE_URL"]
    # Runs the scan opens carry the database's clock: this test's "now" is the real one.
    T0 = datetime.now(UTC)
    (name,) = await seed_scopes(url, 1, due_at=T0 - timedelta(days=1))
    (sid,) = [r[0] for r in await sql(url, "SELECT id FROM key_scopes")]

    async def fail_runs(n: int, last_at: datetime) -> None:
        for i in range(n):
            await sql(
                url,
                "INSERT INTO rotations (kind, scope_id, from_version, state, trigger, error, created_at, "
                "finished_at) VALUES ('dek', $1, 1, 'failed', 'schedule', 'RowFailed: row 7', $2, $2)",
                sid,
                last_at - timedelta(seconds=n - 1 - i),
            )

    await fail_runs(3, T0)  # 3 consecutive failures: wait 60 * 2**2 = 240 s after the last
    early = await sched.scan(T0 + timedelta(seconds=200))
    assert early.rotations == [] and early.skipped == {"dek:backoff": 1}
    plan = await sched.plan(T0 + timedelta(seconds=200))
    assert plan.skipped[0].retry_at == T0 + timedelta(seconds=240)
    retried = await sched.scan(T0 + timedelta(seconds=241))
    assert [r.scope for r in retried.rotations] == [name]
    # It failed again: 4 failures -> 480 s.
    await sql(
        url,
        "UPDATE rotations SET state = 'failed', finished_at = $1 WHERE state = 'pending'",
        T0 + timedelta(seconds=300),
    )
    assert (await sched.scan(T0 + timedelta(seconds=300 + 479))).rotations == []
    assert len((await sched.scan(T0 + timedelta(seconds=300 + 481))).rotations) == 1
    # Capped at 600 s, however many failures.
    await sql(
        url,
        "UPDATE rotations SET state = 'failed', finished_at = $1 WHERE state = 'pending'",
        T0 + timedelta(seconds=900),
    )
    await fail_runs(10, T0 + timedelta(seconds=900))
    assert (await sched.scan(T0 + timedelta(seconds=900 + 599))).rotations == []
    assert len((await sched.scan(T0 + timedelta(seconds=900 + 601))).rotations) == 1
    # A completed run resets the count.
    await sql(
        url,
        "UPDATE rotations SET state = 'completed', finished_at = $1 WHERE state = 'pending'",
        T0 + timedelta(seconds=2000),
    )
    await sql(url, "UPDATE key_scopes SET next_rotation_at = $1", T0 + timedelta(seconds=2001))
    assert len((await sched.scan(T0 + timedelta(seconds=2002))).rotations) == 1


async def test_retire_is_enqueued_once_grace_has_ended(
    sched: Scheduler, senv: dict[str, str], rq: Any
) -> None:
    url = senv["DATABASE_URL"]
    names = await seed_scopes(url, 2, due_at=T0 + timedelta(days=20))
    # Scope 0 rotated twice: v1 and v2 in grace (v1 ends first); scope 1 once, v1 in grace.
    await sql(
        url,
        "UPDATE data_keys SET state = 'grace', grace_until = $1 WHERE version = 1",
        T0 + timedelta(hours=1),
    )
    await sql(
        url,
        "INSERT INTO data_keys (scope_id, version, state, encrypted_dek, kek_id, kek_version, grace_until) "
        "SELECT id, 2, 'grace', '\\x00'::bytea, 'test', 1, $1 FROM key_scopes WHERE name = $2",
        T0 + timedelta(hours=2),
        names[0],
    )
    await sql(
        url,
        "INSERT INTO data_keys (scope_id, version, state, encrypted_dek, kek_id, kek_version) "
        "SELECT s.id, max(d.version) + 1, 'active', '\\x00'::bytea, 'test', 1 FROM key_scopes s "
        "JOIN data_keys d ON d.scope_id = s.id GROUP BY s.id",
    )
    assert (await sched.scan(T0 + timedelta(minutes=59))).retirements == []
    report = await sched.scan(T0 + timedelta(hours=3))
    assert sorted((r.scope, r.from_version) for r in report.retirements) == [(names[0], 1), (names[1], 1)]
    assert report.skipped == {"retire:other_version": 1}  # scope 0's v2 waits for v1's run
    assert (await sched.scan(T0 + timedelta(hours=3))).retirements == []
    jobs = [j for j in await queued_jobs(rq, senv["KEYROTOR_QUEUE_NAME"]) if ":retire_dek:" in j]
    assert len(jobs) == 2
    info = await Job(
        jobs[0], sched.redis, _queue_name=senv["KEYROTOR_QUEUE_NAME"], _deserializer=deserialize
    ).info()
    assert info is not None and info.function == "retire_dek" and info.args[1] == 1
    # v1 of scope 0 destroyed (the worker's job): v2 is next.
    await sql(url, "UPDATE rotations SET state = 'completed', finished_at = now()")
    await sql(
        url,
        "UPDATE data_keys SET state = 'destroyed', encrypted_dek = NULL WHERE version = 1",
    )
    nxt = await sched.scan(T0 + timedelta(hours=3))
    assert [(r.scope, r.from_version) for r in nxt.retirements] == [(names[0], 2)]


async def test_usage_limit_makes_a_scope_due(senv: dict[str, str]) -> None:
    # Reservations (keyrotor.census.usage): with a limit of 5 and rotation enabled the hard stop is 10,
    # and each block is at most a quarter of what is left: openai reserves 2, 2, 1 for its
    # encrypts; the reservation that reaches 5 makes the scope due at once, with no flush.
    settings = Settings.from_env(
        {**senv, "KEYROTOR_MAX_ENCRYPTIONS_PER_DEK": "5", "KEYROTOR_USAGE_FLUSH_INTERVAL_SECONDS": "3600"}
    )
    due = "SELECT s.name FROM key_scopes s WHERE s.next_rotation_at <= now() ORDER BY s.name"
    async with KeyManager(settings) as km:
        for i in range(4):
            await km.encrypt("openai", f"sk-{i}")
        await km.put_secrets("anthropic", [("a", "sk-a"), ("b", "sk-b")])
        assert await sql(settings.database_url, due) == []  # openai at 4 of 5; anthropic at 2
        await km.encrypt("openai", "sk-4")
        assert [r[0] for r in await sql(settings.database_url, due)] == ["openai"]
        await km.encrypt("google", "sk-g")  # reserves 2 (a quarter of 10), uses 1
    rows = {
        r[0]: (r[1], r[2])
        for r in await sql(
            settings.database_url,
            "SELECT s.name, d.encryptions, s.next_rotation_at <= now() FROM key_scopes s "
            "JOIN data_keys d ON d.scope_id = s.id",
        )
    }
    assert rows == {"openai": (5, True), "anthropic": (2, False), "google": (2, False)}
    async with Scheduler(settings) as s:
        report = await s.scan()
    assert [(r.scope, r.detail["reason"]) for r in report.rotations] == [("openai", "usage")]


async def test_scan_pages_through_the_due_index(sched: Scheduler, senv: dict[str, str]) -> None:
    """EXPLAIN: the due-scope page is an ordered range scan of ix_key_scopes_due that stops after
    a batch, never a scan of key_scopes."""
    url = senv["DATABASE_URL"]
    await seed_scopes(url, 19_800, due_at=T0 + timedelta(days=10))
    await seed_scopes(url, 200, due_at=T0 - timedelta(days=1), prefix="due")
    await sql(url, "ANALYZE key_scopes")
    await sql(url, "ANALYZE data_keys")
    async with db.transaction(sched.sessions) as session:
        plan = "\n".join(
            r[0]
            for r in await session.execute(
                text("EXPLAIN " + schedule.DUE_SCOPES_SQL + " FOR UPDATE OF s SKIP LOCKED"),
                {
                    "now": T0,
                    "after_at": datetime(1, 1, 1, tzinfo=UTC),
                    "after_id": 0,
                    "batch": 50,
                    "default_max": 1,
                },
            )
        )
    assert "ix_key_scopes_due" in plan, plan
    assert "Seq Scan on key_scopes" not in plan, plan
    assert "Sort" not in plan.split("Nested Loop")[0], plan  # ordered by the index, not sorted


async def test_scan_queries_per_batch(senv: dict[str, str]) -> None:
    """Two statements a page (select + insert) however many scopes a page holds."""
    url = senv["DATABASE_URL"]
    await seed_scopes(url, 250, due_at=T0 - timedelta(days=1))
    settings = Settings.from_env({**senv, "KEYROTOR_SCAN_BATCH_SIZE": "100"})
    async with Scheduler(settings) as s:
        statements: list[str] = []
        assert s._engine is not None
        event.listen(s._engine.sync_engine, "before_cursor_execute", lambda *a: statements.append(a[2]))
        report = await s.scan(T0)
    assert len(report.rotations) == 250
    scans = [q for q in statements if "FROM key_scopes s" in q or "FROM data_keys d" in q]
    inserts = [q for q in statements if q.startswith("INSERT INTO rotations")]
    # 3 scope pages; 1 (empty) grace page; 1 (empty) page of retired keys past their window
    assert len(scans) == 3 + 1 + 1 and len(inserts) == 3


async def test_dry_run_writes_nothing(sched: Scheduler, senv: dict[str, str], rq: Any) -> None:
    url = senv["DATABASE_URL"]
    settings = Settings.from_env(senv)
    async with KeyManager(settings) as km:
        await km.put_secrets("anthropic", [(f"k{i}", f"sk-{i}") for i in range(30)])
    await sql(url, "UPDATE key_scopes SET next_rotation_at = $1", T0 - timedelta(days=1))
    before = await sql(url, "SELECT count(*) FROM rotations")
    plan = await sched.plan(T0)
    doc = plan.as_dict()
    assert [(p["scope"], p["to_version"], p["rows_by_version"]) for p in doc["rotations"]] == [
        ("anthropic", 2, {"1": 30})
    ]
    assert doc["estimated_seconds"] == round(30 / settings.estimate_rows_per_second, 3)
    assert await sql(url, "SELECT count(*) FROM rotations") == before
    assert await queued_jobs(rq, senv["KEYROTOR_QUEUE_NAME"]) == []


async def test_replica_check_is_one_job_per_hour(sched: Scheduler, senv: dict[str, str], rq: Any) -> None:
    t = datetime(2030, 1, 1, 10, 5, tzinfo=UTC)
    assert (
        replica_job_id(sched.settings, t) == f"{senv['KEYROTOR_QUEUE_NAME']}:check_replicas:20300101T100000Z"
    )
    first = await sched.enqueue_replica_check(t)
    assert first is not None
    assert await sched.enqueue_replica_check(t + timedelta(minutes=50)) is None  # same hour: no-op
    assert await sched.enqueue_replica_check(t + timedelta(minutes=56)) is not None  # 11:01
    jobs = [j for j in await queued_jobs(rq, senv["KEYROTOR_QUEUE_NAME"]) if "check_replicas" in j]
    assert len(jobs) == 2
    assert scan_config(sched.settings).backoff_s == 60


async def test_leadership_moves_when_the_leaders_connection_dies(senv: dict[str, str]) -> None:
    url = senv["DATABASE_URL"]
    a, b = Leadership(url), Leadership(url)
    try:
        assert await a.ensure() and not await b.ensure()
        assert await a.ensure() and not await b.ensure()  # held, not stacked
        # The leader's connection dies (a crash, a network cut): its session lock goes with it.
        await sql(
            url,
            # The timeout makes Postgres wait until the backend is gone (and its lock with it):
            # without it the standby could ask while the killed leader still holds the lock.
            "SELECT pg_terminate_backend(pid, 10000) FROM pg_stat_activity WHERE application_name = "
            "'keyrotor-scheduler' AND pid <> pg_backend_pid() AND backend_type = 'client backend' "
            # The lock holder in this test's own database (other tests' schedulers may hold
            # advisory locks in theirs on the same server).
            "AND pid IN (SELECT pid FROM pg_locks WHERE locktype = 'advisory' AND granted "
            "AND database = (SELECT oid FROM pg_database WHERE datname = current_database()))",
        )
        assert await b.ensure()
        assert not await a.ensure()  # notices at its next ping, and stays standby
        assert not await a.ensure()
        await b.release()
        assert await a.ensure()
    finally:
        await a.release()
        await b.release()


async def test_status_shows_next_rotation_and_whether_a_run_is_queued(
    sched: Scheduler, senv: dict[str, str], rq: Any
) -> None:
    from keyrotor.store import repo
    from keyrotor.worker.cli.status import mark_queued

    url = senv["DATABASE_URL"]
    (due,) = await seed_scopes(url, 1, due_at=T0 - timedelta(days=1))
    (later,) = await seed_scopes(url, 1, due_at=T0 + timedelta(days=1), prefix="later")
    await sched.scan(T0)
    async with db.transaction(sched.sessions) as session:
        scopes = await repo.status(session)
    await mark_queued(sched.settings, scopes)
    by_name = {s["scope"]: s for s in scopes}
    assert by_name[due]["queued"] is True and by_name[due]["run"]["state"] == "pending"
    assert by_name[later]["queued"] is False and by_name[later]["run"] is None
    # What `keyrotor status` prints: the next rotation of each scope, and the queued run.
    shown = keyrotor("status", env={**senv, "COLUMNS": "250"})
    assert shown.returncode == 0, shown.stderr
    lines = {ln.split("│")[1].strip(): ln for ln in shown.stdout.splitlines() if ln.count("│") > 2}
    assert "2029-12-31T00:00:00" in lines[due] and "2030-01-02T00:00:00" in lines[later]
    assert "run 1 queued" in shown.stdout
    await rq.delete(senv["KEYROTOR_QUEUE_NAME"])  # a worker took the job
    await mark_queued(sched.settings, scopes)
    assert by_name[due]["queued"] is False
    await sql(url, "UPDATE rotations SET state = 'running', rows_done = 1200, rows_total = 5000")
    assert "run 1 in progress, 1,200/5,000 rows" in keyrotor("status", env={**senv, "COLUMNS": "250"}).stdout
    await mark_queued(sched.settings.model_copy(update={"redis_url": "redis://127.0.0.1:1/0"}), scopes)
    assert by_name[due]["queued"] is None  # Redis unreachable: unknown, not an error


async def test_failed_retirement_is_retried_with_backoff(sched: Scheduler, senv: dict[str, str]) -> None:
    url = senv["DATABASE_URL"]
    now = datetime.now(UTC)  # failed runs carry the database's clock
    (name,) = await seed_scopes(url, 1, due_at=now + timedelta(days=30))
    await sql(
        url,
        "INSERT INTO data_keys (scope_id, version, state, encrypted_dek, kek_id, kek_version, grace_until) "
        "SELECT id, 0, 'grace', '\\x00'::bytea, 'test', 1, $1 FROM key_scopes",
        now - timedelta(days=1),
    )
    # Two consecutive failed retirements (e.g. rows still on the version): wait 60 * 2 = 120 s.
    await sql(
        url,
        "INSERT INTO rotations (kind, scope_id, from_version, state, trigger, error, finished_at) "
        "SELECT 'retire', id, 0, 'failed', 'schedule', 'VersionStillInUse', $1 FROM key_scopes, "
        "generate_series(1, 2)",
        now,
    )
    early = await sched.scan(now + timedelta(seconds=110))
    assert early.retirements == [] and early.skipped == {"retire:backoff": 1}
    late = await sched.scan(now + timedelta(seconds=121))
    assert [(r.scope, r.from_version) for r in late.retirements] == [(name, 0)]
