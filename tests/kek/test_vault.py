"""Vault/OpenBao transit provider tests on a real OpenBao dev server: configuration, AppRole
login and token renewal, key creation, batch rewrap chunking, min_decryption_version, namespaces."""

from __future__ import annotations

import asyncio
import base64
import os
import uuid
from collections.abc import AsyncIterator
from dataclasses import replace

import pytest

from keyrotor.errors import ConfigurationError, KekError
from keyrotor.kek.base import WrapContext, WrappedDek
from keyrotor.kek.remote import open_remote_provider
from keyrotor.kek.vault import MAX_BATCH, VaultTransitKek, ciphertext_version
from keyrotor.kek.vault_client import VaultConfig
from tests.kek.conftest import calls, fast_policy
from tests.servers import BAO_ROOT_TOKEN, ServerProcess, bao_approle, bao_root, vault_env

CTX = WrapContext("tenant-9/anthropic", 4)


async def open_vault(env: dict[str, str], **kwargs: object) -> VaultTransitKek:
    provider = await open_remote_provider("vault", env, policy=fast_policy())
    assert isinstance(provider, VaultTransitKek)
    return provider


@pytest.fixture
async def vault(bao_server: ServerProcess) -> AsyncIterator[VaultTransitKek]:
    provider = await open_vault(vault_env(bao_server))
    try:
        yield provider
    finally:
        await provider.aclose()


# --- configuration ---------------------------------------------------------------------------


def test_config_from_env() -> None:
    with pytest.raises(ConfigurationError, match="VAULT_ADDR"):
        VaultConfig.from_env({"VAULT_TOKEN": "t"})
    with pytest.raises(ConfigurationError, match="VAULT_TOKEN"):
        VaultConfig.from_env({"VAULT_ADDR": "http://127.0.0.1:8200"})
    with pytest.raises(ConfigurationError, match="VAULT_SECRET_ID"):
        VaultConfig.from_env({"VAULT_ADDR": "http://x", "VAULT_ROLE_ID": "role"})
    with pytest.raises(ConfigurationError, match="VAULT_ROLE_ID"):
        VaultConfig.from_env({"VAULT_ADDR": "http://x", "VAULT_SECRET_ID": "sid"})

    config = VaultConfig.from_env({"VAULT_ADDR": "http://x:8200/", "VAULT_TOKEN": "hvs.secret-token-value"})
    assert (config.addr, config.transit_key, config.namespace) == ("http://x:8200", "keyrotor", None)
    assert "hvs.secret-token-value" not in repr(config)

    approle = VaultConfig.from_env(
        {
            "VAULT_ADDR": "http://x",
            "VAULT_TOKEN": "ignored-when-approle-is-set",
            "VAULT_ROLE_ID": "role-id-value",
            "VAULT_SECRET_ID": "secret-id-value",
            "VAULT_NAMESPACE": "team-a",
            "VAULT_TRANSIT_KEY": "kek-a",
        }
    )
    assert approle.uses_approle and approle.token is None
    assert (approle.namespace, approle.transit_key) == ("team-a", "kek-a")
    assert "secret-id-value" not in repr(approle) and "role-id-value" not in repr(approle)


@pytest.mark.parametrize(
    "addr",
    [
        "vault.internal:8200",  # no scheme: requests has no adapter for it
        "ftp://vault.internal",
        "http://127.0.0.1:99999",  # port out of range
        "http://[::1",  # unparseable: a bare ValueError
        "https://ops:hunter2-pw@[::1",  # and the password it holds is never shown
        "http://",
    ],
)
async def test_a_malformed_vault_addr_is_a_configuration_error(addr: str) -> None:
    # A mistyped VAULT_ADDR is a configuration mistake: a one-line ConfigurationError naming the
    # variable, not a transient KekUnavailable that workers retry forever, nor a bare ValueError.
    env = {"VAULT_ADDR": addr, "VAULT_TOKEN": "hvs.secret-token-value"}
    with pytest.raises(ConfigurationError, match="VAULT_ADDR") as caught:
        await open_remote_provider("vault", env, policy=fast_policy())
    chain: BaseException | None = caught.value
    while chain is not None:
        assert "hunter2" not in str(chain) and "hvs.secret-token-value" not in str(chain)
        chain = chain.__cause__ or chain.__context__


