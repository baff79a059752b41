"""``reencrypt_range(run_id, lo, hi)``: re-encrypt one id range of a fanned-out rotation."""

from __future__ import annotations

from typing import Any

import structlog

from keyrotor.jobs.common import deps, is_transient, retry
from keyrotor.rotation import ranges


async def reencrypt_range(
    ctx: dict[str, Any], run_id: int, lo: int, hi: int, *, target: str = "secrets"
) -> dict[str, Any]:
    """Re-encrypt rows ``lo <= id <= hi`` of ``target``, a batch a transaction. Idempotent: it
    resumes from the range's cursor, and the range that finishes last completes the run."""
    d = deps(ctx)
    structlog.contextvars.bind_contextvars(run_id=run_id)
    try:
        progress = await ranges.reencrypt_range(d.rc, run_id, lo, hi, target=target)
    except Exception as exc:
        if is_transient(exc):
            raise retry(ctx, exc) from exc
        raise
    return progress.summary()
