"""Unwrap with whichever configured provider wrapped a DEK: what keeps reads working during a
KEK provider migration.

A DEK's ``kek_id`` tells which provider wrapped it (:func:`keyrotor.kek.base.provider_of`).
:class:`RoutingKek` wraps, rotates and checks with its *primary* provider (``SECRETS_PROVIDER``)
and unwraps each DEK with the provider its ``kek_id`` names, if that provider is configured as a
read provider (``KEYROTOR_KEK_READ_PROVIDERS``, e.g. ``aws`` while migrating local -> aws).
A DEK of a provider that is not configured fails with the primary's clear
:class:`~keyrotor.kek.base.ForeignKek` error naming both providers.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence

from keyrotor.kek.base import KekProvider, WrapContext, WrappedDek, provider_of


class RoutingKek:
    """A :class:`KekProvider`: ``primary`` for everything, ``readers`` (by provider name, e.g.
    ``aws-kms``) for unwrapping DEKs they wrapped. Closing it closes them all."""

    def __init__(self, primary: KekProvider, readers: Mapping[str, KekProvider]) -> None:
        self.primary = primary
        self.readers = {name: p for name, p in readers.items() if name != primary.name}

    def __repr__(self) -> str:
        return f"RoutingKek({self.primary!r}, readers={sorted(self.readers)})"

    @property
    def name(self) -> str:
        return self.primary.name

    def _route(self, wrapped: WrappedDek) -> KekProvider:
        return self.readers.get(provider_of(wrapped.kek_id), self.primary)

    async def current_version(self) -> int:
        return await self.primary.current_version()

    async def wrap(self, dek: bytes, context: WrapContext) -> WrappedDek:
        return await self.primary.wrap(dek, context)

    async def unwrap(self, wrapped: WrappedDek, context: WrapContext) -> bytes:
        return await self._route(wrapped).unwrap(wrapped, context)

    async def rewrap(self, items: Sequence[tuple[WrappedDek, WrapContext]]) -> list[WrappedDek]:
        if all(self._route(w) is self.primary for w, _ in items):
            return await self.primary.rewrap(items)
        # DEKs of a read provider move to the primary: unwrap there, wrap here.
        return [await self.primary.wrap(await self.unwrap(w, ctx), ctx) for w, ctx in items]

    async def rotate(self) -> int:
        return await self.primary.rotate()

    async def check(self) -> None:
        await self.primary.check()
        for reader in self.readers.values():
            await reader.check()

    async def aclose(self) -> None:
        try:
            for reader in self.readers.values():
                await reader.aclose()
        finally:
            await self.primary.aclose()
