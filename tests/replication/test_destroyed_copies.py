"""#19, finding 6: a destroyed key must not outlive its destruction in the regions.

A failover read serves only copies of versions that were pending, active or grace when copied
(a retired one may have been destroyed since, and its uses must be recorded on the primary);
the destruction job deletes the regions' copies itself, without waiting for the replication it
enqueues.
"""

from __future__ import annotations

import pytest

from keyrotor import KeyManager, Settings
from keyrotor.errors import KekUnavailable
from keyrotor.kek.factory import local_keyring
from keyrotor.queue.client import KeyrotorClient
from tests.destruction_helpers import expire_window, open_destructions, wait_run
from tests.replication.conftest import FailingKek, rep_of, settle, sql
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
