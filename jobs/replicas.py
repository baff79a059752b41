"""``check_replicas`` (hourly, from the scheduler) and ``replicate_keys`` (after every key change).

Both grade every secondary region's DEK copies against the primary (``keyrotor.replication.check``);
``replicate_keys`` always repairs, ``check_replicas`` repairs unless ``KEYROTOR_REPLICA_REPAIR``
is false. Results carry region names, statuses, versions and counts: never key material.
"""

from __future__ import annotations

from typing import Any

import structlog
from redis.exceptions import RedisError

from keyrotor.jobs.common import deps, is_transient, retry
from keyrotor.queue.enqueue import job_id
from keyrotor.replication.check import Replication

log = structlog.get_logger("keyrotor.jobs.replicas")

# Jobs after which the regions must follow at once: each creates, promotes, rewraps or destroys DEKs.
FOLLOWED = ("rotate_dek", "retire_dek", "destroy_dek", "rotate_kek", "migrate_kek")


def _replication(ctx: dict[str, Any]) -> Replication | None:
    return deps(ctx).km.replication


def _not_configured(ctx: dict[str, Any]) -> dict[str, Any]:
    return {
        "primary": deps(ctx).settings.primary_region,
        "regions": [],
        "in_sync": True,
        "detail": "no secondary regions configured (KEYROTOR_REGIONS)",
    }


async def check_replicas(
    ctx: dict[str, Any], *, repair: bool | None = None, trigger: str = "schedule"
) -> dict[str, Any]:
    """Check every region's copies; repair them unless configured to report only. Idempotent."""
    rep = _replication(ctx)
    if rep is None:
        return _not_configured(ctx)
    do_repair = deps(ctx).settings.replica_repair if repair is None else repair
    try:
        report = await rep.check(repair=do_repair, actor=f"job:{trigger}")
    except Exception as exc:
        if is_transient(exc):
            raise retry(ctx, exc) from exc
        raise
    doc = report.as_dict()
    log.info(
        "replicas_checked",
        in_sync=report.in_sync,
        statuses={r.region: r.status for r in report.regions},
        repaired=sum(r.repaired for r in report.regions),
        duration_s=doc["duration_s"],
    )
    return doc


async def replicate_keys(
    ctx: dict[str, Any], scope: str | None = None, *, reason: str = "api"
) -> dict[str, Any]:
    """Copy the primary's current DEKs (one scope's, or all) to every region, verified. Idempotent."""
    rep = _replication(ctx)
    if rep is None:
        return _not_configured(ctx)
    structlog.contextvars.bind_contextvars(scope=scope, reason=reason)
    try:
        report = await rep.check(repair=True, scope=scope, actor=f"job:{reason}")
    except Exception as exc:
        if is_transient(exc):
            raise retry(ctx, exc) from exc
        raise
    log.info(
        "keys_replicated",
        statuses={r.region: r.status for r in report.regions},
        repaired=sum(r.repaired for r in report.regions),
    )
    return report.as_dict()


async def follow(ctx: dict[str, Any], reason: str, scope: str | None, ref: object) -> str | None:
    """Enqueue ``replicate_keys`` after a key change (``reason`` names the job, ``ref`` its run).

    A no-op without regions. Never fails the calling job: if Redis refuses, the hourly check
    repairs what this would have copied. Returns the job id if one was enqueued.
    """
    d = deps(ctx)
    if not d.settings.regions or ctx.get("redis") is None:
        return None
    jid = job_id(d.settings, "replicate_keys", reason, scope or "-", ref if ref is not None else "-")
    try:
        job = await ctx["redis"].enqueue_job(
            "replicate_keys", scope, reason=reason, _job_id=jid, _queue_name=d.settings.queue_name
        )
    except (RedisError, OSError) as exc:
        log.warning("replication_enqueue_failed", error=type(exc).__name__, reason=reason)
        return None
    return jid if job is not None else None
