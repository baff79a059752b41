"""The rotation clock with a real worker: a rotation (on demand, fanned out over id ranges) moves
``next_rotation_at`` to its completion plus the interval, so the scheduler does not rotate again
at the old due date; and dry runs estimate at the rate that rotation measured."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta

from keyrotor import Settings
from keyrotor.queue.client import KeyrotorClient
from keyrotor.schedule import plan as schedule
from keyrotor.worker.scheduler import Scheduler
from tests.rotation_helpers import check_values, run_burst_worker, seed
from tests.scheduler.conftest import sql


async def test_on_demand_rotation_resets_the_clock_and_measures_the_rate(senv: dict[str, str]) -> None:
    settings = Settings.from_env(
        {
            **senv,
            # 1,500 rows fan out into 3 ranges of 2 batches; the pauses make the run last > 1 s,
            # long enough for its rate to count as measured.
            "KEYROTOR_SMALL_SCOPE_ROWS": "100",
            "KEYROTOR_REENCRYPT_RANGE_ROWS": "500",
            "KEYROTOR_REENCRYPT_BATCH_ROWS": "250",
            "KEYROTOR_TEST_BATCH_DELAY_S": "0.6",
        }
    )
    url = settings.database_url
    values = await seed(settings, "anthropic", 1_500)
    await seed(settings, "openai", 30)
    # Last rotated 30 days ago on a 90-day policy: next due in 60 days.
    old_due = datetime.now(UTC) + timedelta(days=60)
    await sql(url, "UPDATE key_scopes SET next_rotation_at = $1 WHERE name = 'anthropic'", old_due)

    async with Scheduler(settings, instance_id="clock") as sched:
        before = await sched.plan()
        assert before.rate.source == "configured" and before.rate.runs == 0
        async with KeyrotorClient(settings) as client:
            handle = await client.rotate("anthropic", trigger="cli")
            await run_burst_worker(settings, max_jobs=4)
            run = await handle.result(timeout_s=10)
        assert run.state == "completed" and run.detail["mode"] == "ranges" and run.rows_done == 1_500
        assert await check_values(settings, "anthropic", values) == {2: 1_500}

        (scope,) = await sql(
            url,
            "SELECT s.last_rotation_at, s.next_rotation_at, s.interval_days, r.started_at, r.finished_at "
            "FROM key_scopes s JOIN rotations r ON r.scope_id = s.id WHERE s.name = 'anthropic'",
        )
        last, nxt, interval, started, finished = scope
        # Counted from the completion (the last range's transaction), not from the request, and
        # not from the old due date.
        assert started < last <= finished and nxt == last + timedelta(days=interval)
        assert nxt - old_due > timedelta(days=29)
        # At the old due date, and up to the new one, nothing is due.
        early: list[str | None] = []
        for at in (old_due, old_due + timedelta(hours=1), nxt - timedelta(seconds=1)):
            early += [r.scope for r in (await sched.scan(at)).rotations]
        assert "anthropic" not in early
        assert "anthropic" in [r.scope for r in (await sched.scan(nxt)).rotations]
        opened = await sql(
            url,
            "SELECT s.name FROM rotations r JOIN key_scopes s ON s.id = r.scope_id "
            "WHERE r.state = 'pending' AND r.kind = 'dek' ORDER BY 1",
        )
        assert [r[0] for r in opened] == ["anthropic", "openai"]

        # Dry runs now estimate at the rate that run achieved (wall clock, all its workers).
        seconds = (finished - started).total_seconds()
        plan = await schedule.plan_rotation(
            sched.sessions,
            "openai",
            now=datetime.now(UTC),
            cfg=sched.cfg,
            rows_per_second=settings.estimate_rows_per_second,
            managed=(),
        )
    assert plan.rate.source == "measured" and plan.rate.runs == 1
    assert abs(plan.rate.rows_per_second - 1_500 / seconds) < 0.01
    assert plan.rate.rows_per_second < 1_500  # the pauses: >1 s for 1,500 rows
    assert abs(plan.estimate_s - 30 * seconds / 1_500) < 1e-6
    doc = plan.as_dict()
    assert doc["rate_source"] == "measured" and doc["rate_runs"] == 1 and doc["rows_total"] == 30


async def test_measured_rate_is_the_median_of_the_latest_large_runs(senv: dict[str, str]) -> None:
    """Which completed runs count, and that one slow outlier (a run that waited out an outage
    between its attempts) does not drag the estimate."""
    settings = Settings.from_env(senv)
    url = settings.database_url
    (sid,) = [
        r[0]
        for r in await sql(
            url,
            "INSERT INTO key_scopes (name, active_version, latest_version) "
            "VALUES ('openai', 1, 1) RETURNING id",
        )
    ]
    t = datetime(2030, 1, 1, tzinfo=UTC)
    runs = [  # (kind, state, rows, seconds)
        ("dek", "completed", 100_000, 10.0),  # 10,000 rows/s
        ("dek", "completed", 24_000, 2.0),  # 12,000
        ("dek", "completed", 5_000, 50.0),  # 100: the outlier
        ("dek", "completed", 22_000, 2.0),  # 11,000
        ("dek", "completed", 999, 1.0),  # too few rows to measure
        ("dek", "completed", 5_000, 0.5),  # too short to measure
        ("dek", "failed", 50_000, 1.0),
        ("retire", "completed", 50_000, 1.0),
    ]
    for kind, state, rows, seconds in runs:
        await sql(
            url,
            "INSERT INTO rotations (kind, scope_id, from_version, state, trigger, rows_done, started_at, "
            "finished_at) VALUES ($1, $2, 1, $3, 'schedule', $4, $5, $6)",
            kind,
            sid,
            state,
            rows,
            t,
            t + timedelta(seconds=seconds),
        )
    async with Scheduler(settings, instance_id="rate") as sched:
        plan = await sched.plan(t)
    assert plan.rate.source == "measured" and plan.rate.runs == 4
    assert plan.rate.rows_per_second == 10_500  # the median of 100, 10,000, 11,000 and 12,000
