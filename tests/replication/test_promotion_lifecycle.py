"""Promotion carries the old primary's key lifecycle over, and never brings back a key the old
primary may have destroyed (docs/replication.md, "Promotion").

A region's copy records the DEK's state and dates as the primary had them when it was copied,
and the copy is proven current as of its write or its region's last full in-sync check. With
the primary down, promotion adopts only what that proof rules out as destroyed.
"""

from __future__ import annotations

from typing import Any

import pytest

from keyrotor import KeyManager, Settings
from keyrotor.census import report as census_report
from keyrotor.census.locations import uncovered_locations
from keyrotor.errors import Conflict
from keyrotor.queue.client import KeyrotorClient
from keyrotor.store import db
from tests.destruction_helpers import expire_window, open_destructions, wait_run
from tests.replication.conftest import PRIMARY, REGIONS, rep_of, settle, sql, statuses, unreachable
from tests.replication.proxy import PgProxy
from tests.rotation_helpers import cleanup_queue, run_burst_worker, worker_env

OLD = "sk-ant-api03-promotion-lifecycle-0123456789"
DATES = "d.state, d.activated_at, d.grace_until, d.retired_at, d.destroy_after"
KEY_ROWS = (
    f"SELECT s.name, d.version, {DATES} FROM data_keys d JOIN key_scopes s ON s.id = d.scope_id "
    "ORDER BY s.name, d.version"
)


def _env(renv: dict[str, str]) -> dict[str, str]:
    return worker_env({**renv, "KEYROTOR_AUDIT": "async"}, KEYROTOR_METRICS_PORT="0")


async def _rotate(s: Settings, scope: str, *, retire: bool) -> None:
    """Rotate ``scope`` (v1 to grace, v2 active) and maybe retire v1 at once."""
    async with KeyrotorClient(s) as client:
        handle = await client.rotate(scope)
        await run_burst_worker(s)
        await handle.result(timeout_s=10)
        if retire:
            handle = await client.retire(scope, 1, force_now=True)
            await run_burst_worker(s)
            await handle.result(timeout_s=10)


async def _destroy(s: Settings, scope: str) -> None:
    """The destruction window of ``scope`` v1 passes on the primary, and its run erases it."""
    await expire_window(s.database_url, scope, 1)
    (run,) = await open_destructions(s)
    await run_burst_worker(s)
    assert (await wait_run(s, run.id)).detail["outcome"] == "destroyed"


async def _rows(url: str) -> list[tuple[Any, ...]]:
    return [tuple(r) for r in await sql(url, KEY_ROWS)]


async def test_promotion_with_the_primary_down_never_adopts_a_key_it_destroyed(
    renv: dict[str, str], region_urls: dict[str, str], proxies: dict[str, PgProxy]
) -> None:
    """eu-west-1 is away from the rotation on: its copy of v1 says ``active``. ap-south-1 is
    away from the destruction: its copy says ``retired``. A week passed (the window) since
    either was last proven current: neither may be promoted while the primary is down."""
    wenv = _env(renv)
    s = Settings.from_env(wenv)
    try:
        async with KeyManager(s, environ=wenv) as km:
            await km.put_secret("anthropic", "prod", OLD)
            await settle(km)
        async with unreachable(proxies["eu-west-1"]):
            await _rotate(s, "anthropic", retire=True)
            async with unreachable(proxies["ap-south-1"]):
                await _destroy(s, "anthropic")
        copies = "SELECT dek_version, state FROM replica_keys ORDER BY dek_version"
        assert [tuple(r) for r in await sql(region_urls["eu-west-1"], copies)] == [(1, "active")]
        assert [tuple(r) for r in await sql(region_urls["ap-south-1"], copies)] == [
            (1, "retired"),
            (2, "active"),
        ]
        for url in region_urls.values():  # the days of the window passed for the copies too
            await sql(url, "UPDATE replica_keys SET replicated_at = now() - interval '8 days'")
        async with KeyManager(s, environ=wenv) as km, unreachable(proxies[PRIMARY]):
            for region in REGIONS:
                with pytest.raises(Conflict, match="not proven"):
                    await rep_of(km).promote(region, by="ops@example")
        for url in region_urls.values():  # nothing written: no key, no fence
            assert await _rows(url) == []
            assert (await sql(url, "SELECT count(*) FROM replica_promotions"))[0][0] == 0
    finally:
        await cleanup_queue(wenv["KEYROTOR_QUEUE_NAME"])


