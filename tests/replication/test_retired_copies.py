"""A retired DEK keeps its regional copies (it still decrypts, and may be restored); only a
destroyed one's copies are removed, by the replication its destruction enqueues."""

from __future__ import annotations

from keyrotor import KeyManager, Settings
from keyrotor.queue.client import KeyrotorClient
from tests.destruction_helpers import expire_window, open_destructions, wait_run
from tests.replication.conftest import rep_of, settle, sql, statuses
from tests.rotation_helpers import cleanup_queue, run_burst_worker, worker_env


async def _copies(region_urls: dict[str, str]) -> list[list[tuple[int, str]]]:
    return [
        [
            tuple(r)
            for r in await sql(
                url,
                "SELECT dek_version, state FROM replica_keys WHERE scope = 'anthropic' ORDER BY dek_version",
            )
        ]
        for url in region_urls.values()
    ]


async def test_retired_keeps_its_copies_and_destroyed_loses_them(
    renv: dict[str, str], region_urls: dict[str, str]
) -> None:
    wenv = worker_env(renv, KEYROTOR_METRICS_PORT="0")
    s = Settings.from_env(wenv)
    try:
        async with KeyManager(s, environ=wenv) as km:
            await km.put_secret("anthropic", "prod", "sk-ant-api03-regions-0123456789")
            await settle(km)
        async with KeyrotorClient(s) as client:
            handle = await client.rotate("anthropic")
            await run_burst_worker(s)
            await handle.result(timeout_s=10)
            handle = await client.retire("anthropic", 1, force_now=True)
            await run_burst_worker(s)  # retire_dek, then the replicate_keys it enqueues
            await handle.result(timeout_s=10)
        assert await _copies(region_urls) == [[(1, "retired"), (2, "active")]] * 2
        async with KeyManager(s, environ=wenv) as km:
            report = await rep_of(km).check(repair=False)
            assert statuses(report) == {"eu-west-1": "in_sync", "ap-south-1": "in_sync"}
            for region in rep_of(km).regions:  # a retired version still opens from the regions
                assert await region.unwrap_copy("anthropic", 1) is not None

        await expire_window(s.database_url, "anthropic", 1)
        (run,) = await open_destructions(s)
        await run_burst_worker(s)  # destroy_dek, then the replicate_keys it enqueues
        assert (await wait_run(s, run.id)).detail["outcome"] == "destroyed"
        assert await _copies(region_urls) == [[(2, "active")]] * 2
    finally:
        await cleanup_queue(wenv["KEYROTOR_QUEUE_NAME"])
