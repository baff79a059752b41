"""The leading scheduler follows new DEKs to the regions within a scan, not at the hourly check."""

from __future__ import annotations

from keyrotor import KeyManager, Settings
from keyrotor.worker.scheduler import Scheduler
from tests.replication.conftest import sql
from tests.rotation_helpers import cleanup_queue, run_burst_worker, worker_env


async def test_a_scope_the_application_could_not_replicate_is_copied_after_the_next_scan(
    renv: dict[str, str], region_urls: dict[str, str]
) -> None:
    wenv = worker_env(renv, KEYROTOR_METRICS_PORT="0")
    settings = Settings.from_env(wenv)
    # The application does not copy its new scopes' DEKs itself (least-privilege roles cannot
    # write the regions' tables; here: it is not told about the regions at all).
    app = Settings.from_env({**wenv, "KEYROTOR_REGIONS": "", "KEYROTOR_LISTEN_KEY_CHANGES": "false"})
    try:
        async with Scheduler(settings) as sched:
            assert await sched.tick() is not None  # leads; notes the newest DEK
            assert await sched.follow_new_deks() == []
            await run_burst_worker(settings)  # the hour's check_replicas, queued on taking the lead
            assert await sched.redis.zrange(settings.queue_name, 0, -1) == []
            async with KeyManager(app) as km:
                for scope in ("tenant-7/openai", "tenant-8/anthropic"):
                    await km.encrypt(scope, f"sk-{scope}", context="c")
            for url in region_urls.values():
                assert await sql(url, "SELECT * FROM replica_keys") == []

            await sched.tick()  # the next scan queues one replicate_keys a new scope
            queue = [j.decode() for j in await sched.redis.zrange(settings.queue_name, 0, -1)]
            assert all(":replicate_keys:new_dek:" in j for j in queue), queue  # and nothing else
            assert sorted(j.split(":")[-2] for j in queue) == ["tenant-7/openai", "tenant-8/anthropic"]
            await run_burst_worker(settings)
            for url in region_urls.values():
                rows = await sql(url, "SELECT scope, dek_version, state FROM replica_keys ORDER BY scope")
                assert [tuple(r) for r in rows] == [
                    ("tenant-7/openai", 1, "active"),
                    ("tenant-8/anthropic", 1, "active"),
                ]
            await sched.tick()  # nothing new: nothing queued
            assert await sched.redis.zrange(settings.queue_name, 0, -1) == []
    finally:
        await cleanup_queue(wenv["KEYROTOR_QUEUE_NAME"])
