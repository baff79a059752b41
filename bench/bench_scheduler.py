"""The scheduler's scan over 100,000 scopes of which 1% are due.

Prints, for one scan: wall time, SQL statements issued (counted with a SQLAlchemy
``before_cursor_execute`` listener on the scheduler's engine) and jobs enqueued, in three states:

- **catch-up**: 1,000 scopes due, none open yet -> 1,000 runs opened and 1,000 jobs enqueued;
- **busy**: the same 1,000 still due with their runs open (what each scan sees until the
  workers finish) -> nothing enqueued;
- **idle**: nothing due (the common minute) -> nothing enqueued;

and the EXPLAIN (ANALYZE, BUFFERS) of one page of the due-scope query, showing the range scan of
``ix_key_scopes_due`` that stops after a batch (and of the expired-grace query: the partial index
``ix_data_keys_grace_until``), checked for the index and for the absence of a table scan.

Every time is also given as a ratio against a ceiling measured in the same run, on the same
engine: a Postgres round trip (``SELECT 1``), the bare index read of the due ids (what any scan
must at least do), a Redis round trip (``PING``) and arq's own ``enqueue_job`` (each run needs its
job enqueued), and as a peer the same due-scope page on a table scan of ``key_scopes`` (the due
date hidden from the planner; every other lookup keeps its index).

The seed is a realistic steady state: 100,000 scopes rotated twice, one in ten with a failed run
since, one in thirteen with a superseded DEK still in grace (not yet expired), 1% due.

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
from keyrotor.schedule import scan as schedule
from keyrotor.store import db
from keyrotor.worker.scheduler import Scheduler

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
            # One scope in 13 (~7/90: a 7-day grace on a 90-day interval) has v2 still in grace.
            await conn.execute(
                "INSERT INTO data_keys (scope_id, version, state, encrypted_dek, kek_id, kek_version, "
                "activated_at, grace_until) SELECT id, 2, 'grace', '\\x00'::bytea, 'bench', 1, $1, "
                "$2::timestamptz + (id % 7 + 1) * interval '1 day' FROM key_scopes WHERE id % 13 = 0",
                now - timedelta(days=150),
                now,
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


def _page_params(now: datetime, batch: int) -> dict[str, Any]:
    return {
        "now": now,
        "after_at": datetime(1, 1, 1, tzinfo=UTC),
        "after_id": 0,
        "batch": batch,
        "default_max": 2**30,
    }


async def explain_page(sched: Scheduler, now: datetime, batch: int) -> str:
    async with sched.sessions() as session, session.begin():
        rows = await session.execute(
            text(
                "EXPLAIN (ANALYZE, BUFFERS, COSTS OFF) "
                + schedule.DUE_SCOPES_SQL
                + " FOR UPDATE OF s SKIP LOCKED"
            ),
            _page_params(now, batch),
        )
        plan = "\n".join(r[0] for r in rows)
        await session.rollback()  # EXPLAIN ANALYZE took the row locks: give them back
    return plan


async def explain_grace(sched: Scheduler, now: datetime, batch: int) -> str:
    params = _page_params(now, batch)
    del params["default_max"]
    async with sched.sessions() as session, session.begin():
        rows = await session.execute(
            text("EXPLAIN (ANALYZE, COSTS OFF) " + schedule.DUE_GRACE_SQL + " FOR UPDATE OF d SKIP LOCKED"),
            params,
        )
        plan = "\n".join(r[0] for r in rows)
        await session.rollback()
    return plan


# The peer: the same page with its due date hidden from the planner behind a no-op expression,
# so key_scopes is read by a table scan and sorted, while every other lookup keeps its index.
TABLE_SCAN_SQL = schedule.DUE_SCOPES_SQL.replace(
    "s.next_rotation_at", "(s.next_rotation_at + interval '0 s')"
)


async def explain_table_scan(sched: Scheduler, now: datetime, batch: int) -> str:
    async with db.transaction(sched.sessions) as session:
        rows = await session.execute(text("EXPLAIN " + TABLE_SCAN_SQL), _page_params(now, batch))
        return "\n".join(r[0] for r in rows)


def index_proof(plan: str, index: str, table: str) -> dict[str, bool]:
    """Whether a plan reads ``table`` through ``index`` and never scans it whole."""
    return {"uses_index": f"using {index} on {table}" in plan, "table_scan": f"Seq Scan on {table}" in plan}


async def _best_ms(fn: Any, repeats: int) -> float:
    """The median of ``repeats`` timings of ``await fn()``, in ms."""
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        await fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times) * 1e3


async def ceilings(sched: Scheduler, redis: Any, now: datetime, batch: int) -> dict[str, float]:
    """The references, measured now on the scheduler's own engine and Redis (the first ``batch``
    ids are due since an hour before ``now``; nothing is due two hours before)."""

    async def round_trip() -> None:  # one statement in a transaction of its own, as a scan issues it
        async with db.transaction(sched.sessions) as session:
            await session.execute(text("SELECT 1"))

    async def due_ids() -> None:  # the least any scan must do: read the due ids, in order, once
        async with db.transaction(sched.sessions) as session:
            await session.execute(
                text(
                    "SELECT id FROM key_scopes WHERE rotation_enabled AND next_rotation_at IS NOT NULL "
                    "AND next_rotation_at <= :now ORDER BY next_rotation_at, id"
                ),
                {"now": now},
            )

    def page(at: datetime, *, index: bool) -> Any:
        sql = schedule.DUE_SCOPES_SQL if index else TABLE_SCAN_SQL

        async def go() -> None:
            async with db.transaction(sched.sessions) as session:
                await session.execute(text(sql), _page_params(at, batch))

        return go

    async def redis_ping() -> None:
        await redis.ping()

    n = 0

    async def arq_enqueue() -> None:  # arq's own enqueue of a job with a fresh id: what a run needs
        nonlocal n
        n += 1
        await sched.redis.enqueue_job(
            "noop", n, _job_id=f"{QUEUE}:ceiling:{n}", _queue_name=f"{QUEUE}:ceiling"
        )

    idle_at = now - timedelta(hours=2)
    return {
        "pg_round_trip_ms": await _best_ms(round_trip, 200),
        "redis_round_trip_ms": await _best_ms(redis_ping, 200),
        "arq_enqueue_ms": await _best_ms(arq_enqueue, 200),
        "due_ids_read_ms": await _best_ms(due_ids, 20),
        "idle_page_index_ms": await _best_ms(page(idle_at, index=True), 20),
        "idle_page_table_scan_ms": await _best_ms(page(idle_at, index=False), 10),
        "busy_page_index_ms": await _best_ms(page(now, index=True), 10),
        "busy_page_table_scan_ms": await _best_ms(page(now, index=False), 10),
    }


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
        out["explain_grace"] = await explain_grace(sched, now, settings.scan_batch_size)
        out["index_proof"] = {
            "due_scopes": index_proof(out["explain"], "ix_key_scopes_due", "key_scopes s"),
            "expired_graces": index_proof(out["explain_grace"], "ix_data_keys_grace_until", "data_keys d"),
        }
        peer_plan = await explain_table_scan(sched, now, settings.scan_batch_size)
        out["index_proof"]["table_scan_peer"] = index_proof(peer_plan, "ix_key_scopes_due", "key_scopes s")
        ref = await ceilings(sched, r, now, settings.scan_batch_size)
        out["ceilings"] = {k: round(v, 4) for k, v in ref.items()}
        per_run_ms = out["catch_up"]["seconds"] * 1e3 / max(1, out["catch_up"]["enqueued"])
        out["ratios"] = {
            "idle_scan_vs_pg_round_trip": round(
                out["idle"]["seconds_median"] * 1e3 / ref["pg_round_trip_ms"], 2
            ),
            "busy_scan_vs_due_ids_read": round(
                out["busy"]["seconds_median"] * 1e3 / ref["due_ids_read_ms"], 2
            ),
            "catch_up_per_run_vs_redis_round_trip": round(per_run_ms / ref["redis_round_trip_ms"], 2),
            "catch_up_per_run_vs_arq_enqueue": round(per_run_ms / ref["arq_enqueue_ms"], 2),
            "idle_page_table_scan_vs_index": round(
                ref["idle_page_table_scan_ms"] / ref["idle_page_index_ms"], 1
            ),
            "busy_page_table_scan_vs_index": round(
                ref["busy_page_table_scan_ms"] / ref["busy_page_index_ms"], 1
            ),
        }
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
    ref, ratio, proof = out["ceilings"], out["ratios"], out["index_proof"]
    print("ceilings measured in this run (medians):")
    print(
        f"  Postgres: one statement in its own transaction (BEGIN; SELECT 1; COMMIT) "
        f"{ref['pg_round_trip_ms']:.3f} ms; Redis round trip (PING) {ref['redis_round_trip_ms']:.3f} ms; "
        f"one arq enqueue_job, one at a time {ref['arq_enqueue_ms']:.3f} ms"
    )
    print(f"  bare index read of the {out['due']:,} due ids, in order: {ref['due_ids_read_ms']:.2f} ms")
    print(
        f"  due-scope page, nothing due: {ref['idle_page_index_ms']:.2f} ms on ix_key_scopes_due, "
        f"{ref['idle_page_table_scan_ms']:.2f} ms on a table scan of key_scopes"
    )
    print(
        f"  due-scope page, {min(out['due'], out['batch']):,} due: {ref['busy_page_index_ms']:.2f} ms "
        f"on the index, {ref['busy_page_table_scan_ms']:.2f} ms on a table scan"
    )
    print("ratios:")
    print(
        f"  idle scan / one-statement transaction:      {ratio['idle_scan_vs_pg_round_trip']:7.2f}x  "
        f"(it issues {i['statements']}: the floor is {i['statements']}x)"
    )
    print(f"  busy scan / bare read of the due ids:       {ratio['busy_scan_vs_due_ids_read']:7.2f}x")
    print(
        "  catch-up, per run opened / Redis round trip: "
        f"{ratio['catch_up_per_run_vs_redis_round_trip']:7.2f}x"
    )
    print(f"  catch-up, per run opened / arq enqueue_job:  {ratio['catch_up_per_run_vs_arq_enqueue']:7.2f}x")
    print(f"  idle page, table scan / index:              {ratio['idle_page_table_scan_vs_index']:7.1f}x")
    print(f"  busy page, table scan / index:              {ratio['busy_page_table_scan_vs_index']:7.1f}x")
    for name, p in proof.items():
        print(f"  {name} query: uses its index: {p['uses_index']}; table scan: {p['table_scan']}")
    print("EXPLAIN (ANALYZE, BUFFERS) of one page of the due-scope query:")
    print(out["explain"])
    print("EXPLAIN (ANALYZE) of one page of the expired-grace query:")
    print(out["explain_grace"])


if __name__ == "__main__":
    main()
