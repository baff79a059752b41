"""``rotate_kek()``: rewrap every DEK under the current KEK version."""

from __future__ import annotations

from typing import Any

import structlog

from keyrotor.jobs import replicas
from keyrotor.jobs.common import deps, is_transient, retry
from keyrotor.rotation import kek as kek_rotation


async def rotate_kek(
    ctx: dict[str, Any], *, trigger: str = "api", run_id: int | None = None
) -> dict[str, Any]:
    """Rotate the KEK (or, for the local keyring, adopt the configured version) and rewrap
    every DEK below it. Idempotent."""
    d = deps(ctx)
    structlog.contextvars.bind_contextvars(run_id=run_id)
    try:
        result = await kek_rotation.rotate_kek(d.rc, trigger=trigger, run_id=run_id, job_id=ctx.get("job_id"))
    except Exception as exc:
        if is_transient(exc):
            raise retry(ctx, exc) from exc
        raise
    summary = result.summary()
    await replicas.follow(ctx, "rotate_kek", None, summary.get("run_id", run_id))
    return summary
