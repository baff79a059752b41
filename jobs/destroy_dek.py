"""``destroy_dek(scope, version)``: erase a retired DEK version whose destruction window passed unused."""

from __future__ import annotations

from typing import Any

import structlog

from keyrotor.jobs import replicas
from keyrotor.jobs.common import deps, is_transient, retry
from keyrotor.rotation import destruction


async def destroy_dek(
    ctx: dict[str, Any], scope: str, version: int, *, trigger: str = "schedule", run_id: int
) -> dict[str, Any]:
    """Re-prove and erase the retired ``version`` (or cancel its erasure after a use, or a
    failed proof). Idempotent: a run already ended returns its outcome. Refusals are permanent:
    the job fails with the reason."""
    d = deps(ctx)
    structlog.contextvars.bind_contextvars(scope=scope, run_id=run_id, trigger=trigger)
    try:
        result = await destruction.destroy_dek(d.rc, scope, version, run_id=run_id, job_id=ctx.get("job_id"))
    except Exception as exc:
        if is_transient(exc):
            raise retry(ctx, exc) from exc
        raise
    if result.outcome == destruction.DESTROYED:
        # The regions' copies go now (best effort), so no failover read can serve the key; the
        # replication enqueued after deletes whatever a region that was down still holds.
        if d.km.replication is not None:
            await d.km.replication.drop_destroyed(scope, version)
        await replicas.follow(ctx, "destroy_dek", scope, f"v{version}")
    return result.summary()
