"""Regions whose wrapping keys live in other providers: AWS KMS (moto) and Vault transit
(OpenBao), on their real servers, as in the providers' own tests."""

from __future__ import annotations

import pytest

from keyrotor import KeyManager, Settings
from keyrotor.kek.factory import local_keyring
from keyrotor.replication.check import env_prefix
from tests.replication.conftest import FailingKek, rep_of, settle, sql, statuses, unreachable
from tests.replication.proxy import PgProxy
from tests.servers import ServerProcess, aws_env, bao_server, create_kms_key, moto_server, vault_env

__all__ = ["bao_server", "moto_server"]


def _prefixed(region: str, env: dict[str, str]) -> dict[str, str]:
    return {env_prefix(region) + k: v for k, v in env.items()}


@pytest.fixture
def provider_env(
    renv: dict[str, str],
    moto_server: ServerProcess,
    bao_server: ServerProcess,
    monkeypatch: pytest.MonkeyPatch,
) -> dict[str, str]:
    """eu-west-1 wraps under a KMS key, ap-south-1 under a Vault transit key."""
    e = {k: v for k, v in renv.items() if not k.startswith("KEYROTOR_REGION_")}
    e.update(
        _prefixed(
            "eu-west-1",
            {"SECRETS_PROVIDER": "aws", **aws_env(moto_server, AWS_KMS_KEY_ID=create_kms_key(moto_server))},
        )
    )
    e.update(_prefixed("ap-south-1", {"SECRETS_PROVIDER": "vault", **vault_env(bao_server)}))
    for k in list(renv):
        if k.startswith("KEYROTOR_REGION_"):
            monkeypatch.delenv(k, raising=False)
    return e


async def test_kms_and_vault_regional_keys_replicate_check_and_serve_failover(
    provider_env: dict[str, str], region_urls: dict[str, str], proxies: dict[str, PgProxy]
) -> None:
    settings = Settings.from_env(provider_env)
    kek = FailingKek(local_keyring(settings))
    async with KeyManager(settings, kek=kek, environ=provider_env) as km:
        tokens = {s: await km.encrypt(s, f"sk-{s}-value", context="p") for s in ("anthropic", "openai")}
        await settle(km)
        ids = {
            r: {row[0] for row in await sql(u, "SELECT region_kek_id FROM replica_keys")}
            for r, u in region_urls.items()
        }
        assert all(i.startswith("arn:aws:kms:") for i in ids["eu-west-1"])
        assert all(i.startswith("vault:") for i in ids["ap-south-1"])
        rep = rep_of(km)
        assert statuses(await rep.check(repair=False)) == {"eu-west-1": "in_sync", "ap-south-1": "in_sync"}
        # A copy edited in the KMS region is found and re-made under KMS.
        await sql(
            region_urls["eu-west-1"],
            "UPDATE replica_keys SET wrapped_dek = wrapped_dek || '\\x00'::bytea WHERE scope = 'openai'",
        )
        report = await rep.check(repair=True)
        assert [(r.as_dict()["found"], r.status) for r in report.regions] == [
            ("corrupt", "in_sync"),
            ("in_sync", "in_sync"),
        ]
        # The primary's KEK is down: KMS serves; the KMS region's database is cut too: Vault serves.
        kek.down = True
        km.invalidate()
        assert await km.decrypt("anthropic", tokens["anthropic"], context="p") == "sk-anthropic-value"
        async with unreachable(proxies["eu-west-1"]):
            km.invalidate()
            assert await km.decrypt("openai", tokens["openai"], context="p") == "sk-openai-value"
        # KMS itself is out in eu-west-1 (its database is fine): the check names the region
        # unreachable by its wrapping key, and reads go to Vault.
        eu = rep.region("eu-west-1")
        outage = FailingKek(await eu.kek())
        eu._kek = outage  # the region's provider, behind a switch
        outage.down = True
        report = await rep.check(repair=True)
        assert statuses(report) == {"eu-west-1": "unreachable", "ap-south-1": "in_sync"}
        assert report.regions[0].detail.startswith("wrapping key: KekUnavailable")
        km.invalidate()
        assert await km.decrypt("anthropic", tokens["anthropic"], context="p") == "sk-anthropic-value"
        outage.down = False
        assert statuses(await rep.check(repair=False)) == {"eu-west-1": "in_sync", "ap-south-1": "in_sync"}