def test_ciphertext_version() -> None:
    assert ciphertext_version("vault:v12:abc") == 12
    with pytest.raises(KekError):
        ciphertext_version("abc")


# --- key creation ----------------------------------------------------------------------------


async def test_transit_key_is_created_derived_when_missing(bao_server: ServerProcess) -> None:
    env = vault_env(bao_server)
    root = bao_root(bao_server)
    with pytest.raises(Exception, match=r"404|None"):
        root.secrets.transit.read_key(env["VAULT_TRANSIT_KEY"])
    provider = await open_vault(env)
    try:
        key = root.secrets.transit.read_key(env["VAULT_TRANSIT_KEY"])["data"]
        assert (key["type"], key["derived"], key["latest_version"]) == ("aes256-gcm96", True, 1)
        assert provider.kek_id == f"vault:transit/{env['VAULT_TRANSIT_KEY']}"
    finally:
        await provider.aclose()
    # A second process finds the key and uses it.
    again = await open_vault(env)
    await again.aclose()


async def test_existing_key_without_derivation_is_refused(bao_server: ServerProcess) -> None:
    env = vault_env(bao_server)
    bao_root(bao_server).secrets.transit.create_key(env["VAULT_TRANSIT_KEY"], key_type="aes256-gcm96")
    with pytest.raises(ConfigurationError, match="derived"):
        await open_vault(env)


async def test_missing_transit_mount_is_a_configuration_error(bao_server: ServerProcess) -> None:
    provider = VaultConfig(addr=bao_server.url, token=BAO_ROOT_TOKEN, mount_point="no-such-mount")
    with pytest.raises(ConfigurationError, match="transit engine"):
        await VaultTransitKek.open(provider, policy=fast_policy())


# --- AppRole and token renewal --------------------------------------------------------------


async def test_approle_login_and_token_renewal(bao_server: ServerProcess) -> None:
    role_id, secret_id = bao_approle(bao_server, ttl="2s", max_ttl="1m")
    env = vault_env(bao_server, VAULT_ROLE_ID=role_id, VAULT_SECRET_ID=secret_id)
    del env["VAULT_TOKEN"]
    provider = await open_vault(env)
    try:
        accessor = provider.token_accessor
        assert accessor and provider.token_logins == 1
        dek = os.urandom(32)
        wrapped = await provider.wrap(dek, CTX)
        # Keep working for twice the token's TTL: only renewals can keep the same token alive.
        for _ in range(10):
            await asyncio.sleep(0.4)
            assert await provider.unwrap(wrapped, CTX) == dek
        assert provider.token_renewals >= 2
        assert provider.token_logins == 1
        assert provider.token_accessor == accessor
        info = bao_root(bao_server).auth.token.lookup_accessor(accessor)["data"]
        assert info["ttl"] > 0  # still alive, well past its first 2 s
    finally:
        await provider.aclose()


async def test_approle_logs_in_again_at_max_ttl(bao_server: ServerProcess) -> None:
    role_id, secret_id = bao_approle(bao_server, ttl="2s", max_ttl="3s")
    env = vault_env(bao_server, VAULT_ROLE_ID=role_id, VAULT_SECRET_ID=secret_id)
    del env["VAULT_TOKEN"]
    provider = await open_vault(env)
    try:
        first = provider.token_accessor
        dek = os.urandom(32)
        wrapped = await provider.wrap(dek, CTX)
        for _ in range(9):
            await asyncio.sleep(0.45)
            assert await provider.unwrap(wrapped, CTX) == dek
        assert provider.token_logins >= 2
        assert provider.token_accessor != first
    finally:
        await provider.aclose()


async def test_approle_with_a_wrong_secret_id_is_refused(bao_server: ServerProcess) -> None:
    role_id, _ = bao_approle(bao_server)
    env = vault_env(bao_server, VAULT_ROLE_ID=role_id, VAULT_SECRET_ID=str(uuid.uuid4()))
    del env["VAULT_TOKEN"]
    with pytest.raises(KekError, match="login"):
        await open_vault(env)


# --- rewrap, versions ------------------------------------------------------------------------


