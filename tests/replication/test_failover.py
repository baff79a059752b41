"""Failover: reads keep working through a secondary while the primary is unavailable; promotion."""

from __future__ import annotations

import asyncio

import pytest

from keyrotor import KeyManager, Settings
from keyrotor.errors import Conflict, KekUnavailable, KeyrotorError
from keyrotor.kek.base import KekProvider, WrapContext, WrappedDek
from keyrotor.kek.factory import local_keyring
from keyrotor.replication.check import (
    FAILOVER_READS,
    Region,
    Replication,
    parse_regions,
    region_settings,
)
from tests.conftest import _url
from tests.replication.conftest import (
    PRIMARY,
    REGION_KEYS,
    FailingKek,
    rep_of,
    settle,
    sql,
    statuses,
    unreachable,
)
from tests.replication.proxy import PgProxy

VALUES = {f"tenant-{i}/openai": f"sk-proj-{i:03d}-failover-test-value" for i in range(6)}


async def _seed(km: KeyManager) -> dict[str, str]:
    tokens = {scope: await km.encrypt(scope, value, context="row:9") for scope, value in VALUES.items()}
    await settle(km)
    return tokens


def _failovers(region: str) -> float:
    return float(FAILOVER_READS.labels(region)._value.get())


async def test_primary_store_unreachable_while_decrypts_run_no_decrypt_fails(
    renv: dict[str, str], proxies: dict[str, PgProxy], env: dict[str, str]
) -> None:
    e = {
        **renv,
        "KEYROTOR_GRANTS_TTL_SECONDS": "0.5",  # grants are reloaded during the outage too
        # The audit log lives in the primary: only async audit lets reads go on without it
        # (durable audit fails them closed, tests/keyrotor/test_audit_durable.py).
        "KEYROTOR_AUDIT": "async",
    }
    before = _failovers("eu-west-1") + _failovers("ap-south-1")
    async with KeyManager(Settings.from_env(e), environ=e) as km:
        tokens = await _seed(km)
        stop = asyncio.Event()
        failures: list[str] = []
        done = [0]

        async def reader() -> None:
            while not stop.is_set():
                km.invalidate()  # every read misses the cache: its DEK must come from a store
                for scope, token in tokens.items():
                    try:
                        assert await km.decrypt(scope, token, context="row:9") == VALUES[scope]
                        done[0] += 1
                    except Exception as exc:  # any failed decrypt fails the test
                        failures.append(f"{type(exc).__name__}: {exc}")
                await asyncio.sleep(0)

        readers = [asyncio.create_task(reader()) for _ in range(3)]
        await asyncio.sleep(0.3)
        await proxies[PRIMARY].cut()
        await asyncio.sleep(1.5)
        assert rep_of(km).failing_over
        at_cut = done[0]
        # Now the first secondary is also lost: reads move on to the next one.
        async with unreachable(proxies["eu-west-1"]):
            await asyncio.sleep(1.0)
        during = done[0] - at_cut
        await proxies[PRIMARY].heal()
        await asyncio.sleep(1.5)  # past KEYROTOR_FAILOVER_RETRY_SECONDS: back to the primary
        stop.set()
        await asyncio.gather(*readers)
        assert failures == []
        assert during > 10 and done[0] > at_cut + during
        assert not rep_of(km).failing_over
        assert _failovers("eu-west-1") + _failovers("ap-south-1") > before
        assert _failovers("ap-south-1") > 0
        await km.flush_audit()
    events = await sql(
        env["DATABASE_URL"],
        "SELECT success, metadata->>'state' AS state, error_message FROM encryption_audit_log "
        "WHERE event_type = 'failover' ORDER BY id",
    )
    assert [(ev["success"], ev["state"]) for ev in events] == [(False, "failover"), (True, "recovered")]
    assert "StoreUnavailable" in events[0]["error_message"]


async def test_primary_kek_unavailable_fails_over_and_returns(
    renv: dict[str, str], proxies: dict[str, PgProxy]
) -> None:
    settings = Settings.from_env(renv)
    kek = FailingKek(local_keyring(settings))
    async with KeyManager(settings, kek=kek, environ=renv) as km:
        tokens = await _seed(km)
        kek.down = True
        km.invalidate()
        for scope, token in tokens.items():
            assert await km.decrypt(scope, token, context="row:9") == VALUES[scope]
        assert rep_of(km).failing_over
        # Every region down as well: the primary's own error, not a wrong answer.
        async with unreachable(proxies["eu-west-1"]), unreachable(proxies["ap-south-1"]):
            km.invalidate()
            with pytest.raises(KekUnavailable):
                await km.decrypt("tenant-0/openai", tokens["tenant-0/openai"], context="row:9")
        kek.down = False
        await asyncio.sleep(0.35)
        km.invalidate()
        assert await km.decrypt("tenant-1/openai", tokens["tenant-1/openai"], context="row:9")
        assert not rep_of(km).failing_over


