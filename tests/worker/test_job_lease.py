"""A started job's arq "in progress" marker is a lease from the first moment, not the job timeout."""

from __future__ import annotations

import asyncio
from typing import Any

from arq.connections import RedisSettings, create_pool
from arq.worker import Worker

from keyrotor import Settings
from keyrotor.worker.main import LeasedWorker, warn_unleased_markers, worker_settings


def test_a_taken_jobs_marker_starts_as_the_lease(env: dict[str, str]) -> None:
    settings = Settings.from_env({**env, "KEYROTOR_JOB_LEASE_SECONDS": "7"})
    # arq alone marks a taken job for the job timeout plus 10 s: a worker killed before its
    # on_job_start renewed the marker as a lease blocked the job (and its run) that long.
    assert Worker(**worker_settings(settings)).in_progress_timeout_s == settings.job_timeout_s + 10
    # keyrotor's worker marks it for one lease, which job_start then keeps renewing.
    assert LeasedWorker(**worker_settings(settings)).in_progress_timeout_s == 7


def test_a_worker_started_by_arqs_cli_says_what_it_lacks(env: dict[str, str]) -> None:
    # `arq keyrotor.worker.main.WorkerSettings` builds a plain Worker: start-up warns, once.
    settings = Settings.from_env(env)
    assert warn_unleased_markers(Worker(**worker_settings(settings)).ctx)
    assert not warn_unleased_markers(LeasedWorker(**worker_settings(settings)).ctx)


async def test_a_job_cancelled_by_shutdown_does_not_fail_the_close(env: dict[str, str]) -> None:
    # SIGTERM cancels running jobs; one cancelled while storing its result left a cancelled
    # task that arq's close() gathered and re-raised: exit 1, a traceback, no on_shutdown.
    settings = Settings.from_env(env)
    shut_down: list[bool] = []

    async def on_shutdown(ctx: dict[str, Any]) -> None:
        shut_down.append(True)

    worker = LeasedWorker(**{**worker_settings(settings), "on_shutdown": on_shutdown}, handle_signals=False)
    worker._pool = await create_pool(RedisSettings.from_dsn(settings.redis_url))
    job = asyncio.get_running_loop().create_task(asyncio.sleep(60))
    worker.tasks["job"] = job
    await asyncio.sleep(0)
    await asyncio.wait_for(worker.close(), 10)
    assert job.cancelled() and shut_down == [True] and worker._pool is None
