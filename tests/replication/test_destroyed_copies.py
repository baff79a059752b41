"""#19, finding 6: a destroyed key must not outlive its destruction in the regions.

A failover read serves only copies of versions that were pending, active or grace when copied
(a retired one may have been destroyed since, and its uses must be recorded on the primary);
the destruction job deletes the regions' copies itself, without waiting for the replication it
enqueues.
"""

from __future__ import annotations

import pytest

from keyrotor import KeyManager, Settings
from keyrotor.errors import KekUnavailable, StoreUnavailable
from keyrotor.kek.factory import local_keyring
from keyrotor.queue.client import KeyrotorClient
from tests.destruction_helpers import expire_window, open_destructions, wait_run
from tests.replication.conftest import PRIMARY, FailingKek, rep_of, settle, sql
from tests.replication.proxy import PgProxy
from tests.rotation_helpers import cleanup_queue, run_burst_worker, worker_env

OLD, LIVE = "sk-ant-api03-destroyed-copy-0123456789", "sk-proj-live-copy-0123456789"


async def test_failover_serves_no_retired_copy(renv: dict[str, str], region_urls: dict[str, str]) -> None:
    settings = Settings.from_env({**renv, "KEYROTOR_AUDIT": "async"})
    kek = FailingKek(local_keyring(settings))
    async with KeyManager(settings, kek=kek, environ=renv) as km:
        old = await km.encrypt("anthropic", OLD, context="row:1")
        live = await km.encrypt("openai", LIVE, context="row:2")
        await settle(km)
        # What a region holds after a retirement was replicated and the destruction's follow-up
        # never reached it: the copy of a retired version.
        for url in region_urls.values():
            await sql(url, "UPDATE replica_keys SET state = 'retired' WHERE scope = 'anthropic'")
        kek.down = True  # the primary cannot unwrap: reads fail over
        km.invalidate()
        assert await km.decrypt("openai", live, context="row:2") == LIVE  # an active copy serves
        assert rep_of(km).failing_over
        with pytest.raises(KekUnavailable):  # the primary's own error: the copy is not used
            await km.decrypt("anthropic", old, context="row:1")
        kek.down = False


async def test_destruction_deletes_the_copies_in_its_own_job(
    renv: dict[str, str], region_urls: dict[str, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    wenv = worker_env(renv, KEYROTOR_METRICS_PORT="0")
    s = Settings.from_env(wenv)
    copies = "SELECT dek_version, state FROM replica_keys WHERE scope = 'anthropic' ORDER BY dek_version"
    try:
        async with KeyManager(s, environ=wenv) as km:
            await km.put_secret("anthropic", "prod", OLD)
            await settle(km)
        async with KeyrotorClient(s) as client:
            handle = await client.rotate("anthropic")
            await run_burst_worker(s)
            await handle.result(timeout_s=10)
            handle = await client.retire("anthropic", 1, force_now=True)
            await run_burst_worker(s)
            await handle.result(timeout_s=10)
        for url in region_urls.values():
            assert [tuple(r) for r in await sql(url, copies)] == [(1, "retired"), (2, "active")]
        await expire_window(s.database_url, "anthropic", 1)
        (run,) = await open_destructions(s)

        async def no_follow_up(*args: object, **kwargs: object) -> None:
            return None  # the replication job the destruction enqueues: here it never comes

        monkeypatch.setattr("keyrotor.jobs.replicas.follow", no_follow_up)
        await run_burst_worker(s)
        assert (await wait_run(s, run.id)).detail["outcome"] == "destroyed"
        for url in region_urls.values():
            assert [tuple(r) for r in await sql(url, copies)] == [(2, "active")]
    finally:
        await cleanup_queue(wenv["KEYROTOR_QUEUE_NAME"])


async def test_failover_serves_no_copy_that_missed_a_destruction(
    renv: dict[str, str], region_urls: dict[str, str], proxies: dict[str, PgProxy]
) -> None:
    """A region away for the whole destruction window still holds the destroyed DEK's copy in
    the state it had before (here ``active``): failover must not serve it."""
    wenv = worker_env({**renv, "KEYROTOR_AUDIT": "async"}, KEYROTOR_METRICS_PORT="0")
    s = Settings.from_env(wenv)
    try:
        async with KeyManager(s, environ=wenv) as km:
            await km.put_secret("anthropic", "prod", OLD)
            await settle(km)
        (old,) = await sql(s.database_url, "SELECT ciphertext FROM secrets WHERE name = 'prod'")
        for region in ("eu-west-1", "ap-south-1"):
            await proxies[region].cut()  # away from the rotation until after the destruction
        async with KeyrotorClient(s) as client:
            handle = await client.rotate("anthropic")
            await run_burst_worker(s)
            await handle.result(timeout_s=10)
            handle = await client.retire("anthropic", 1, force_now=True)
            await run_burst_worker(s)
            await handle.result(timeout_s=10)
        await expire_window(s.database_url, "anthropic", 1)
        (run,) = await open_destructions(s)
        await run_burst_worker(s)
        assert (await wait_run(s, run.id)).detail["outcome"] == "destroyed"
        for region in ("eu-west-1", "ap-south-1"):
            await proxies[region].heal()
        for url in region_urls.values():
            # The days of the window passed for the regions' copies too.
            await sql(url, "UPDATE replica_keys SET replicated_at = now() - interval '8 days'")
            assert [tuple(r) for r in await sql(url, "SELECT dek_version, state FROM replica_keys")] == [
                (1, "active")
            ]
        async with KeyManager(s, environ=wenv) as km:
            assert await km.get_secret("anthropic", "prod") == OLD  # grants loaded, v2 cached
            await proxies[PRIMARY].cut()  # the primary's store is down: reads fail over
            try:
                with pytest.raises(StoreUnavailable):  # the primary's own error, not the copy
                    await km.decrypt("anthropic", old["ciphertext"], context="secret:prod")
            finally:
                await proxies[PRIMARY].heal()
    finally:
        await cleanup_queue(wenv["KEYROTOR_QUEUE_NAME"])


async def test_failover_serves_a_copy_only_while_it_is_proven_recent(
    renv: dict[str, str], region_urls: dict[str, str]
) -> None:
    settings = Settings.from_env({**renv, "KEYROTOR_AUDIT": "async"})
    kek = FailingKek(local_keyring(settings))
    async with KeyManager(settings, kek=kek, environ=renv) as km:
        live = await km.encrypt("openai", LIVE, context="row:2")
        await settle(km)  # a one-scope replication: it proves the copy it writes, not the region
        for url in region_urls.values():
            await sql(url, "UPDATE replica_keys SET replicated_at = now() - interval '8 days'")
        kek.down = True
        km.invalidate()
        with pytest.raises(KekUnavailable):  # copies no check has proven for 8 days
            await km.decrypt("openai", live, context="row:2")
        kek.down = False
        await rep_of(km).check(repair=False)  # a full check proves each region in sync now
        for region, url in region_urls.items():
            (row,) = await sql(url, "SELECT region, status FROM kek_replicas")
            assert tuple(row) == (region, "in_sync")
        kek.down = True
        km.invalidate()
        assert await km.decrypt("openai", live, context="row:2") == LIVE
        kek.down = False
