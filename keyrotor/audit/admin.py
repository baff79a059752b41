"""Grants administration through a KeyManager (``km.grant``, ``km.revoke``): each change is one
transaction of its own, recorded as by the current caller unless ``by`` names another.

The grant rules, their audit event and the cache live in :mod:`keyrotor.audit.grants`.
"""

from __future__ import annotations

from typing import Protocol

from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from keyrotor.audit.calls import CallAudit
from keyrotor.audit.grants import Grant, grant_access, revoke_access
from keyrotor.store import db


class _Manager(Protocol):
    calls: CallAudit

    @property
    def sessions(self) -> async_sessionmaker[AsyncSession]: ...


class GrantsAdmin:
    """KeyManager's grant administration methods."""

    async def grant(
        self: _Manager,
        actor: str,
        scope: str,
        *,
        encrypt: bool = False,
        decrypt: bool = False,
        by: str | None = None,
    ) -> Grant:
        """Allow ``actor`` (or ``*``) to encrypt and/or decrypt in scopes matching ``scope``.

        Recorded as a ``config_change`` by ``by`` (default: the current caller). Takes effect
        in this process at once, in others within ``KEYROTOR_GRANTS_TTL_SECONDS``.

        Raises:
            InvalidInput: bad actor or scope pattern, or neither permission.
        """
        by = by or self.calls.who(None, None, None)[0]
        async with db.transaction(self.sessions) as session:
            return await grant_access(session, actor, scope, encrypt=encrypt, decrypt=decrypt, by=by)

    async def revoke(
        self: _Manager,
        actor: str,
        scope: str,
        *,
        encrypt: bool = False,
        decrypt: bool = False,
        by: str | None = None,
    ) -> Grant | None:
        """Remove a grant, or only its ``encrypt``/``decrypt`` permission.

        See ``keyrotor.audit.grants.revoke_access``.

        Raises:
            NotFound: no grant for exactly that actor and pattern.
        """
        by = by or self.calls.who(None, None, None)[0]
        async with db.transaction(self.sessions) as session:
            return await revoke_access(session, actor, scope, encrypt=encrypt, decrypt=decrypt, by=by)
