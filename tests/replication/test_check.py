"""The replica check: each status produced by its real fault, and cleared by repair."""

from __future__ import annotations

import asyncio
import json
import logging
import os

import pytest

from keyrotor import KeyManager, Settings
from keyrotor.crypto.envelope import new_dek
from keyrotor.errors import ConfigurationError
from keyrotor.kek.base import KekProvider, WrapContext, WrappedDek
from keyrotor.kek.factory import local_keyring
from keyrotor.metrics import REPLICA_STATUS
from keyrotor.replication.check import Replication, env_prefix, fingerprint, init_regions, parse_regions
from tests.conftest import MASTER_KEY, _admin
from tests.replication.conftest import (
    PRIMARY,
    REGION_KEYS,
    FailingKek,
    assert_no_secrets,
    region_env,
    rep_of,
    settle,
    sql,
    statuses,
    unreachable,
)
from tests.replication.proxy import PgProxy

SCOPES = ("anthropic", "openai", "tenant-7/google")


async def _seed(km: KeyManager) -> dict[str, str]:
    tokens = {}
    for scope in SCOPES:
        tokens[scope] = await km.encrypt(scope, f"sk-{scope}-secret-value", context="row:1")
    await settle(km)
    return tokens


async def _primary_deks(km: KeyManager) -> list[bytes]:
    rows = await sql(
        km.settings.database_url,
        "SELECT k.name, d.version, d.kek_id, d.kek_version, d.encrypted_dek FROM data_keys d "
        "JOIN key_scopes k ON k.id = d.scope_id",
    )
    return [
        await km.kek.unwrap(
            WrappedDek(r["kek_id"], r["kek_version"], r["encrypted_dek"]), WrapContext(r[0], r[1])
        )
        for r in rows
    ]


def test_region_configuration_is_validated_without_echoing_urls() -> None:
    base = {"DATABASE_URL": "postgresql://postgres@127.0.0.1/x"}

    def regions(value: str, primary: str = "us-east-1") -> list[str]:
        s = Settings.from_env({**base, "KEYROTOR_REGIONS": value, "KEYROTOR_PRIMARY_REGION": primary})
        return [r.name for r in parse_regions(s, {})]

    assert regions("eu-west-1=postgresql://u:pw@h/a, ap-south-1=postgresql://h/b") == [
        "eu-west-1",
        "ap-south-1",
    ]
    assert regions("") == []
    for bad, words in [
        ("eu-west-1", "not name=database_url"),
        ("EU=postgresql://h/a", "lowercase"),
        ("eu=postgresql://h/a,eu=postgresql://h/b", "named twice"),
        ("us-east-1=postgresql://h/a", "named twice"),
        ("eu=mysql://user:hunter2-pass@h/a", "postgresql"),
    ]:
        with pytest.raises(ConfigurationError, match=words) as info:
            regions(bad)
        assert "hunter2" not in str(info.value)
    # A region without its wrapping key is refused at start-up, naming the variables to set.
    s = Settings.from_env({**base, "KEYROTOR_REGIONS": "eu-west-1=postgresql://h/a"})
    from keyrotor.replication.check import Replication

    with pytest.raises(ConfigurationError, match="KEYROTOR_REGION_EU_WEST_1__"):
        Replication.open(s, None, None, {})  # type: ignore[arg-type]


