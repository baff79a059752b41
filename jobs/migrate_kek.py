"""``migrate_kek()``: rewrap every DEK from one KEK provider to another (``keyrotor kek migrate``)."""

from __future__ import annotations

import contextlib
from typing import Any

import structlog

from keyrotor import runs
from keyrotor.jobs import replicas
from keyrotor.jobs.common import deps, is_transient, retry
from keyrotor.kek.base import PROVIDER_SETTING, KekProvider
from keyrotor.rotation import kek_migration
from keyrotor.store import db


async def migrate_kek(ctx: dict[str, Any], *, run_id: int, trigger: str = "api") -> dict[str, Any]:
    """Drive migration run ``run_id``. The worker's environment must configure both providers
    (the source is the worker's own provider unless the run names another). Idempotent."""
    d = deps(ctx)
    structlog.contextvars.bind_contextvars(run_id=run_id)
    try:
        async with db.transaction(d.sessions) as session:
            run = await runs.require_run(session, run_id)
        source_name = str(run.detail.get("from"))
        target_name = str(run.detail.get("to"))
        async with contextlib.AsyncExitStack() as stack:
            source: KekProvider = d.kek
            if PROVIDER_SETTING.get(d.kek.name) != source_name:
                source = await kek_migration.open_named_provider(source_name, d.settings)
                stack.push_async_callback(source.aclose)
            target = await kek_migration.open_named_provider(target_name, d.settings)
            stack.push_async_callback(target.aclose)
            result = await kek_migration.migrate_kek(
                d.sessions,
                source,
                target,
                run_id=run_id,
                batch_size=d.settings.kek_rewrap_batch,
                job_id=ctx.get("job_id"),
            )
    except Exception as exc:
        if is_transient(exc):
            raise retry(ctx, exc) from exc
        raise
    await replicas.follow(ctx, "migrate_kek", None, run_id)
    return result.summary()
