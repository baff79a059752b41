"""Security (#19, finding 6): a destroyed key outlived its destruction in a process's cache.

The attack: a process decrypts a value of a retired DEK version (the key is now cached for
``KEYROTOR_DEK_CACHE_TTL_SECONDS``, 30 minutes by default), misses the announcement of its
destruction (no Redis listener, a dropped message), and goes on decrypting with the erased key.
Now a cached grace or retired version's state is read again at most every
``KEYROTOR_ACTIVE_VERSION_TTL_SECONDS``: destroyed, it is dropped and refused. (The regions'
copies: ``tests/replication/test_destroyed_copies.py``.)
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections.abc import Callable

import pytest

from keyrotor import KeyManager, Settings
from keyrotor.errors import KeyVersionTooOld
from keyrotor.kek.base import KekProvider, WrapContext, WrappedDek
from keyrotor.kek.factory import open_provider
from keyrotor.notify import KeyChange
from tests.rotation_helpers import fetch

VALUE = "sk-ant-api03-destroyed-in-cache-0123456789"
TTL_S = 0.5


async def _supersede(url: str, scope: str, state: str) -> None:
    """Make v1 ``state`` with a v2 active, as a rotation and a retirement leave them."""
    await fetch(
        url,
        "UPDATE data_keys d SET state = $2 FROM key_scopes s WHERE s.id = d.scope_id AND s.name = $1 "
        "AND d.version = 1",
        scope,
        state,
    )
    await fetch(
        url,
        "INSERT INTO data_keys (scope_id, version, state, encrypted_dek, kek_id, kek_version) "
        "SELECT id, 2, 'active', '\\x00'::bytea, 'test', 1 FROM key_scopes WHERE name = $1",
        scope,
    )
    await fetch(url, "UPDATE key_scopes SET active_version = 2, latest_version = 2 WHERE name = $1", scope)


async def _destroy(url: str, scope: str) -> None:
    """What destroy_dek commits (its announcement is what the process misses)."""
    await fetch(
        url,
        "UPDATE data_keys d SET state = 'destroyed', encrypted_dek = NULL, destroyed_at = now() "
        "FROM key_scopes s WHERE s.id = d.scope_id AND s.name = $1 AND d.version = 1",
        scope,
    )


@pytest.mark.parametrize("state", ["retired", "grace"])
async def test_a_cached_key_is_refused_soon_after_its_destruction(
    state: str, env: dict[str, str], record: Callable[..., None]
) -> None:
    url = env["DATABASE_URL"]
    e = {**env, "KEYROTOR_LISTEN_KEY_CHANGES": "false", "KEYROTOR_ACTIVE_VERSION_TTL_SECONDS": str(TTL_S)}
    async with KeyManager(Settings.from_env(e)) as km:
        token = await km.encrypt("anthropic", VALUE, context="row:1")
        await _supersede(url, "anthropic", state)
        km.invalidate()  # the rotation's announcement was heard; the destruction's will not be
        assert await km.decrypt("anthropic", token, context="row:1") == VALUE  # v1 cached, as `state`
        await _destroy(url, "anthropic")
        destroyed_at = time.monotonic()
        served = 0
        deadline = destroyed_at + 10 * TTL_S + 5
        with pytest.raises(KeyVersionTooOld):
            while time.monotonic() < deadline:
                await km.decrypt("anthropic", token, context="row:1")
                served += 1
                await asyncio.sleep(0.02)
        refused_after = time.monotonic() - destroyed_at
        assert refused_after <= TTL_S + 0.5
        assert km.cache.get("anthropic", 1) is None  # dropped, not only refused
        with pytest.raises(KeyVersionTooOld):  # and it stays refused
            await km.decrypt("anthropic", token, context="row:1")
    record(
        "security",
        finding=6,
        what=f"a {state} DEK cached, destroyed, announcement missed (TTL {TTL_S} s)",
        tries=1,
        held=1,
        refused_after_s=round(refused_after, 2),
        served_meanwhile=served,
    )


class _GatedKek:
    """The real local keyring, whose unwraps wait at a gate the test opens (a KMS round trip
    under way): what the process hears meanwhile arrives while the unwrap is in flight."""

    def __init__(self, inner: KekProvider) -> None:
        self.inner = inner
        self.entered = asyncio.Event()
        self.gate = asyncio.Event()
        self.gate.set()

    def __getattr__(self, name: str) -> object:  # name, wrap, check, ...: the keyring's own
        return getattr(self.inner, name)

    async def unwrap(self, wrapped: WrappedDek, context: WrapContext) -> bytes:
        self.entered.set()
        await asyncio.wait_for(self.gate.wait(), timeout=10)
        return await self.inner.unwrap(wrapped, context)


async def test_a_destruction_heard_during_the_unwrap_is_not_forgotten(env: dict[str, str]) -> None:
    """The announcement of a destruction arrives while the first use of the retired key is
    unwrapping it: the process must not cache the key as one whose state needs no more checks
    (it would decrypt with the destroyed key for the cache's TTL, 30 minutes by default)."""
    url = env["DATABASE_URL"]
    settings = Settings.from_env({**env, "KEYROTOR_LISTEN_KEY_CHANGES": "false"})
    kek = _GatedKek(await open_provider(settings, env))
    try:
        async with KeyManager(settings, kek=kek) as km:  # type: ignore[arg-type]
            token = await km.encrypt("anthropic", VALUE, context="row:1")
            await _supersede(url, "anthropic", "retired")
            km.invalidate()
            kek.gate.clear()
            kek.entered.clear()
            first = asyncio.create_task(km.decrypt("anthropic", token, context="row:1"))
            await asyncio.wait_for(kek.entered.wait(), timeout=10)  # v1 read as retired, unwrapping
            await _destroy(url, "anthropic")
            km.on_key_change(KeyChange("destroyed", "anthropic", 1))  # what the listener would do
            kek.gate.set()
            # The call under way read the key before its destruction: either outcome is sound.
            with contextlib.suppress(KeyVersionTooOld):
                assert await asyncio.wait_for(first, timeout=10) == VALUE
            with pytest.raises(KeyVersionTooOld):
                await km.decrypt("anthropic", token, context="row:1")
            assert km.cache.get("anthropic", 1) is None
    finally:
        await kek.inner.aclose()