async def test_promotion_carries_every_live_key_over_with_its_dates(
    renv: dict[str, str], region_urls: dict[str, str], proxies: dict[str, PgProxy]
) -> None:
    """A grace DEK, a retired one whose destruction is not due, and the active ones become the
    promoted store's DEKs in their states and with the primary's dates: the new primary ends
    the grace when the old one would have. The retired key's destruction is not sooner than
    the old primary's, nor than a full window from the promotion (test_promotion_scopes.py)."""
    wenv = _env(renv)
    s = Settings.from_env(wenv)
    try:
        async with KeyManager(s, environ=wenv) as km:
            await km.put_secret("anthropic", "prod", OLD)
            await km.encrypt("openai", "sk-proj-promotion-lifecycle-0123456789", context="row:1")
            await settle(km)
        await _rotate(s, "anthropic", retire=True)
        await _rotate(s, "openai", retire=False)
        primary = await _rows(s.database_url)
        assert [r[2] for r in primary] == ["retired", "active", "grace", "active"]
        async with KeyManager(s, environ=wenv) as km, unreachable(proxies[PRIMARY]):
            doc = await rep_of(km).promote("eu-west-1", by="ops@example")
        assert doc["deks"] == 4
        promoted = await _rows(region_urls["eu-west-1"])
        assert [r[:-1] for r in promoted] == [r[:-1] for r in primary]
        assert promoted[0][-1] >= primary[0][-1]  # the retired v1's destroy_after
        assert [r[-1] for r in promoted[1:]] == [r[-1] for r in primary[1:]]
        # The old primary's census stays behind: each adopted version keeps its key (the proof
        # of a retirement or destruction refuses) until an operator has registered the tables of
        # its values here and acknowledged `(unrecorded)`, which covers every promoted scope.
        assert await _uncovered(region_urls["eu-west-1"]) == {
            ("anthropic", 1): ["(unrecorded)"],
            ("anthropic", 2): ["(unrecorded)"],
            ("openai", 1): ["(unrecorded)"],
            ("openai", 2): ["(unrecorded)"],
        }
        engine = db.create_engine(region_urls["eu-west-1"])
        try:
            async with db.transaction(db.sessionmaker(engine)) as session:
                ack = await census_report.ignore(
                    session, "(unrecorded)", reason="every table registered here", actor="ops@example"
                )
        finally:
            await engine.dispose()
        assert ack["scopes"] == ["anthropic", "openai"]
        assert all(found == [] for found in (await _uncovered(region_urls["eu-west-1"])).values())
    finally:
        await cleanup_queue(wenv["KEYROTOR_QUEUE_NAME"])


async def _uncovered(url: str) -> dict[tuple[str, int], list[str]]:
    """What the census check of a retirement or destruction finds for each DEK of the store."""
    engine = db.create_engine(url)
    try:
        async with db.transaction(db.sessionmaker(engine)) as session:
            keys = await sql(
                url,
                "SELECT s.name, s.id, d.version FROM data_keys d JOIN key_scopes s ON s.id = d.scope_id",
            )
            return {
                (name, version): await uncovered_locations(session, sid, name, version)
                for name, sid, version in keys
            }
    finally:
        await engine.dispose()


async def test_promotion_with_the_primary_down_keeps_a_key_due_for_destruction_for_a_fresh_window(
    renv: dict[str, str], region_urls: dict[str, str], proxies: dict[str, PgProxy]
) -> None:
    """ap-south-1 was proven in sync (its copy of v1 retired, with its destruction date), then
    cut off while the date passed. The primary destroyed v1 here, but it might as well have
    cancelled the destruction (a use, a value the proof found), and the copy cannot tell: leaving
    it out would be a destruction without proof. v1 is adopted, retired, its destruction a whole
    window after the promotion, when the new primary's own proof decides."""
    wenv = _env(renv)
    s = Settings.from_env(wenv)
    try:
        async with KeyManager(s, environ=wenv) as km:
            await km.put_secret("anthropic", "prod", OLD)
            await settle(km)
        await _rotate(s, "anthropic", retire=True)
        async with KeyManager(s, environ=wenv) as km:
            report = await rep_of(km).check(repair=False)
            assert statuses(report) == {"eu-west-1": "in_sync", "ap-south-1": "in_sync"}
        async with unreachable(proxies["ap-south-1"]):
            await _destroy(s, "anthropic")
        ap = region_urls["ap-south-1"]
        # The copy's date passed as the primary's did.
        await sql(
            ap, "UPDATE replica_keys SET destroy_after = now() - interval '1 second' WHERE dek_version = 1"
        )
        async with KeyManager(s, environ=wenv) as km, unreachable(proxies[PRIMARY]):
            doc = await rep_of(km).promote("ap-south-1", by="ops@example")
        assert doc["deks"] == 2
        assert [r[:3] for r in await _rows(ap)] == [("anthropic", 1, "retired"), ("anthropic", 2, "active")]
        (days,) = (
            await sql(
                ap,
                "SELECT extract(epoch FROM destroy_after - now()) / 86400 FROM data_keys WHERE version = 1",
            )
        )[0]
        assert s.destroy_after_days - 0.01 <= days <= s.destroy_after_days
    finally:
        await cleanup_queue(wenv["KEYROTOR_QUEUE_NAME"])


async def test_a_changed_destruction_date_makes_a_copy_stale(
    renv: dict[str, str], region_urls: dict[str, str]
) -> None:
    """A cancelled destruction (or a retirement again, with a new window) changes no state: the
    copy must still follow it, or a promotion would carry the wrong date over."""
    wenv = _env(renv)
    s = Settings.from_env(wenv)
    try:
        async with KeyManager(s, environ=wenv) as km:
            await km.put_secret("anthropic", "prod", OLD)
            await settle(km)
        await _rotate(s, "anthropic", retire=True)
        await sql(s.database_url, "UPDATE data_keys SET destroy_after = NULL WHERE version = 1")
        async with KeyManager(s, environ=wenv) as km:
            report = await rep_of(km).check(repair=False)
            assert statuses(report) == {"eu-west-1": "stale", "ap-south-1": "stale"}
            report = await rep_of(km).check(repair=True)
            assert statuses(report) == {"eu-west-1": "in_sync", "ap-south-1": "in_sync"}
    finally:
        await cleanup_queue(wenv["KEYROTOR_QUEUE_NAME"])
