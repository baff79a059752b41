"""The primary region's side of replication: its usable DEKs and their fingerprints."""

from __future__ import annotations

import hashlib

from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from keyrotor.errors import KekUnavailable
from keyrotor.kek.base import KekProvider, WrapContext, WrappedDek
from keyrotor.replication.grading import Source
from keyrotor.replication.regions import fingerprint, unwrap_many
from keyrotor.store import db
from keyrotor.store import replication as store
from keyrotor.store.replication import PrimaryDek


class PrimaryKeys:
    """The primary's store and KEK provider, and a cache of its DEKs' fingerprints.

    A fingerprint costs an unwrap (a KMS call for a remote provider), so each is kept by the
    digest of its wrapped blob and KEK id: an hourly check of an unchanged primary unwraps nothing.
    """

    def __init__(
        self, name: str, sessions: async_sessionmaker[AsyncSession], kek: KekProvider | None
    ) -> None:
        self.name = name
        self.sessions = sessions
        self._kek = kek
        self._fingerprints: dict[bytes, str] = {}  # sha256(kek id, wrapped blob) -> fingerprint

    @property
    def kek(self) -> KekProvider:
        """The primary's KEK provider.

        Raises:
            KekUnavailable: it could not be opened (the primary region's outage).
        """
        if self._kek is None:
            raise KekUnavailable(f"the KEK provider of the primary region {self.name} is unavailable")
        return self._kek

    async def sources(self, scope: str | None) -> dict[tuple[str, int], Source]:
        """The primary's usable DEKs (all, or one scope's) with their fingerprints.

        Raises:
            StoreUnavailable, KekUnavailable: the primary cannot be read.
        """
        async with db.transaction(self.sessions) as session:
            deks = await store.replicated_deks(session, scope)
        keys = [(d, _cache_key(d)) for d in deks]
        await self._fingerprint([(d, k) for d, k in keys if k not in self._fingerprints])
        if len(self._fingerprints) > 4 * max(len(deks), 10_000):
            live = {k for _, k in keys}
            self._fingerprints = {k: v for k, v in self._fingerprints.items() if k in live}
        return {
            (d.scope, d.version): Source(
                d.scope,
                d.version,
                d.state,
                d.kek_version,
                _wrapped(d),
                self._fingerprints[k],
                d.dates,
                d.imported,
            )
            for d, k in keys
        }

    async def usable(self, keys: list[tuple[str, int]]) -> set[tuple[str, int]]:
        """Which of ``keys`` (scope, version) are DEKs the primary keeps usable now.

        Raises:
            StoreUnavailable: the primary cannot be read.
        """
        async with db.transaction(self.sessions) as session:
            return await store.usable_keys(session, keys)

    async def _fingerprint(self, todo: list[tuple[PrimaryDek, bytes]]) -> None:
        unwrapped = await unwrap_many(
            self.kek, [(_wrapped(d), WrapContext(d.scope, d.version)) for d, _ in todo]
        )
        for (_, cache_key), dek in zip(todo, unwrapped, strict=True):
            if isinstance(dek, BaseException):
                raise dek  # the primary's own DEKs must unwrap: its outage or misconfiguration
            self._fingerprints[cache_key] = fingerprint(dek)


def _wrapped(d: PrimaryDek) -> WrappedDek:
    return WrappedDek(d.kek_id, d.kek_version, d.wrapped)


def _cache_key(d: PrimaryDek) -> bytes:
    return hashlib.sha256(d.kek_id.encode() + b"\x00" + d.wrapped).digest()