@pytest.mark.usefixtures("rsettings")
async def test_new_scopes_replicate_at_once_and_check_in_sync(
    rkm: KeyManager, region_urls: dict[str, str]
) -> None:
    await _seed(rkm)
    for url in region_urls.values():
        rows = await sql(
            url, "SELECT scope, dek_version, state, kek_version, fingerprint, wrapped_dek FROM replica_keys"
        )
        assert sorted(r["scope"] for r in rows) == sorted(SCOPES)
        assert {r["state"] for r in rows} == {"active"} and {r["kek_version"] for r in rows} == {1}
    report = await rep_of(rkm).check(repair=False)
    assert report.primary == PRIMARY and statuses(report) == {"eu-west-1": "in_sync", "ap-south-1": "in_sync"}
    doc = report.as_dict()
    assert doc["regions"][0]["kek_version"] == 1 and doc["regions"][0]["last_ok_at"]
    # Copies and fingerprints reveal nothing of the DEKs.
    deks = await _primary_deks(rkm)
    copies = b""
    for url in region_urls.values():
        copies += b"".join(r["wrapped_dek"] for r in await sql(url, "SELECT wrapped_dek FROM replica_keys"))
    for dek in deks:
        assert dek not in copies and fingerprint(dek) != dek.hex()[:32]
    assert_no_secrets(json.dumps(doc), [*deks, *REGION_KEYS.values(), MASTER_KEY])
    recorded = await sql(
        rkm.settings.database_url, "SELECT region, status, last_ok_at FROM kek_replicas ORDER BY region"
    )
    assert [(r["region"], r["status"]) for r in recorded] == [
        ("ap-south-1", "in_sync"),
        ("eu-west-1", "in_sync"),
    ]
    events = await sql(
        rkm.settings.database_url,
        "SELECT success, metadata::text AS m FROM encryption_audit_log WHERE event_type = 'replica_check'",
    )
    assert len(events) >= 2 and all(e["success"] for e in events)


