"""``migrate_legacy_range(run_id, lo, hi)``: migrate one id range of a fanned-out legacy run."""

from __future__ import annotations

import concurrent.futures
import os
from typing import Any

import structlog

from keyrotor.jobs.common import deps, is_transient, retry
from keyrotor.legacy import ranges as legacy_ranges
from keyrotor.legacy.batch import make_executor

# One scrypt pool a worker process, shared by the range jobs it runs at once (a pool each would
# start cores x jobs processes). Replaced if a pool process died.
_pool: concurrent.futures.ProcessPoolExecutor | None = None


def _shared_pool(workers: int) -> concurrent.futures.ProcessPoolExecutor:
    global _pool
    if _pool is None or getattr(_pool, "_broken", False):
        _pool = make_executor(workers)
    return _pool


async def migrate_legacy_range(
    ctx: dict[str, Any], run_id: int, lo: int, hi: int, *, target: str = "secrets"
) -> dict[str, Any]:
    """Migrate the legacy values of ``target`` with ``lo <= id <= hi`` (scrypt in a process pool).

    Idempotent: it resumes after the range's last committed batch, and the range that finishes
    last completes the run.

    Returns:
        ids and counts (never values).
    """
    d = deps(ctx)
    structlog.contextvars.bind_contextvars(run_id=run_id)
    workers = d.settings.legacy_workers or os.cpu_count() or 1
    try:
        outcome = await legacy_ranges.migrate_range(
            d.km,
            run_id,
            target,
            lo,
            hi,
            executor=_shared_pool(workers),
            workers=workers,
            batch_rows=d.settings.legacy_batch_rows,
        )
    except Exception as exc:
        if is_transient(exc):
            raise retry(ctx, exc) from exc
        raise
    return outcome.summary()
