"""``migrate_legacy(run_id)``: move legacy ciphertexts to ``kr1`` values, or resume the open run."""

from __future__ import annotations

from typing import Any

import structlog

from keyrotor.jobs.common import deps, is_transient, retry
from keyrotor.legacy import migration as legacy_migration
from keyrotor.legacy import ranges as legacy_ranges
from keyrotor.queue.enqueue import enqueue_range


async def migrate_legacy(ctx: dict[str, Any], run_id: int) -> dict[str, Any]:
    """Drive the legacy migration run ``run_id`` (scrypt in a process pool). Idempotent.

    A run of at least twice ``KEYROTOR_LEGACY_RANGE_ROWS`` legacy values is split into id ranges,
    one ``migrate_legacy_range`` job each, for every worker to take part; a smaller one is
    migrated here to its end.

    Returns:
        the report: counts and row ids per column (never values), or the ranges enqueued.
    """
    d = deps(ctx)
    structlog.contextvars.bind_contextvars(run_id=run_id)
    try:
        plan = await legacy_ranges.fan_out(
            d.km, run_id, range_rows=d.settings.legacy_range_rows, job_id=ctx.get("job_id")
        )
        if plan is not None:
            queued = 0
            for r in plan.ranges:
                queued += await enqueue_range(
                    ctx["redis"], d.settings, r, function="migrate_legacy_range", tag="legacy"
                )
            return {
                "run_id": run_id,
                "state": plan.run.state,
                "ranges": len(plan.ranges),
                "ranges_enqueued": queued,
            }
        report = await legacy_migration.migrate_legacy(
            d.km,
            run_id=run_id,
            job_id=ctx.get("job_id"),
            workers=d.settings.legacy_workers,
            batch_rows=d.settings.legacy_batch_rows,
        )
    except Exception as exc:
        if is_transient(exc):
            raise retry(ctx, exc) from exc
        raise
    return report.as_dict()
