"""Replication follows key changes at once (enqueued by the rotation jobs), and the hourly
``check_replicas`` job grades and repairs: all through a real arq worker."""

from __future__ import annotations

import json

from arq import create_pool
from arq.connections import RedisSettings

from keyrotor import KeyManager, Settings
from keyrotor.queue.client import KeyrotorClient
from keyrotor.queue.serialization import ARQ_SERIALIZERS
from tests.conftest import MASTER_KEY
from tests.replication.conftest import rep_of, settle, sql, statuses
from tests.rotation_helpers import cleanup_queue, run_burst_worker, worker_env

KEY_2 = "second-master-key-4b8e2a6c0d9f1e3a5c7b9d0e2f4a6c8e"
KEY_3 = "third-master-key-9e1c3a5b7d0f2e4a6c8b0d1f3e5a7c9b2"


async def test_kek_and_dek_rotation_are_followed_by_replication(
    renv: dict[str, str], region_urls: dict[str, str]
) -> None:
    wenv = worker_env(renv, KEYROTOR_METRICS_PORT="0")
    try:
        await _scenario(wenv, region_urls)
    finally:
        await cleanup_queue(wenv["KEYROTOR_QUEUE_NAME"])


async def _scenario(wenv: dict[str, str], region_urls: dict[str, str]) -> None:
    s1 = Settings.from_env(wenv)
    async with KeyManager(s1, environ=wenv) as km:
        tokens = {
            scope: await km.encrypt(scope, f"sk-{scope}", context="c") for scope in ("anthropic", "openai")
        }
        await settle(km)
    v2 = {**wenv, "ENCRYPTION_KEY": KEY_2, "ENCRYPTION_KEY_VERSION": "2"}
    v2["ENCRYPTION_KEYS_PREVIOUS"] = json.dumps({"1": MASTER_KEY})

    # The fault: a KEK rotation by a worker that does not know the regions leaves every copy
    # on the old KEK version.
    blind = Settings.from_env({**v2, "KEYROTOR_REGIONS": ""})
    async with KeyrotorClient(blind) as client:
        handle = await client.rotate_kek()
        await run_burst_worker(blind)
        await handle.result(timeout_s=5)
    s2 = Settings.from_env(v2)
    async with KeyManager(s2, environ=v2) as km:
        report = await rep_of(km).check(repair=False)
        assert statuses(report) == {"eu-west-1": "stale", "ap-south-1": "stale"}
        assert report.regions[0].kek_version == 1

    # A DEK rotation by a worker that knows them: the new DEK (and the old one, now in grace)
    # reach every region before anyone asks.
    async with KeyrotorClient(s2) as client:
        handle = await client.rotate("anthropic")
        await run_burst_worker(s2)
        await handle.result(timeout_s=5)
    for url in region_urls.values():
        rows = await sql(
            url, "SELECT dek_version, state, kek_version FROM replica_keys WHERE scope = 'anthropic'"
        )
        assert sorted(tuple(r) for r in rows) == [(1, "grace", 2), (2, "active", 2)]

    # The hourly check, as the scheduler enqueues it (no arguments). Configured to report only,
    # it finds the rest stale and leaves them; by default it repairs them.
    redis = await create_pool(RedisSettings.from_dsn(s2.redis_url), **ARQ_SERIALIZERS)
    try:
        report_only = Settings.from_env({**v2, "KEYROTOR_REPLICA_REPAIR": "false"})
        job = await redis.enqueue_job(
            "check_replicas", _job_id=f"{s2.queue_name}:c1", _queue_name=s2.queue_name
        )
        assert job is not None
        await run_burst_worker(report_only)
        doc = await job.result(timeout=5)
        assert [(r["status"], r["repaired"]) for r in doc["regions"]] == [("stale", 0), ("stale", 0)]
        job = await redis.enqueue_job(
            "check_replicas", _job_id=f"{s2.queue_name}:c2", _queue_name=s2.queue_name
        )
        assert job is not None
        await run_burst_worker(s2)
        doc = await job.result(timeout=5)
    finally:
        await redis.aclose()
    assert [(r["region"], r["status"], r["found"], r["kek_version"]) for r in doc["regions"]] == [
        ("eu-west-1", "in_sync", "stale", 2),
        ("ap-south-1", "in_sync", "stale", 2),
    ]

    # A KEK rotation by a worker that knows the regions: replicated at once, nothing stale.
    v3 = {**wenv, "ENCRYPTION_KEY": KEY_3, "ENCRYPTION_KEY_VERSION": "3"}
    v3["ENCRYPTION_KEYS_PREVIOUS"] = json.dumps({"1": MASTER_KEY, "2": KEY_2})
    s3 = Settings.from_env(v3)
    async with KeyrotorClient(s3) as client:
        handle = await client.rotate_kek()
        await run_burst_worker(s3)
        await handle.result(timeout_s=5)
    async with KeyManager(s3, environ=v3) as km:
        report = await rep_of(km).check(repair=False)
        assert statuses(report) == {"eu-west-1": "in_sync", "ap-south-1": "in_sync"}
        assert {r.kek_version for r in report.regions} == {3}
        # Every region's copies still open every value.
        for region in rep_of(km).regions:
            for scope in tokens:
                assert await region.unwrap_copy(scope, 1) is not None
