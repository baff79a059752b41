"""The KekProvider contract, one suite for every provider: local, aws-kms, aws-sm, vault.

Each remote provider runs against its real server (moto, OpenBao dev); see tests/servers.py.
"""

from __future__ import annotations

import os
from dataclasses import replace

import pytest

from keyrotor.errors import ConfigurationError, KekError
from keyrotor.kek.base import KekProvider, WrapContext, WrappedDek
from keyrotor.kek.local import LocalKeyring
from tests.kek.conftest import LOCAL_MASTER_KEY

OTHER_MASTER_KEY = "kek-contract-second-key-Hq8Zp3Xv6Lm1Rc9Tw4Bn7Ks2Jd5Gf0Ya"

CTX = WrapContext("tenant-42/openai", 3)


def flip(blob: bytes, index: int) -> bytes:
    """The blob with one bit changed (base64 text stays base64: flip a letter's case)."""
    data = bytearray(blob)
    byte = data[index]
    data[index] = byte ^ 0x20 if chr(byte).isalpha() and blob.startswith(b"vault:") else byte ^ 0x01
    return bytes(data)


def test_satisfies_the_protocol(provider: KekProvider) -> None:
    assert isinstance(provider, KekProvider)
    assert provider.name in {"local", "aws-kms", "aws-sm", "vault"}


async def test_wrap_unwrap_round_trip(provider: KekProvider) -> None:
    dek = os.urandom(32)
    wrapped = await provider.wrap(dek, CTX)
    assert wrapped.kek_version == await provider.current_version()
    assert dek not in wrapped.blob
    assert dek.hex() not in repr(wrapped)
    assert await provider.unwrap(wrapped, CTX) == dek
    # A second wrap of the same DEK is a different blob (random nonce), same KEK.
    again = await provider.wrap(dek, CTX)
    assert again.blob != wrapped.blob
    assert (again.kek_id, again.kek_version) == (wrapped.kek_id, wrapped.kek_version)


async def test_context_binds_scope_and_dek_version(provider: KekProvider) -> None:
    wrapped = await provider.wrap(os.urandom(32), CTX)
    for other in (
        WrapContext("tenant-43/openai", CTX.dek_version),
        WrapContext(CTX.scope, CTX.dek_version + 1),
    ):
        with pytest.raises(KekError) as caught:
            await provider.unwrap(wrapped, other)
        # A typed error naming the provider and the cause (the scope and version asked for).
        message = str(caught.value)
        assert message.startswith(f"{provider.name}: wrapped DEK for {other.scope} v{other.dek_version}")
        assert "does not unwrap" in message and "another scope or version" in message


async def test_tampered_blob_fails(provider: KekProvider) -> None:
    wrapped = await provider.wrap(os.urandom(32), CTX)
    for index in (-1, len(wrapped.blob) // 2):
        with pytest.raises(KekError):
            await provider.unwrap(replace(wrapped, blob=flip(wrapped.blob, index)), CTX)
    with pytest.raises(KekError):
        await provider.unwrap(replace(wrapped, blob=wrapped.blob[:-4]), CTX)


async def test_foreign_kek_id_is_refused(provider: KekProvider) -> None:
    wrapped = await provider.wrap(os.urandom(32), CTX)
    with pytest.raises(KekError):
        await provider.unwrap(replace(wrapped, kek_id=wrapped.kek_id + "-other"), CTX)


async def test_refuses_a_dek_of_the_wrong_size(provider: KekProvider) -> None:
    with pytest.raises(KekError):
        await provider.wrap(os.urandom(16), CTX)


async def test_rewrap_keeps_order_and_binding(provider: KekProvider) -> None:
    contexts = [WrapContext(f"scope-{i}", i + 1) for i in range(4)]
    deks = [os.urandom(32) for _ in contexts]
    wrapped = [await provider.wrap(dek, ctx) for dek, ctx in zip(deks, contexts, strict=True)]
    rewrapped = await provider.rewrap(list(zip(wrapped, contexts, strict=True)))
    assert [await provider.unwrap(w, c) for w, c in zip(rewrapped, contexts, strict=True)] == deks
    with pytest.raises(KekError):
        await provider.unwrap(rewrapped[0], contexts[1])
    assert await provider.rewrap([]) == []


async def test_rewrap_refuses_a_dek_of_another_context(provider: KekProvider) -> None:
    wrapped = await provider.wrap(os.urandom(32), CTX)
    for other in (
        WrapContext("tenant-43/openai", CTX.dek_version),
        WrapContext(CTX.scope, CTX.dek_version + 1),
    ):
        with pytest.raises(KekError):
            await provider.rewrap([(wrapped, other)])


async def test_rotate_then_rewrap_to_the_new_version(provider: KekProvider) -> None:
    if isinstance(provider, LocalKeyring):
        # By design: the local keyring rotates by configuration, not by API: a new master key
        # with the next version, the old one kept as a previous version until the rewrap.
        with pytest.raises(ConfigurationError, match="ENCRYPTION_KEY_VERSION=2"):
            await provider.rotate()
        dek = os.urandom(32)
        under_v1 = await provider.wrap(dek, CTX)
        rotated = LocalKeyring.from_keys({1: LOCAL_MASTER_KEY, 2: OTHER_MASTER_KEY}, current=2)
        assert await rotated.current_version() == 2
        (new,) = await rotated.rewrap([(under_v1, CTX)])
        assert (new.kek_version, await rotated.unwrap(new, CTX)) == (2, dek)
        assert new.kek_id != under_v1.kek_id  # each version's key check value
        assert (await rotated.wrap(os.urandom(32), CTX)).kek_version == 2  # new DEKs follow
        only_new = LocalKeyring.from_keys({2: OTHER_MASTER_KEY}, current=2)
        assert await only_new.unwrap(new, CTX) == dek
        with pytest.raises(KekError, match="version 1 is not configured"):
            await only_new.unwrap(under_v1, CTX)
        return
    before = await provider.current_version()
    contexts = [WrapContext("tenant-42/anthropic", v) for v in (1, 2, 3)]
    deks = [os.urandom(32) for _ in contexts]
    old: list[WrappedDek] = [await provider.wrap(d, c) for d, c in zip(deks, contexts, strict=True)]
    assert {w.kek_version for w in old} == {before}

    after = await provider.rotate()
    assert after == before + 1
    assert await provider.current_version() == after

    fresh = await provider.wrap(os.urandom(32), CTX)  # new DEKs follow the rotation
    assert fresh.kek_version == after

    rewrapped = await provider.rewrap(list(zip(old, contexts, strict=True)))
    assert [w.kek_version for w in rewrapped] == [after] * len(old)
    assert all(n.blob != o.blob for n, o in zip(rewrapped, old, strict=True))
    for dek, ctx, new_w, old_w in zip(deks, contexts, rewrapped, old, strict=True):
        assert await provider.unwrap(new_w, ctx) == dek
        assert await provider.unwrap(old_w, ctx) == dek  # old versions still unwrap

    assert await provider.rotate() == after + 1


async def test_check(provider: KekProvider) -> None:
    await provider.check()