def batch_encrypt(server: ServerProcess, key: str, items: list[tuple[bytes, WrapContext]]) -> list[str]:
    """Encrypt many DEKs in one transit request (test set-up)."""
    transit = bao_root(server).secrets.transit
    out: list[str] = []
    for start in range(0, len(items), 200):
        batch = [
            {"plaintext": base64.b64encode(d).decode(), "context": base64.b64encode(c.as_aad()).decode()}
            for d, c in items[start : start + 200]
        ]
        out += [
            r["ciphertext"] for r in transit.encrypt_data(key, batch_input=batch)["data"]["batch_results"]
        ]
    return out


async def test_batch_rewrap_of_600_items_is_chunked(bao_server: ServerProcess) -> None:
    env = vault_env(bao_server)
    provider = await open_vault(env)
    try:
        items = [(os.urandom(32), WrapContext(f"tenant-{i}/openai", 1 + i % 3)) for i in range(600)]
        ciphertexts = batch_encrypt(bao_server, env["VAULT_TRANSIT_KEY"], items)
        wrapped = [WrappedDek(kek_id=provider.kek_id, kek_version=1, blob=ct.encode()) for ct in ciphertexts]
        assert await provider.rotate() == 2

        requests_before = calls("vault", "rewrap")
        rewrapped = await provider.rewrap([(w, ctx) for w, (_, ctx) in zip(wrapped, items, strict=True)])
        assert MAX_BATCH == 249  # OpenBao refuses 250 items (1001 JSON strings) by default
        assert calls("vault", "rewrap") - requests_before == 3  # 249 + 249 + 102
        assert len(rewrapped) == 600
        assert {w.kek_version for w in rewrapped} == {2}
        for index in (0, 248, 249, 497, 498, 599):  # chunk edges keep their order
            dek, ctx = items[index]
            assert await provider.unwrap(rewrapped[index], ctx) == dek
    finally:
        await provider.aclose()


async def test_batch_rewrap_names_the_failing_item(vault: VaultTransitKek) -> None:
    good = [(await vault.wrap(os.urandom(32), CTX), CTX) for _ in range(3)]
    wrong_ctx = WrapContext("someone-else", 1)
    with pytest.raises(KekError, match=r"someone-else v1 \(item 2\)"):
        await vault.rewrap([good[0], good[1], (good[2][0], wrong_ctx)])


async def test_tampered_version_prefix_is_refused(vault: VaultTransitKek) -> None:
    wrapped = await vault.wrap(os.urandom(32), CTX)
    with pytest.raises(KekError, match="claims KEK v2"):
        await vault.unwrap(replace(wrapped, kek_version=2), CTX)


async def test_min_decryption_version_retires_old_versions(vault: VaultTransitKek) -> None:
    dek = os.urandom(32)
    old = await vault.wrap(dek, CTX)
    assert await vault.rotate() == 2
    [new] = await vault.rewrap([(old, CTX)])
    with pytest.raises(KekError):
        await vault.set_min_decryption_version(3)
    with pytest.raises(KekError):
        await vault.set_min_decryption_version(0)
    await vault.set_min_decryption_version(2)
    info = await vault.key_info()
    assert (info.latest_version, info.min_decryption_version) == (2, 2)
    assert await vault.unwrap(new, CTX) == dek
    with pytest.raises(KekError, match=r"too old|retired"):
        await vault.unwrap(old, CTX)


async def test_namespace(bao_server: ServerProcess) -> None:
    namespace = f"team-{uuid.uuid4().hex[:6]}"
    root = bao_root(bao_server)
    root.sys.create_namespace(namespace)
    bao_root(bao_server, namespace).sys.enable_secrets_engine("transit", path="transit")
    env = vault_env(bao_server, VAULT_NAMESPACE=namespace)
    provider = await open_vault(env)
    try:
        assert provider.kek_id == f"vault:{namespace}/transit/{env['VAULT_TRANSIT_KEY']}"
        dek = os.urandom(32)
        assert await provider.unwrap(await provider.wrap(dek, CTX), CTX) == dek
        ns_key = bao_root(bao_server, namespace).secrets.transit.read_key(env["VAULT_TRANSIT_KEY"])
        assert ns_key["data"]["derived"] is True
        with pytest.raises(Exception, match=r"404|None"):  # the key lives in the namespace only
            root.secrets.transit.read_key(env["VAULT_TRANSIT_KEY"])
    finally:
        await provider.aclose()