async def test_missing_stale_drifted_corrupt_each_detected_and_repaired(
    rkm: KeyManager, region_urls: dict[str, str], caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    tokens = await _seed(rkm)
    rep = rep_of(rkm)
    eu, ap = region_urls["eu-west-1"], region_urls["ap-south-1"]

    # missing: a copy deleted.
    await sql(eu, "DELETE FROM replica_keys WHERE scope = 'openai'")
    # stale: the region still holds a DEK the primary no longer keeps (an extra copy) and a
    # copy that follows an older KEK version.
    await sql(ap, "UPDATE replica_keys SET kek_version = 0 WHERE scope = 'anthropic'")
    await sql(
        ap,
        "INSERT INTO replica_keys (scope, dek_version, state, kek_version, source_kek_id, source_region, "
        "wrapped_dek, region_kek_id, region_kek_version, fingerprint) SELECT scope, 7, state, kek_version, "
        "source_kek_id, source_region, wrapped_dek, region_kek_id, region_kek_version, fingerprint "
        "FROM replica_keys WHERE scope = 'openai'",
    )
    report = await rep.check(repair=False)
    assert statuses(report) == {"eu-west-1": "missing", "ap-south-1": "stale"}
    eu_report = report.regions[0]
    assert eu_report.counts == {"missing": 1, "in_sync": 2} and "openai v1" in eu_report.detail
    # Report-only leaves them so and says so in kek_replicas and the metric.
    assert (await sql(rkm.settings.database_url, "SELECT status FROM kek_replicas WHERE region='eu-west-1'"))[
        0
    ][0] == "missing"
    assert REPLICA_STATUS.labels("eu-west-1")._value.get() == 0
    repaired = await rep.check(repair=True)
    assert statuses(repaired) == {"eu-west-1": "in_sync", "ap-south-1": "in_sync"}
    assert [(r.found, r.repaired) for r in repaired.regions] == [("missing", 1), ("stale", 2)]
    assert REPLICA_STATUS.labels("eu-west-1")._value.get() == 1
    # The copy of a DEK the primary does not keep is gone (a destroyed key is destroyed everywhere).
    assert not await sql(ap, "SELECT 1 FROM replica_keys WHERE dek_version = 7")

    # drifted: a copy replaced by a valid copy of another key (a rogue writer): it unwraps with
    # the region's key, but its fingerprint is not the primary's.
    eu_key = local_keyring(Settings.from_env({"ENCRYPTION_KEY": REGION_KEYS["eu-west-1"]}))
    rogue = new_dek()
    wrapped = eu_key.wrap_sync(rogue, WrapContext("anthropic", 1))
    await sql(
        eu,
        "UPDATE replica_keys SET wrapped_dek = $1, fingerprint = $2 WHERE scope = 'anthropic'",
        wrapped.blob,
        fingerprint(rogue),
    )
    # corrupt: one byte of a copy flipped (its fingerprint still says the primary's DEK).
    row = (await sql(ap, "SELECT id, wrapped_dek FROM replica_keys WHERE scope = 'openai'"))[0]
    flipped = bytearray(row["wrapped_dek"])
    flipped[-1] ^= 1
    await sql(ap, "UPDATE replica_keys SET wrapped_dek = $1 WHERE id = $2", bytes(flipped), row["id"])
    report = await rep.check(repair=False)
    assert statuses(report) == {"eu-west-1": "drifted", "ap-south-1": "corrupt"}
    repaired = await rep.check(repair=True)
    assert statuses(repaired) == {"eu-west-1": "in_sync", "ap-south-1": "in_sync"}
    assert [(r.found, r.repaired) for r in repaired.regions] == [("drifted", 1), ("corrupt", 1)]

    # Every value still decrypts through each region's copies (the failover path).
    for region in rep.regions:
        for scope in SCOPES:
            assert await region.unwrap_copy(scope, 1) is not None
    assert await rkm.decrypt("openai", tokens["openai"], context="row:1") == "sk-openai-secret-value"
    deks = await _primary_deks(rkm)
    assert_no_secrets(caplog.text + json.dumps(repaired.as_dict()), [*deks, rogue, *REGION_KEYS.values()])
    assert "drifted" in caplog.text  # drift is a warning log


async def test_wrong_regional_key_is_corrupt_and_repair_rewraps_under_the_configured_key(
    rkm: KeyManager, env: dict[str, str], region_urls: dict[str, str]
) -> None:
    await _seed(rkm)
    # The operator replaced ap-south-1's wrapping key: the copies no longer unwrap with it.
    keys = {**REGION_KEYS, "ap-south-1": "ap-replaced-wrapping-key-7f3c2e1d0a9b8c7d6e5f4a3b2c1d0e9f"}
    e = {**env, **region_env(region_urls, keys)}
    async with KeyManager(Settings.from_env(e), environ=e) as km:
        rep = rep_of(km)
        report = await rep.check(repair=False)
        assert statuses(report) == {"eu-west-1": "in_sync", "ap-south-1": "corrupt"}
        assert report.regions[1].counts == {"corrupt": 3, "in_sync": 0}
        assert statuses(await rep.check(repair=True)) == {"eu-west-1": "in_sync", "ap-south-1": "in_sync"}
    # The copies are now under the new key (the old one no longer opens them).
    ap_ids = {
        r["region_kek_id"]
        for r in await sql(region_urls["ap-south-1"], "SELECT region_kek_id FROM replica_keys")
    }
    assert len(ap_ids) == 1
    assert statuses(await rep_of(rkm).check(repair=False))["ap-south-1"] == "corrupt"


async def test_unreachable_regions_are_named_and_reads_keep_working(
    rkm: KeyManager, proxies: dict[str, PgProxy]
) -> None:
    tokens = await _seed(rkm)
    rep = rep_of(rkm)
    assert statuses(await rep.check(repair=False)) == {"eu-west-1": "in_sync", "ap-south-1": "in_sync"}
    async with unreachable(proxies["eu-west-1"]):
        report = await rep.check(repair=True)
        assert statuses(report) == {"eu-west-1": "unreachable", "ap-south-1": "in_sync"}
        assert report.regions[0].detail.startswith("database: StoreUnavailable")
        assert "postgresql://" not in report.regions[0].detail
        last_ok = report.as_dict()["regions"][0]["last_ok_at"]
        assert last_ok is not None  # the time of the last good check is kept
        async with unreachable(proxies["ap-south-1"]):
            report = await rep.check(repair=True)
            assert statuses(report) == {"eu-west-1": "unreachable", "ap-south-1": "unreachable"}
            rkm.invalidate()
            for scope, token in tokens.items():  # the primary serves reads meanwhile
                assert await rkm.decrypt(scope, token, context="row:1")
    # Back: cleared by the next check.
    assert statuses(await rep.check(repair=True)) == {"eu-west-1": "in_sync", "ap-south-1": "in_sync"}
    assert os.environ.get("KEYROTOR_REGIONS")  # the fixture configured the worker's environment too


async def test_replicas_init_creates_and_migrates_region_databases(env: dict[str, str]) -> None:
    name = f"kr_r_init_{os.getpid()}"
    url = env["DATABASE_URL"].rsplit("/", 1)[0] + "/" + name
    e = {**env, "KEYROTOR_REGIONS": f"eu-west-1={url}", env_prefix("eu-west-1") + "ENCRYPTION_KEY": "x"}
    try:
        assert await init_regions(Settings.from_env(e), e) == ["eu-west-1"]
        assert await init_regions(Settings.from_env(e), e) == ["eu-west-1"]  # again: a no-op
        assert (await sql(url, "SELECT count(*) FROM replica_keys"))[0][0] == 0
    finally:
        await _admin(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")


class _LyingKek(FailingKek):
    """A regional provider whose fresh wraps are damaged (a broken HSM, a bad library)."""

    async def wrap(self, dek: bytes, context: WrapContext) -> WrappedDek:
        good = await self.inner.wrap(dek, context)
        return WrappedDek(good.kek_id, good.kek_version, good.blob[:-1] + bytes([good.blob[-1] ^ 1]))


async def test_repair_never_writes_a_copy_that_does_not_verify(
    rkm: KeyManager, region_urls: dict[str, str], caplog: pytest.LogCaptureFixture
) -> None:
    await _seed(rkm)
    rep = rep_of(rkm)
    eu_url = region_urls["eu-west-1"]
    await sql(eu_url, "DELETE FROM replica_keys WHERE scope = 'openai'")
    await sql(eu_url, "UPDATE replica_keys SET kek_version = 0 WHERE scope = 'anthropic'")
    before = {
        r["scope"]: bytes(r["wrapped_dek"])
        for r in await sql(eu_url, "SELECT scope, wrapped_dek FROM replica_keys")
    }
    eu = rep.region("eu-west-1")
    eu._kek = _LyingKek(await eu.kek())
    report = await rep.check(repair=True)
    assert statuses(report)["eu-west-1"] == "missing" and report.regions[0].repaired == 0
    after = {
        r["scope"]: bytes(r["wrapped_dek"])
        for r in await sql(eu_url, "SELECT scope, wrapped_dek FROM replica_keys")
    }
    assert after == before  # the stale copy still stands; no copy was written for openai
    assert caplog.text.count("replica copy not written for region eu-west-1") == 2


async def test_a_silent_region_is_reported_unreachable_not_waited_for(
    rkm: KeyManager, proxies: dict[str, PgProxy]
) -> None:
    """A region whose network drops every packet (its pooled connections stay open, nothing
    comes back) is graded unreachable within the statement deadline; the check goes on."""
    await _seed(rkm)
    rep = rep_of(rkm)
    assert set(statuses(await rep.check(repair=False)).values()) == {"in_sync"}  # pools connections
    proxies["eu-west-1"].freeze()
    try:
        report = await asyncio.wait_for(rep.check(repair=True), 30)
        # Closing its connections is bounded too (by the same deadline).
        await asyncio.wait_for(rep.region("eu-west-1").engine.dispose(), 10)
    finally:
        proxies["eu-west-1"].thaw()
    assert statuses(report) == {"eu-west-1": "unreachable", "ap-south-1": "in_sync"}
    assert "StoreUnavailable" in report.regions[0].detail


async def test_two_checks_at_once_repair_each_copy_once(
    rkm: KeyManager, rsettings: Settings, renv: dict[str, str], region_urls: dict[str, str]
) -> None:
    """Two workers' check_replicas at once (an hourly job and a manual check, or a retried job
    whose first try still runs): both end in sync, and each faulty copy is written once."""
    for i in range(40):
        await rkm.encrypt(f"tenant-{i}/openai", "sk-proj-concurrent-check", context="row:1")
    await settle(rkm)
    eu, ap = region_urls["eu-west-1"], region_urls["ap-south-1"]
    await sql(eu, "DELETE FROM replica_keys WHERE dek_version = 1 AND scope LIKE 'tenant-1%'")  # missing
    await sql(ap, "UPDATE replica_keys SET kek_version = 0")  # stale: every copy rewritten
    others = [Replication.open(rsettings, rkm.sessions, rkm.kek, renv) for _ in range(2)]
    try:
        reports = await asyncio.wait_for(
            asyncio.gather(*(r.check(repair=True, actor="job:test") for r in others)), 60
        )
    finally:
        for r in others:
            await r.aclose()
    for report in reports:
        assert statuses(report) == {"eu-west-1": "in_sync", "ap-south-1": "in_sync"}, report.as_dict()
    repaired = {
        region: sum(r.repaired for rep in reports for r in rep.regions if r.region == region)
        for region in region_urls
    }
    assert repaired == {"eu-west-1": 11, "ap-south-1": 40}
    assert (await sql(eu, "SELECT count(*) FROM replica_keys"))[0][0] == 40


def test_two_regions_in_one_database_are_refused() -> None:
    """Two regions (or a region and the primary) in one database share one replica_keys table:
    each check finds the other's copies corrupt and rewrites them under its own key, so at any
    time one region holds copies wrapped under the other region's key."""
    base = {"DATABASE_URL": "postgresql://keyrotor:pw@db.us:5432/keyrotor"}

    def regions(value: str) -> list[str]:
        return [r.name for r in parse_regions(Settings.from_env({**base, "KEYROTOR_REGIONS": value}), {})]

    for bad in (
        "eu=postgresql://u:hunter2@db.eu/kr,ap=postgresql://other@db.eu:5432/kr",
        "eu=postgresql://u:hunter2@db.us/keyrotor",  # the primary's own database
        "eu=postgresql://u@/kr?host=/run/pg,ap=postgresql://u@/kr?host=/run/pg",
    ):
        with pytest.raises(ConfigurationError, match="same database") as info:
            regions(bad)
        assert "hunter2" not in str(info.value) and "db.eu" not in str(info.value)
    # Another database on the same server, or the same name on another server, is fine.
    assert regions("eu=postgresql://db.eu/kr,ap=postgresql://db.eu/kr2,sa=postgresql://db.sa/kr") == [
        "eu",
        "ap",
        "sa",
    ]


class _GatedUnwrap(FailingKek):
    """The primary's real keyring, whose first ``unwrap`` waits at a gate the test opens."""

    def __init__(self, inner: KekProvider) -> None:
        super().__init__(inner)
        self.reached = asyncio.Event()
        self.release = asyncio.Event()

    async def unwrap(self, wrapped: WrappedDek, context: WrapContext) -> bytes:
        self.reached.set()
        await asyncio.wait_for(self.release.wait(), 20)
        return await super().unwrap(wrapped, context)


async def test_a_copy_made_while_a_check_runs_is_not_dropped_as_stale(
    rkm: KeyManager, rsettings: Settings, renv: dict[str, str], region_urls: dict[str, str]
) -> None:
    """A full check reads the primary's DEKs, then each region's copies. A new scope's first
    DEK replicated in between is in the region but not in what the check read: it is no DEK the
    primary destroyed, and must not be deleted."""
    await _seed(rkm)
    gated = _GatedUnwrap(rkm.kek)
    checker = Replication.open(rsettings, rkm.sessions, gated, renv)  # a cold fingerprint cache
    try:
        check = asyncio.create_task(checker.check(repair=True))
        await asyncio.wait_for(gated.reached.wait(), 20)  # the primary's DEKs are read
        await rkm.encrypt("late-scope", "sk-late-scope-value", context="row:1")
        await settle(rkm)  # its DEK reaches every region meanwhile
        gated.release.set()
        report = await asyncio.wait_for(check, 30)
    finally:
        gated.release.set()
        await checker.aclose()
    for url in region_urls.values():
        assert await sql(url, "SELECT dek_version FROM replica_keys WHERE scope = 'late-scope'"), url
    assert all(r.status == "in_sync" for r in report.regions), report.as_dict()
