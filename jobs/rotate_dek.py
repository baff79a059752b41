"""``rotate_dek(scope)``: rotate a scope's DEK, or resume its open rotation."""

from __future__ import annotations

from typing import Any

import structlog

from keyrotor.jobs import replicas
from keyrotor.jobs.common import deps, is_transient, retry
from keyrotor.queue.enqueue import enqueue_range
from keyrotor.rotation import dek as rotation


async def rotate_dek(
    ctx: dict[str, Any], scope: str, *, trigger: str = "api", run_id: int | None = None
) -> dict[str, Any]:
    """Drive the scope's DEK rotation: prepare, announce, promote, then either finish it (a small
    scope) or fan it out into ``reencrypt_range`` jobs. Idempotent.

    Returns:
        ids, versions and counts (never key material).
    """
    d = deps(ctx)
    structlog.contextvars.bind_contextvars(scope=scope, run_id=run_id)
    try:
        progress = await rotation.rotate_dek(
            d.rc, scope, trigger=trigger, run_id=run_id, job_id=ctx.get("job_id")
        )
        queued = 0
        for r in progress.ranges:
            queued += await enqueue_range(ctx["redis"], d.settings, r)
    except Exception as exc:
        if is_transient(exc):
            raise retry(ctx, exc) from exc
        raise
    await replicas.follow(ctx, "rotate_dek", scope, progress.run.id)
    return {**progress.summary(), "ranges_enqueued": queued}
