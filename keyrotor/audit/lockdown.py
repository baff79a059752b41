"""The open default and its replacement: the wildcard grant ``* *`` and ``keyrotor lock-down``.

The first migration grants everyone (``*``) encrypt and decrypt on every scope (``*``), so a
first run works without configuration. A deployment that still has that grant lets any caller
that reaches a ``KeyManager`` read every value under any actor name it passes, so it is reported
(``health`` warns, ``status`` says so, ``KeyManager.open`` logs one warning) until
:func:`lock_down` replaces it with named grants in one transaction.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from keyrotor.audit.actors import WILDCARD, check_actor, check_pattern
from keyrotor.audit.grants import Grant, grant_access, list_grants, revoke_access
from keyrotor.audit.log import record_config_change
from keyrotor.errors import InvalidInput, SchemaMissing
from keyrotor.store import db
from keyrotor.store import grants as store

OPEN_GRANT_WARNING = (
    "the wildcard grant '* *' is in place: any actor may encrypt and decrypt in every scope; "
    "replace it with named grants: `keyrotor lock-down --grant ACTOR:SCOPE:decrypt,encrypt ...`"
)
_PERMISSIONS = ("encrypt", "decrypt")


@dataclass(frozen=True)
class NamedGrant:
    """One ``--grant ACTOR:SCOPE:PERMISSIONS`` of a lock-down."""

    actor: str
    scope: str
    encrypt: bool
    decrypt: bool


@dataclass
class LockDownResult:
    """What :func:`lock_down` changed."""

    granted: list[Grant] = field(default_factory=list)
    wildcard_removed: bool = False
    decrypt_grants: int = 0

    def as_dict(self) -> dict[str, Any]:
        return {
            "granted": [g.as_dict() for g in self.granted],
            "wildcard_removed": self.wildcard_removed,
            "decrypt_grants": self.decrypt_grants,
        }


def parse_grant(spec: str) -> NamedGrant:
    """Parse ``ACTOR:SCOPE:PERMISSIONS`` (permissions ``encrypt``, ``decrypt`` or both, comma-joined).

    The actor may itself contain ``:`` (``user:42``); a scope pattern cannot.

    Raises:
        InvalidInput: not of that shape, a wildcard actor, or a bad scope pattern or permission.
    """
    rest, _, perms = spec.rpartition(":")
    actor, _, scope = rest.rpartition(":")
    if not actor or not scope:
        raise InvalidInput(f"--grant {spec[:80]!r}: expected ACTOR:SCOPE:decrypt,encrypt")
    if actor == WILDCARD:
        raise InvalidInput("--grant: name an actor; the point of lock-down is to remove the wildcard '*'")
    check_actor(actor)
    check_pattern(scope)
    wanted = {p.strip() for p in perms.split(",") if p.strip()}
    if not wanted or not wanted <= set(_PERMISSIONS):
        raise InvalidInput(f"--grant {spec[:80]!r}: permissions are encrypt, decrypt or decrypt,encrypt")
    return NamedGrant(actor, scope, "encrypt" in wanted, "decrypt" in wanted)


async def wildcard_grant(session: AsyncSession) -> bool:
    """Whether the open default ``* *`` (any permission) is still granted."""
    return await store.grant_exists(session, WILDCARD, WILDCARD)


async def still_open(sessions: async_sessionmaker[AsyncSession]) -> bool:
    """Whether ``* *`` is granted, for a start-up warning: False when the database cannot be read
    now (the process's first real call reports that instead).

    Raises:
        SchemaMissing: the database has no keyrotor schema (``keyrotor db upgrade`` never ran).
    """
    try:
        async with db.transaction(sessions) as session:
            return await wildcard_grant(session)
    except SchemaMissing:  # not an outage: nothing will work until `keyrotor db upgrade`; say so now
        raise
    except Exception:
        return False


async def lock_down(
    session: AsyncSession, grants: list[NamedGrant], *, by: str, allow_empty: bool = False
) -> LockDownResult:
    """Insert ``grants`` and remove ``* *``, in the caller's transaction (one ``config_change``
    event a grant, one for the removal, and one ``lock_down`` summary).

    Raises:
        InvalidInput: afterwards no grant would let anybody decrypt anything, and not
            ``allow_empty`` (the caller's transaction must then be rolled back; nothing is kept).
    """
    result = LockDownResult()
    for g in grants:
        granted = await grant_access(session, g.actor, g.scope, encrypt=g.encrypt, decrypt=g.decrypt, by=by)
        result.granted.append(granted)
    if await wildcard_grant(session):
        await revoke_access(session, WILDCARD, WILDCARD, by=by)
        result.wildcard_removed = True
    remaining = await list_grants(session)
    result.decrypt_grants = sum(1 for g in remaining if g.can_decrypt)
    if not result.decrypt_grants and not allow_empty:
        raise InvalidInput(
            "after lock-down nobody could decrypt anything: add --grant ACTOR:SCOPE:decrypt "
            "(or --allow-empty if that is what you want)"
        )
    await record_config_change(
        session,
        by,
        "lock_down",
        None,
        {"granted": [g._state() for g in result.granted], "wildcard_removed": result.wildcard_removed},
    )
    return result
