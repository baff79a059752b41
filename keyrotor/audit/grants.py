"""Access control: which actor may encrypt or decrypt in which scopes.

A grant is ``(actor, scope pattern, can_encrypt, can_decrypt)`` in ``encryption_grants``:

- ``actor`` is an actor name, or ``*`` for every actor;
- the pattern is a scope (``anthropic``), a prefix (``tenant-42/*``: every scope below
  ``tenant-42/``, not ``tenant-42`` itself) or ``*`` (every scope).

A call is allowed if any grant matching its actor and scope allows the operation; there are no
deny rules. New installs start with one grant, ``* * encrypt decrypt`` (created by the
migration), so the first run works; docs/audit.md says how to tighten it.

Every grant and revoke writes a ``config_change`` audit event in the same transaction.
KeyManager checks grants on every call, against a copy cached for ``KEYROTOR_GRANTS_TTL_SECONDS``;
a grant or revoke made in this process invalidates the copy at once (other processes see it
within the TTL).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from sqlalchemy import event
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from keyrotor.audit.actors import WILDCARD, check_actor, check_pattern, pattern_matches
from keyrotor.audit.log import record_config_change
from keyrotor.errors import (
    ConfigurationError,
    InvalidInput,
    NotFound,
    SchemaMissing,
    StoreRejected,
    StoreUnavailable,
)
from keyrotor.store import db
from keyrotor.store import grants as store

__all__ = [
    "WILDCARD",
    "Grant",
    "GrantCache",
    "check_pattern",
    "generation",
    "grant_access",
    "list_grants",
    "pattern_matches",
    "revoke_access",
]

# While the database is down, the grants last loaded stay in force; a reload is tried this often.
_OUTAGE_RETRY_S = 5.0

# Bumped by every grant and revoke made in this process; caches compare it on each check.
_generation = 0


def generation() -> int:
    """How many grant changes this process has made (caches reload when it moves)."""
    return _generation


def _bump(*_: object) -> None:
    global _generation
    _generation += 1


def _bump_on_commit(session: AsyncSession) -> None:
    # After the commit, not now: a cache reloading before the commit would read the old
    # grants and take them for current until its TTL ran out.
    event.listen(session.sync_session, "after_commit", _bump, once=True)


@dataclass(frozen=True, slots=True)
class Grant:
    """One row of ``encryption_grants``."""

    actor: str
    scope: str
    can_encrypt: bool
    can_decrypt: bool
    created_at: datetime | None = None
    updated_at: datetime | None = None

    def matches(self, actor: str, scope: str) -> bool:
        """Whether this grant applies to ``actor`` calling on ``scope``."""
        return (self.actor == WILDCARD or self.actor == actor) and pattern_matches(self.scope, scope)

    def as_dict(self) -> dict[str, Any]:
        return {
            "actor": self.actor,
            "scope": self.scope,
            "encrypt": self.can_encrypt,
            "decrypt": self.can_decrypt,
            "created_at": self.created_at.isoformat() if self.created_at else None,
            "updated_at": self.updated_at.isoformat() if self.updated_at else None,
        }

    def _state(self) -> dict[str, Any]:
        return {
            "actor": self.actor,
            "scope": self.scope,
            "encrypt": self.can_encrypt,
            "decrypt": self.can_decrypt,
        }


def _grant(row: Any) -> Grant:
    return Grant(row[0], row[1], row[2], row[3], row[4], row[5])


async def list_grants(session: AsyncSession) -> list[Grant]:
    """Every grant, ordered by actor then pattern."""
    return [_grant(r) for r in await store.all_grants(session)]


async def _get(session: AsyncSession, actor: str, pattern: str) -> Grant | None:
    row = await store.grant_for_update(session, actor, pattern)
    return _grant(row) if row else None


async def grant_access(
    session: AsyncSession, actor: str, scope: str, *, encrypt: bool, decrypt: bool, by: str
) -> Grant:
    """Allow ``actor`` to encrypt and/or decrypt in scopes matching ``scope``, in the caller's transaction.

    Permissions add up: granting ``decrypt`` to an actor who may already encrypt leaves both.
    Writes a ``config_change`` audit event (``what: grant``) with the grant before and after.

    Args:
        actor: the actor, or ``*`` for everyone.
        scope: a scope, ``prefix/*`` or ``*``.
        by: who makes the change (recorded as the event's actor).

    Raises:
        InvalidInput: bad actor or pattern, or neither permission asked for.
    """
    check_actor(actor, wildcard=True)
    check_pattern(scope)
    if not (encrypt or decrypt):
        raise InvalidInput("grant what? give --encrypt and/or --decrypt")
    before = await _get(session, actor, scope)
    after = _grant(await store.add_permissions(session, actor, scope, encrypt=encrypt, decrypt=decrypt))
    await record_config_change(
        session, by, "grant", before._state() if before else None, after._state(), scope=_scope_of(scope)
    )
    _bump_on_commit(session)
    return after


async def revoke_access(
    session: AsyncSession,
    actor: str,
    scope: str,
    *,
    by: str,
    encrypt: bool = False,
    decrypt: bool = False,
) -> Grant | None:
    """Remove a grant (or, with ``encrypt``/``decrypt``, only those permissions), in the caller's transaction.

    The grant is named exactly as it was granted (``revoke alice tenant-42/*`` removes that
    row; it does not carve a scope out of a wider pattern). Writes a ``config_change`` event.

    Returns:
        The grant as it remains, or None if it was removed entirely.

    Raises:
        NotFound: no grant for exactly that actor and pattern.
    """
    check_actor(actor, wildcard=True)
    check_pattern(scope)
    before = await _get(session, actor, scope)
    if before is None:
        raise NotFound(f"no grant for actor {actor!r} on {scope!r} (see `keyrotor grants`)")
    after: Grant | None = None
    if encrypt or decrypt:
        keep_encrypt = before.can_encrypt and not encrypt
        keep_decrypt = before.can_decrypt and not decrypt
        if keep_encrypt or keep_decrypt:
            row = await store.set_permissions(
                session, actor, scope, encrypt=keep_encrypt, decrypt=keep_decrypt
            )
            after = _grant(row)
    if after is None:
        await store.delete_grant(session, actor, scope)
    await record_config_change(
        session, by, "revoke", before._state(), after._state() if after else None, scope=_scope_of(scope)
    )
    _bump_on_commit(session)
    return after


def _scope_of(pattern: str) -> str | None:
    # The event's scope column holds real scopes only; a pattern stays in the metadata.
    return None if "*" in pattern else pattern


class GrantCache:
    """The grants of one process, reloaded every ``ttl_s`` seconds or after a local change.

    ``permissions(actor, scope)`` is a dict lookup once warm: it runs on every KeyManager call.
    """

    _MAX_DECISIONS = 100_000

    def __init__(
        self,
        sessions: Callable[[], async_sessionmaker[AsyncSession]],
        *,
        ttl_s: float,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._sessions = sessions
        self._ttl_s = ttl_s
        self._clock = clock
        self._grants: list[Grant] = []
        self._expires = float("-inf")
        self._generation = -1
        # (actor, scope) -> (can_encrypt, can_decrypt), valid until the next reload
        self._decisions: dict[tuple[str, str], tuple[bool, bool]] = {}
        self._lock = asyncio.Lock()

    def invalidate(self) -> None:
        """Reload on the next check."""
        self._expires = float("-inf")

    @property
    def grants(self) -> list[Grant]:
        """The grants as last loaded."""
        return list(self._grants)

    def cached(self, actor: str, scope: str) -> tuple[bool, bool] | None:
        """The cached ``(can_encrypt, can_decrypt)``, or None if the cache must be (re)loaded."""
        if self._generation != _generation or self._clock() >= self._expires:
            return None
        decision = self._decisions.get((actor, scope))
        if decision is None:
            decision = self._decide(actor, scope)
        return decision

    async def permissions(self, actor: str, scope: str) -> tuple[bool, bool]:
        """``(can_encrypt, can_decrypt)`` for ``actor`` on ``scope``.

        Raises:
            StoreUnavailable: the grants had never been loaded and the database is down (once
                loaded, they stay in force through an outage).
        """
        decision = self.cached(actor, scope)
        if decision is not None:
            return decision
        async with self._lock:
            # Another task may have reloaded while this one waited.
            if self._generation != _generation or self._clock() >= self._expires:
                await self._reload()
        return self._decide(actor, scope)

    async def _reload(self) -> None:
        gen = _generation
        try:
            async with db.transaction(self._sessions()) as session:
                grants = await list_grants(session)
        except StoreUnavailable:
            if self._generation == -1:
                raise
            # The database is down (a primary-region outage): keep deciding by the grants
            # last loaded, so reads that fail over to another region keep working; retry soon.
            self._expires = self._clock() + min(self._ttl_s, _OUTAGE_RETRY_S)
            return
        except SchemaMissing:  # the table is missing (db.wrap_exceptions translates it)
            raise
        except StoreRejected as exc:
            raise ConfigurationError(
                "cannot read encryption_grants: is the schema up to date? run `keyrotor db upgrade`"
            ) from exc
        self._grants = grants
        self._decisions = {}
        self._generation = gen
        self._expires = self._clock() + self._ttl_s

    def _decide(self, actor: str, scope: str) -> tuple[bool, bool]:
        can_encrypt = can_decrypt = False
        for g in self._grants:
            if g.matches(actor, scope):
                can_encrypt = can_encrypt or g.can_encrypt
                can_decrypt = can_decrypt or g.can_decrypt
        if len(self._decisions) >= self._MAX_DECISIONS:
            self._decisions.clear()
        decision = (can_encrypt, can_decrypt)
        self._decisions[(actor, scope)] = decision
        return decision
