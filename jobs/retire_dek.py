"""``retire_dek(scope, version)``: retire an old DEK version (decrypt-only) once nothing needs it."""

from __future__ import annotations

from typing import Any

import structlog

from keyrotor.jobs import replicas
from keyrotor.jobs.common import deps, is_transient, retry
from keyrotor.rotation import retire


async def retire_dek(
    ctx: dict[str, Any],
    scope: str,
    version: int,
    *,
    force_now: bool = False,
    trigger: str = "api",
    run_id: int | None = None,
) -> dict[str, Any]:
    """Re-encrypt stragglers, prove no value needs ``version``, retire it (its wrapped key is
    kept until ``destroy_after``). Refusals (``GraceNotOver``, ``KeyStillInUse``,
    ``LocationNotCovered``, ``NotRetirable``) are permanent: the job fails with the reason."""
    d = deps(ctx)
    structlog.contextvars.bind_contextvars(scope=scope, run_id=run_id)
    try:
        result = await retire.retire_dek(
            d.rc,
            scope,
            version,
            force_now=force_now,
            trigger=trigger,
            run_id=run_id,
            job_id=ctx.get("job_id"),
        )
    except Exception as exc:
        if is_transient(exc):
            raise retry(ctx, exc) from exc
        raise
    await replicas.follow(ctx, "retire_dek", scope, f"v{version}")
    return result.summary()