async def test_promote_a_secondary_during_a_lasting_outage(
    rkm: KeyManager,
    env: dict[str, str],
    region_urls: dict[str, str],
    proxies: dict[str, PgProxy],
    region_databases: dict[str, str],
) -> None:
    tokens = await _seed(rkm)
    rep = rep_of(rkm)
    async with unreachable(proxies[PRIMARY]):
        doc = await rep.promote("eu-west-1", by="ops@example")
    assert doc["primary_reachable"] is False and doc["deks"] == len(VALUES) and doc["scopes"] == len(VALUES)
    assert "KEYROTOR_PRIMARY_REGION=eu-west-1" in doc["next"]
    # A keyrotor configured as the promoted region serves every value the old primary sealed.
    promoted = {
        **env,
        "DATABASE_URL": _url(region_databases["eu-west-1"]),
        "ENCRYPTION_KEY": REGION_KEYS["eu-west-1"],
        "KEYROTOR_PRIMARY_REGION": "eu-west-1",
        "KEYROTOR_LISTEN_KEY_CHANGES": "false",
    }
    async with KeyManager(Settings.from_env(promoted), environ=promoted) as km2:
        for scope, token in tokens.items():
            assert await km2.decrypt(scope, token, context="row:9") == VALUES[scope]
        fresh = await km2.encrypt("tenant-0/openai", "sk-new-after-promotion", context="row:10")
        assert await km2.decrypt("tenant-0/openai", fresh, context="row:10") == "sk-new-after-promotion"
    # The old primary, back, finds the region fenced: never overwritten, reported, not repaired.
    report = await rep.check(repair=True)
    assert statuses(report) == {"eu-west-1": "drifted", "ap-south-1": "in_sync"}
    assert "promoted to primary" in report.regions[0].detail
    assert (await sql(_url(region_databases["eu-west-1"]), "SELECT count(*) FROM data_keys"))[0][0] == len(
        VALUES
    )
    with pytest.raises(Conflict, match="promoted already"):
        await rep.promote("eu-west-1")
    events = await sql(
        _url(region_databases["eu-west-1"]),
        "SELECT actor FROM encryption_audit_log "
        "WHERE event_type = 'failover' AND metadata->>'state' = 'promoted'",
    )
    assert [ev["actor"] for ev in events] == ["ops@example"]


class GatedKek(FailingKek):
    """The real regional keyring, whose ``wrap`` waits at a gate the test opens."""

    def __init__(self, inner: KekProvider) -> None:
        super().__init__(inner)
        self.reached = asyncio.Event()
        self.release = asyncio.Event()

    async def wrap(self, dek: bytes, context: WrapContext) -> WrappedDek:
        self.reached.set()
        await asyncio.wait_for(self.release.wait(), 20)
        return await super().wrap(dek, context)


async def test_a_repair_in_flight_never_writes_into_a_region_promoted_meanwhile(
    rkm: KeyManager, rsettings: Settings, renv: dict[str, str], region_urls: dict[str, str]
) -> None:
    # ap-south-1: the promotion test above opens a KeyManager on eu-west-1's database, which
    # keys its audit chain with a key this process no longer holds.
    await _seed(rkm)
    ap = region_urls["ap-south-1"]
    await sql(ap, "DELETE FROM replica_keys WHERE scope = 'tenant-0/openai'")  # a copy to repair
    (cfg,) = [c for c in parse_regions(rsettings, renv) if c.name == "ap-south-1"]
    gated = GatedKek(local_keyring(region_settings(cfg)))
    repairer = Replication(rsettings, rkm.sessions, rkm.kek, [Region(cfg, rsettings, gated)])
    promoter = Replication.open(rsettings, rkm.sessions, None, renv)  # the primary's KEK is out
    try:
        check = asyncio.create_task(repairer.check(repair=True, record=False))
        await asyncio.wait_for(gated.reached.wait(), 20)  # the fresh copy is being made
        doc = await promoter.promote("ap-south-1", by="ops@example")
        assert doc["deks"] == len(VALUES) - 1
        gated.release.set()
        report = await asyncio.wait_for(check, 20)
    finally:
        gated.release.set()
        await repairer.aclose()
        await promoter.aclose()
    # The promotion fenced the region: the repair that was under way wrote nothing into it.
    assert (await sql(ap, "SELECT count(*) FROM replica_keys WHERE scope = 'tenant-0/openai'"))[0][0] == 0
    assert "promoted" in report.regions[0].detail


async def test_a_silent_primary_is_waited_for_within_the_deadline_on_every_read(
    renv: dict[str, str], proxies: dict[str, PgProxy], region_urls: dict[str, str]
) -> None:
    """The primary's network drops every packet and no region holds the DEK: every read fails
    within KEYROTOR_FAILOVER_TIMEOUT_SECONDS, including those made while the primary is being
    skipped (which then ask it after all)."""
    e = {**renv, "KEYROTOR_AUDIT": "async", "KEYROTOR_FAILOVER_RETRY_SECONDS": "30"}
    async with KeyManager(Settings.from_env(e), environ=e) as km:
        tokens = await _seed(km)
        for url in region_urls.values():
            await sql(url, "DELETE FROM replica_keys")  # no secondary can serve
        proxies[PRIMARY].freeze()
        try:
            for scope in list(tokens)[:2]:  # the first read leaves the primary; the second skips it
                km.invalidate()
                with pytest.raises(KeyrotorError):
                    await asyncio.wait_for(km.decrypt(scope, tokens[scope], context="row:9"), 10)
        finally:
            proxies[PRIMARY].thaw()
