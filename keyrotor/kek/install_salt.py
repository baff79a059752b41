"""This install's salt for the local KEK derivation, read from the database (migration 0010).

See :mod:`keyrotor.kek.local` for why it exists and where it is used.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

import asyncpg

from keyrotor.errors import ConfigurationError
from keyrotor.kek.base import WrapContext, WrappedDek
from keyrotor.kek.local import LocalKeyring
from keyrotor.store import kek as kek_store
from keyrotor.store.db import async_url, wrap_exceptions

SALT_BYTES = 32


async def read_install_salt(database_url: str) -> bytes | None:
    """The 32-byte install salt, or None if the database has no ``install_salt`` table yet.

    One short connection; the provider is opened once per process (or CLI command).

    Raises:
        StoreUnavailable: the database cannot be reached.
        ConfigurationError: the table exists but holds no valid salt (it was tampered with).
    """
    url = async_url(database_url).set(drivername="postgresql")
    with wrap_exceptions():
        conn = await asyncpg.connect(url.render_as_string(hide_password=False), timeout=10)
        try:
            if not await kek_store.install_salt_table_exists(conn):
                return None
            salt = await kek_store.fetch_install_salt(conn)
        except asyncpg.InsufficientPrivilegeError:
            raise ConfigurationError(
                "this database role may not read install_salt: apply deploy/postgres/roles.sql again"
            ) from None
        finally:
            await conn.close()
    if not isinstance(salt, bytes) or len(salt) != SALT_BYTES:
        raise ConfigurationError("install_salt holds no valid salt: restore it from a backup of this install")
    return salt


class DeferredLocalKeyring:
    """The local keyring of a process that started while its database was down.

    The install salt is part of the KEK, so no DEK can be wrapped or unwrapped without it; but
    nothing can be done without the database either. Rather than refuse to start, the process
    reads the salt on its first KEK call (and again on each call until it succeeds, each failure
    being the same transient ``StoreUnavailable`` the call would have met at the database).
    """

    def __init__(self, build: Callable[[bytes | None], LocalKeyring], database_url: str) -> None:
        self._build = build
        self._database_url = database_url
        self._ring: LocalKeyring | None = None

    def __repr__(self) -> str:
        return f"DeferredLocalKeyring(loaded={self._ring is not None})"

    @property
    def name(self) -> str:
        return "local"

    async def keyring(self) -> LocalKeyring:
        """The keyring, built with the install salt once the database answers."""
        if self._ring is None:
            self._ring = self._build(await read_install_salt(self._database_url))
        return self._ring

    async def current_version(self) -> int:
        return await (await self.keyring()).current_version()

    async def wrap(self, dek: bytes, context: WrapContext) -> WrappedDek:
        return await (await self.keyring()).wrap(dek, context)

    async def unwrap(self, wrapped: WrappedDek, context: WrapContext) -> bytes:
        return await (await self.keyring()).unwrap(wrapped, context)

    async def rewrap(self, items: Sequence[tuple[WrappedDek, WrapContext]]) -> list[WrappedDek]:
        return await (await self.keyring()).rewrap(items)

    async def rotate(self) -> int:
        return await (await self.keyring()).rotate()

    async def check(self) -> None:
        await (await self.keyring()).check()

    async def aclose(self) -> None:
        return None
