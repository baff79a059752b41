"""The scheduler's scan over 100,000 scopes of which 1% are due.

Prints, for one scan: wall time, SQL statements issued (counted with a SQLAlchemy
``before_cursor_execute`` listener on the scheduler's engine) and jobs enqueued, in three states:

- **catch-up**: 1,000 scopes due, none open yet -> 1,000 runs opened and 1,000 jobs enqueued;
- **busy**: the same 1,000 still due with their runs open (what each scan sees until the
  workers finish) -> nothing enqueued;
- **idle**: nothing due (the common minute) -> nothing enqueued;

and the EXPLAIN (ANALYZE, BUFFERS) of one page of the due-scope query, showing the range scan of
``ix_key_scopes_due`` that stops after a batch.

    .venv/bin/python -m bench.bench_scheduler [--scopes 100000] [--due-percent 1] [--json]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import time
from datetime import UTC, datetime, timedelta
from typing import Any

import asyncpg
import redis.asyncio as aioredis
from sqlalchemy import event, text

from bench.common import bench_settings, fresh_database, machine
from keyrotor import schedule
from keyrotor.store import db
from worker.scheduler import Scheduler

QUEUE = "keyrotor_bench_sched:queue"
REDIS_URL = "redis://127.0.0.1:6379/14"


async def seed(url: str, n: int, due: int, now: datetime) -> None:
    conn = await asyncpg.connect(url)
    try:
        async with conn.transaction():
            # Due scopes spread over the last day; the rest over the next 90 days.
            await conn.execute(
                "INSERT INTO key_scopes (name, active_version, latest_version, interval_days, "
                "grace_period_days, next_rotation_at, last_rotation_at) "
                "SELECT 'tenant-' || i || '/openai', 3, 3, 90, 7, "
                "CASE WHEN i % $2 = 0 THEN $3::timestamptz - (i % 1440) * interval '1 minute' "
                "ELSE $3::timestamptz + (i % 90 + 1) * interval '1 day' END, "
                "$3::timestamptz - interval '60 days' "
                "FROM generate_series(1, $1) AS i",
                n,
                n // due,
                now,
            )
            await conn.execute(
                "INSERT INTO data_keys (scope_id, version, state, encrypted_dek, kek_id, kek_version, "
                "activated_at, encryptions) "
                "SELECT id, 3, 'active', '\\x00'::bytea, 'bench', 1, $1, id % 1000 FROM key_scopes",
                now - timedelta(days=60),
            )
            # History: two completed rotations a scope, and a failure for one scope in ten.
            await conn.execute(
                "INSERT INTO rotations (kind, scope_id, from_version, to_version, state, trigger, "
                "created_at, finished_at) SELECT 'dek', id, v, v + 1, 'completed', 'schedule', "
                "$1::timestamptz - (3 - v) * interval '90 days', "
                "$1::timestamptz - (3 - v) * interval '90 days' "
                "FROM key_scopes, generate_series(1, 2) AS v",
                now - timedelta(days=60),
            )
            await conn.execute(
                "INSERT INTO rotations (kind, scope_id, from_version, state, trigger, error, finished_at) "
                "SELECT 'dek', id, 3, 'failed', 'api', 'RowFailed: row 1', "
                "$1::timestamptz - interval '1 day' "
                "FROM key_scopes WHERE id % 10 = 0",
                now,
            )
        await conn.execute("ANALYZE")
    finally:
        await conn.close()


async def explain_page(sched: Scheduler, now: datetime, batch: int) -> str:
    async with sched.sessions() as session, session.begin():
        rows = await session.execute(
            text(
                "EXPLAIN (ANALYZE, BUFFERS, COSTS OFF) "
                + schedule.DUE_SCOPES_SQL
                + " FOR UPDATE OF s SKIP LOCKED"
            ),
            {
                "now": now,
                "after_at": datetime(1, 1, 1, tzinfo=UTC),
                "after_id": 0,
                "batch": batch,
                "default_max": 2**30,
            },
        )
        plan = "\n".join(r[0] for r in rows)
        await session.rollback()  # EXPLAIN ANALYZE took the row locks: give them back
    return plan


async def measure(n_scopes: int, due_percent: float) -> dict[str, Any]:
    url = await fresh_database("keyrotor_bench_sched")
    now = datetime.now(UTC)
    due = max(1, int(n_scopes * due_percent / 100))
    t = time.perf_counter()
    await seed(url, n_scopes, due, now)
    seed_s = time.perf_counter() - t
    r: Any = aioredis.from_url(REDIS_URL)  # type: ignore[no-untyped-call]
    keys = [k async for k in r.scan_iter(match=f"*{QUEUE}*", count=1000)]
    if keys:
        await r.delete(*keys)
    settings = bench_settings(url, queue_name=QUEUE, redis_url=REDIS_URL)
    statements: list[str] = []
    out: dict[str, Any] = {
        "machine": machine(),
        "scopes": n_scopes,
        "due": due,
        "batch": settings.scan_batch_size,
    }
    async with Scheduler(settings, instance_id="bench") as sched:
        assert sched._engine is not None
        event.listen(sched._engine.sync_engine, "before_cursor_execute", lambda *a: statements.append(a[2]))
        await sched.scan(now - timedelta(days=400))  # warm up the pool and statement caches

        async def one(at: datetime) -> tuple[float, int, int, Any]:
            statements.clear()
            t0 = time.perf_counter()
            report = await sched.scan(at)
            return time.perf_counter() - t0, len(statements), len(report.enqueued), report

        plan_t = time.perf_counter()
        plan = await sched.plan(now)
        out["dry_run"] = {
            "seconds": round(time.perf_counter() - plan_t, 4),
            "would_open": len(plan.rotations),
            "rows": sum(p.rows_total for p in plan.rotations),
        }
        enqueue_s = 0.0
        real_enqueue = sched._enqueue

        async def timed_enqueue(opened: Any) -> list[str]:
            nonlocal enqueue_s
            t1 = time.perf_counter()
            try:
                return await real_enqueue(opened)
            finally:
                enqueue_s += time.perf_counter() - t1

        sched._enqueue = timed_enqueue  # type: ignore[method-assign]
        catch_s, catch_q, catch_jobs, catch = await one(now)
        out["catch_up_enqueue_seconds"] = round(enqueue_s, 4)
        out["catch_up"] = {
            "seconds": round(catch_s, 4),
            "statements": catch_q,
            "enqueued": catch_jobs,
            "skipped": catch.skipped,
            "batches": catch.batches,
        }
        busy = [await one(now) for _ in range(10)]
        out["busy"] = {
            "seconds_median": round(statistics.median(b[0] for b in busy), 4),
            "statements": busy[0][1],
            "enqueued": sum(b[2] for b in busy),
            "skipped": busy[0][3].skipped,
        }
        # The workers finish: runs completed, due dates moved 90 days on.
        async with db.transaction(sched.sessions) as session:
            await session.execute(
                text("UPDATE rotations SET state = 'completed', finished_at = now() WHERE state = 'pending'")
            )
            await session.execute(
                text(
                    "UPDATE key_scopes SET next_rotation_at = CAST(:now AS timestamptz) + interval '90 days' "
                    "WHERE next_rotation_at <= :now"
                ),
                {"now": now},
            )
        idle = [await one(now) for _ in range(20)]
        out["idle"] = {
            "seconds_median": round(statistics.median(i[0] for i in idle), 4),
            "statements": idle[0][1],
            "enqueued": sum(i[2] for i in idle),
        }
        # Reset one page's worth to due, for the plan of a page that has work.
        async with db.transaction(sched.sessions) as session:
            await session.execute(
                text(
                    "UPDATE key_scopes SET next_rotation_at = :due WHERE id IN "
                    "(SELECT id FROM key_scopes ORDER BY id LIMIT :n)"
                ),
                {"due": now - timedelta(hours=1), "n": due},
            )
            await session.execute(text("ANALYZE key_scopes"))
        out["explain"] = await explain_page(sched, now, settings.scan_batch_size)
    keys = [k async for k in r.scan_iter(match=f"*{QUEUE}*", count=1000)]
    if keys:
        await r.delete(*keys)
    await r.aclose()
    out["seed_seconds"] = round(seed_s, 1)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--scopes", type=int, default=100_000)
    parser.add_argument("--due-percent", type=float, default=1.0)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    out = asyncio.run(measure(args.scopes, args.due_percent))
    if args.json:
        print(json.dumps(out, indent=2))
        return
    print(f"machine: {out['machine']}")
    print(f"{out['scopes']:,} scopes, {out['due']:,} due ({args.due_percent}%), batch {out['batch']}")
    c, b, i, d = out["catch_up"], out["busy"], out["idle"], out["dry_run"]
    print(
        f"catch-up scan: {c['seconds'] * 1000:8.1f} ms  {c['statements']:3d} statements  "
        f"{c['enqueued']:,} runs opened + enqueued  ({c['batches']} pages; skipped {c['skipped']})"
    )
    print(
        f"               of which enqueueing the jobs on Redis: "
        f"{out['catch_up_enqueue_seconds'] * 1000:.1f} ms"
    )
    print(
        f"busy scan:     {b['seconds_median'] * 1000:8.1f} ms  {b['statements']:3d} statements  "
        f"{b['enqueued']} enqueued  (all runs open: skipped {b['skipped']}; median of 10)"
    )
    print(
        f"idle scan:     {i['seconds_median'] * 1000:8.1f} ms  {i['statements']:3d} statements  "
        f"{i['enqueued']} enqueued  (median of 20)"
    )
    print(
        f"dry run:       {d['seconds'] * 1000:8.1f} ms  would open {d['would_open']:,} "
        f"(rows per version counted: {d['rows']:,})"
    )
    print("EXPLAIN (ANALYZE, BUFFERS) of one page of the due-scope query:")
    print(out["explain"])


if __name__ == "__main__":
    main()
