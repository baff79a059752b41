"""A background refresh of a cached DEK that fails: an outage keeps the entry (availability), a
refusal (the DEK destroyed, the KEK refusing it) drops it, so the key stops decrypting at once."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Sequence

import pytest
from sqlalchemy import text

from keyrotor import KeyManager, Settings
from keyrotor.errors import KekError, KekUnavailable, KeyVersionTooOld
from keyrotor.kek.base import KekProvider, WrapContext, WrappedDek
from keyrotor.kek.factory import open_provider


class SwitchableKek:
    """The real local keyring, whose unwraps can be made to fail: ``fail`` is raised by each."""

    def __init__(self, inner: KekProvider) -> None:
        self.inner = inner
        self.fail: Exception | None = None

    @property
    def name(self) -> str:
        return self.inner.name

    async def current_version(self) -> int:
        return await self.inner.current_version()

    async def wrap(self, dek: bytes, context: WrapContext) -> WrappedDek:
        return await self.inner.wrap(dek, context)

    async def unwrap(self, wrapped: WrappedDek, context: WrapContext) -> bytes:
        if self.fail is not None:
            raise self.fail
        return await self.inner.unwrap(wrapped, context)

    async def rewrap(self, items: Sequence[tuple[WrappedDek, WrapContext]]) -> list[WrappedDek]:
        return await self.inner.rewrap(items)

    async def rotate(self) -> int:
        return await self.inner.rotate()

    async def check(self) -> None:
        await self.inner.check()

    async def aclose(self) -> None:
        await self.inner.aclose()


# A cached DEK lives 4 s and is refreshed on a hit after 1 s: the checks below run well before
# the entry would expire on its own.
TTL_S = 4.0


async def _load(km: KeyManager, token: str) -> float:
    """Load the value's DEK into the cache now; returns when the entry expires by its TTL."""
    km.invalidate()
    await km.decrypt("openai", token)
    return time.monotonic() + TTL_S


async def _refresh(km: KeyManager, token: str) -> None:
    """Hit the DEK inside its refresh window; wait (bounded) for the background refresh to end."""
    await asyncio.sleep(1.2)
    assert await km.decrypt("openai", token) == "sk-1"  # a hit: starts the refresh
    deadline = time.monotonic() + 2.0
    while km.ring.refreshing:
        assert time.monotonic() < deadline, "the background refresh did not end"
        await asyncio.sleep(0.01)


@pytest.fixture
async def kek(settings: Settings) -> SwitchableKek:
    return SwitchableKek(await open_provider(settings))


def _settings(settings: Settings) -> Settings:
    return settings.model_copy(
        update={"dek_cache_ttl_s": TTL_S, "dek_cache_refresh_ahead": 0.75, "listen_key_changes": False}
    )


async def test_an_outage_during_a_refresh_keeps_the_cached_dek(
    settings: Settings, kek: SwitchableKek
) -> None:
    async with KeyManager(_settings(settings), kek=kek) as km:
        token = await km.encrypt("openai", "sk-1")
        expires = await _load(km, token)
        kek.fail = KekUnavailable("KEK provider unreachable (test outage)")
        await _refresh(km, token)
        assert await km.decrypt("openai", token) == "sk-1"  # served from the cache through the outage
        assert time.monotonic() < expires


async def test_a_kek_that_refuses_the_dek_on_refresh_stops_the_cached_dek(
    settings: Settings, kek: SwitchableKek
) -> None:
    async with KeyManager(_settings(settings), kek=kek) as km:
        token = await km.encrypt("openai", "sk-1")
        expires = await _load(km, token)
        kek.fail = KekError("the KEK is disabled (test)")
        await _refresh(km, token)
        with pytest.raises(KekError):
            await km.decrypt("openai", token)
        assert time.monotonic() < expires  # refused before the entry's TTL ran out


async def test_a_dek_destroyed_meanwhile_stops_decrypting_at_the_failed_refresh(
    settings: Settings, kek: SwitchableKek
) -> None:
    # Another process destroyed the version; this one missed the announcement (not listening).
    async with KeyManager(_settings(settings), kek=kek) as km:
        token = await km.encrypt("openai", "sk-1")
        expires = await _load(km, token)
        async with km.engine.begin() as conn:
            await conn.execute(
                text("UPDATE data_keys SET state = 'destroyed', encrypted_dek = NULL, destroyed_at = now()")
            )
        await _refresh(km, token)
        with pytest.raises(KeyVersionTooOld):
            await km.decrypt("openai", token)
        assert time.monotonic() < expires
