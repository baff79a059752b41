"""Which provider wrapped a DEK: provider_of, the clear ForeignKek error, and RoutingKek."""

from __future__ import annotations

import os

import pytest

from keyrotor import Settings
from keyrotor.errors import ConfigurationError
from keyrotor.kek.base import ForeignKek, WrapContext, WrappedDek, provider_of
from keyrotor.kek.factory import read_providers
from keyrotor.kek.local import LocalKeyring
from keyrotor.kek.routing import RoutingKek
from tests.kek.conftest import LOCAL_MASTER_KEY

OTHER_KEY = "another-local-master-key-Vw3Jk8Lp2Qz5Rt7Yx0Bn4Mc6Hd9Fg1"
CTX = WrapContext("anthropic", 1)


@pytest.mark.parametrize(
    ("kek_id", "provider"),
    [
        ("local:0123456789abcdef", "local"),
        ("arn:aws:kms:us-east-1:123456789012:key/1234abcd-12ab-34cd-56ef-1234567890ab", "aws-kms"),
        ("aws-sm:keyrotor-kek", "aws-sm"),
        ("vault:transit/keyrotor", "vault"),
        ("vault:team-a/transit/keyrotor", "vault"),
        ("gcp:projects/x", "unknown"),
    ],
)
def test_provider_of(kek_id: str, provider: str) -> None:
    assert provider_of(kek_id) == provider


async def test_a_dek_of_another_provider_fails_with_a_clear_error() -> None:
    local = LocalKeyring.from_keys({1: LOCAL_MASTER_KEY}, current=1)
    foreign = WrappedDek("vault:transit/keyrotor", 3, b"vault:v3:abc")
    with pytest.raises(ForeignKek) as caught:
        await local.unwrap(foreign, CTX)
    message = str(caught.value)
    assert "wrapped by the vault KEK provider (vault:transit/keyrotor, KEK version 3)" in message
    assert f"configured with local ({local.kek_id(1)})" in message
    assert "kek migrate --from vault --to local" in message and "SECRETS_PROVIDER=vault" in message
    assert "abc" not in message  # never the blob


async def test_routing_unwraps_with_the_provider_that_wrapped() -> None:
    primary = LocalKeyring.from_keys({1: LOCAL_MASTER_KEY}, current=1)
    other = LocalKeyring.from_keys({1: OTHER_KEY}, current=1)

    class Vaultish:  # a second provider of another kind: a local keyring named "vault"
        name = "vault"

        async def unwrap(self, wrapped: WrappedDek, context: WrapContext) -> bytes:
            inner = WrappedDek(wrapped.kek_id.replace("vault:", "local:"), wrapped.kek_version, wrapped.blob)
            return await other.unwrap(inner, context)

        async def aclose(self) -> None:
            return None

    dek = os.urandom(32)
    theirs = await other.wrap(dek, CTX)
    theirs = WrappedDek(theirs.kek_id.replace("local:", "vault:"), theirs.kek_version, theirs.blob)
    routing = RoutingKek(primary, {"vault": Vaultish()})  # type: ignore[dict-item]
    assert await routing.unwrap(theirs, CTX) == dek
    ours = await routing.wrap(dek, CTX)
    assert ours.kek_id == primary.kek_id(1) and await routing.unwrap(ours, CTX) == dek
    # rewrap moves a reader's DEK to the primary
    (moved,) = await routing.rewrap([(theirs, CTX)])
    assert moved.kek_id == primary.kek_id(1) and await primary.unwrap(moved, CTX) == dek
    # without the reader: the primary's clear error
    with pytest.raises(ForeignKek, match="vault KEK provider"):
        await RoutingKek(primary, {}).unwrap(theirs, CTX)
    await routing.aclose()


def test_read_providers_setting() -> None:
    s = Settings(secrets_provider="aws", kek_read_providers=" local, vault ,aws,local")
    assert read_providers(s) == ["local", "vault"]
    with pytest.raises(ConfigurationError, match="unknown provider 'gcp'"):
        read_providers(Settings(kek_read_providers="gcp"))
