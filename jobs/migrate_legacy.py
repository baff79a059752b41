"""``migrate_legacy(run_id)``: move legacy ciphertexts to ``kr1`` values, or resume the open run."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

import structlog
from arq.connections import ArqRedis
from arq.jobs import Job, JobStatus

from jobs.common import deps, is_transient, job_id, retry
from keyrotor import legacy_migration, legacy_ranges
from keyrotor.legacy_ranges import LegacyRange
from keyrotor.runs import RunInfo
from keyrotor.settings import Settings


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
                queued += await enqueue_legacy_range(ctx["redis"], d.settings, r)
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


async def enqueue_legacy(redis: ArqRedis, settings: Settings, run: RunInfo) -> Job:
    """Enqueue the job driving ``run`` (a no-op while one with its id is queued or running)."""
    jid = job_id(settings, "migrate_legacy", run.id)
    job = await redis.enqueue_job("migrate_legacy", run.id, _job_id=jid, _queue_name=settings.queue_name)
    if job is not None:
        return job
    existing = Job(jid, redis, _queue_name=settings.queue_name, _deserializer=redis.job_deserializer)
    if run.terminal or await existing.status() != JobStatus.complete:
        return existing
    # The job ended while the run is still open: it gave up after its tries (a worker killed
    # job_max_tries times under it). arq keeps its result, so the same id would be a no-op for
    # an hour; drive the run again under an id of the current minute, as enqueue_driver does.
    again = f"{jid}:r{int(datetime.now(UTC).timestamp() // 60)}"
    job = await redis.enqueue_job("migrate_legacy", run.id, _job_id=again, _queue_name=settings.queue_name)
    return job or Job(again, redis, _queue_name=settings.queue_name, _deserializer=redis.job_deserializer)


async def enqueue_legacy_range(redis: ArqRedis, settings: Settings, r: LegacyRange) -> bool:
    """Enqueue the migration of one id range (a no-op while it is queued or running)."""
    job = await redis.enqueue_job(
        "migrate_legacy_range",
        r.run_id,
        r.lo,
        r.hi,
        target=r.target,
        _job_id=job_id(settings, "legacy", r.run_id, r.target, r.lo),
        _queue_name=settings.queue_name,
    )
    return job is not None
