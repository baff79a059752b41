"""``keyrotor scheduler [--once] [--dry-run]``: the scheduler process (worker/scheduler.py)."""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime
from typing import Annotated, Any

import typer
from rich.table import Table

from keyrotor.census.columns import load_targets
from keyrotor.errors import InvalidInput
from keyrotor.schedule.plan import RotationPlan, plan_rotation, plan_scan
from keyrotor.schedule.scan import ScanReport
from keyrotor.settings import Settings
from keyrotor.store import db
from keyrotor.worker.cli.common import err_console, logs_to_stderr, out_console, print_json, run
from keyrotor.worker.logs import configure_logging

# keyrotor.worker.scheduler (APScheduler, arq) is imported by the commands that need it: every CLI
# invocation imports this module.


def register(app: typer.Typer) -> None:
    app.command("scheduler")(scheduler)


def _fmt_s(seconds: float) -> str:
    if seconds < 60:
        return f"{seconds:.1f} s"
    if seconds < 3600:
        return f"{seconds / 60:.1f} min"
    return f"{seconds / 3600:.1f} h"


async def dry_run(settings: Settings, now: datetime) -> dict[str, Any]:
    """The document ``scheduler --dry-run`` prints: what one scan at ``now`` would enqueue."""
    from keyrotor.worker.scheduler import replica_job_id, scan_config

    engine = db.create_engine(settings.database_url, pool_size=1, max_overflow=1)
    try:
        sessions = db.sessionmaker(engine)
        plan = await plan_scan(
            sessions,
            now,
            scan_config(settings),
            rows_per_second=settings.estimate_rows_per_second,
            managed=await load_targets(sessions),
        )
    finally:
        await engine.dispose()
    return {**plan.as_dict(), "replica_job": replica_job_id(settings, now)}


def _print_plan(doc: dict[str, Any]) -> None:
    table = Table(title=f"would enqueue at {doc['now'][:19]} UTC (dry run: nothing written)")
    for col in ("job", "scope", "versions", "why", "rows by version", "est. time"):
        table.add_column(col)
    for p in doc["rotations"]:
        rows = ", ".join(f"v{v}: {n:,}" for v, n in p["rows_by_version"].items()) or "-"
        table.add_row(
            "rotate_dek",
            p["scope"],
            f"v{p['from_version']} -> v{p['to_version']}",
            p["due"]["reason"] if p["due"] else "-",
            rows,
            _fmt_s(p["estimated_seconds"]),
        )
    for r in doc["retirements"]:
        if r["destroy"]:  # a retired version whose window passed: destroy_dek proves again first
            why, job = f"window ended {r['destroy_after'][:19]}", "destroy_dek"
        else:
            why, job = f"grace ended {r['grace_until'][:19]}", "retire_dek"
        table.add_row(job, r["scope"], f"v{r['version']}", why, "", "")
    table.add_row("check_replicas", "-", "-", "hourly", "", "")
    out_console.print(table)
    for s in doc["skipped"]:
        what = f"v{s['to_version']}" if s["kind"] == "rotation" else f"v{s['version']}"
        until = f" until {s['retry_at'][:19]}" if s["retry_at"] else ""
        err_console.print(f"skipped {s['kind']} of {s['scope']} {what}: {s['skip']}{until}")
    est = doc["estimated_seconds"]
    err_console.print(
        f"{len(doc['rotations'])} rotations ({doc['rows_total']:,} rows, ~{_fmt_s(est or 0)} at "
        f"{_rate(doc)}), {len(doc['retirements'])} retirements"
    )


def scheduler(
    once: Annotated[bool, typer.Option("--once", help="scan once now, enqueue, and exit")] = False,
    dry_run_: Annotated[
        bool,
        typer.Option("--dry-run", help="print what one scan would enqueue; write nothing (implies --once)"),
    ] = False,
    json_out: Annotated[bool, typer.Option("--json", help="with --once/--dry-run: print JSON")] = False,
) -> None:
    """Enqueue due rotations, expired graces and the hourly replica check (leader or hot standby).

    Without --once it runs until SIGTERM/SIGINT: any number may run; one leads (a Postgres
    advisory lock), the others take over within one scan interval if it dies.
    """
    from keyrotor.worker.scheduler import Scheduler

    if json_out and not (once or dry_run_):
        raise InvalidInput("--json needs --once or --dry-run (the long-running scheduler prints logs)")
    settings = Settings.from_env()
    if dry_run_:
        doc = run(lambda: dry_run(settings, datetime.now(UTC)))
        if json_out:
            print_json(doc)
        else:
            _print_plan(doc)
        return
    if once:
        logs_to_stderr(settings)

        async def go() -> tuple[ScanReport, str | None]:
            async with Scheduler(settings) as s:
                report = await s.scan()
                return report, await s.enqueue_replica_check(report.now)

        report, replica = run(go)
        report.replica_job = replica
        if json_out:
            print_json(report.as_dict())
        else:
            err_console.print(
                f"opened and enqueued {len(report.rotations)} rotations, {len(report.retirements)} "
                f"retirements; skipped {report.skipped or 'none'}"
                + (f"; enqueued {replica}" if replica else "")
            )
        return
    configure_logging(settings)

    async def forever() -> None:
        async with Scheduler(settings) as s:
            await s.run()

    asyncio.run(forever())


def rotate_dry_run(scope: str, *, json_out: bool) -> None:
    """``keyrotor rotate SCOPE --dry-run``: what rotating the scope now would do; writes nothing."""
    from keyrotor.worker.scheduler import scan_config

    settings = Settings.from_env()

    async def go() -> RotationPlan:
        engine = db.create_engine(settings.database_url, pool_size=1, max_overflow=1)
        try:
            sessions = db.sessionmaker(engine)
            return await plan_rotation(
                sessions,
                scope,
                now=datetime.now(UTC),
                cfg=scan_config(settings),
                rows_per_second=settings.estimate_rows_per_second,
                managed=await load_targets(sessions),
            )
        finally:
            await engine.dispose()

    plan = run(go)
    doc = {**plan.as_dict(), "dry_run": True}
    if json_out:
        print_json(doc)
        return
    rows = ", ".join(f"v{v}: {n:,}" for v, n in doc["rows_by_version"].items()) or "no rows"
    joined = f" (joins open run {plan.open_run['id']}, {plan.open_run['state']})" if plan.open_run else ""
    err_console.print(
        f"dry run: {scope} v{plan.from_version} -> v{plan.to_version}{joined}: "
        f"re-encrypt {plan.rows_total:,} rows ({rows}), ~{_fmt_s(plan.estimate_s)} "
        f"at {_rate(doc)}; nothing written"
    )


def _rate(doc: dict[str, Any]) -> str:
    if doc["rate_source"] == "measured":
        return f"{doc['rows_per_second']:,.0f} rows/s (measured on the last {doc['rate_runs']} rotations)"
    return f"{doc['rows_per_second']:,.0f} rows/s (KEYROTOR_ESTIMATE_ROWS_PER_SECOND: none measured yet)"
