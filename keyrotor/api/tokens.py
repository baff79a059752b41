"""API tokens: made here, stored as SHA-256 hashes (``keyrotor.store.tokens``), checked per request.

A token is ``krt_`` followed by 32 random bytes in unpadded base64url (47 characters): the prefix
lets secret scanners recognise one. Only its SHA-256 is stored; a presented token is hashed,
looked up by that hash and the stored hash compared with ``hmac.compare_digest``. The token names
its actor: over HTTP the actor of every call is the token's, never anything in the request.
Creating and revoking tokens are ``config_change`` audit events (the token itself never is).
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import hmac
import math
import re
import secrets
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from keyrotor.audit.log import check_actor, record_config_change
from keyrotor.errors import InvalidInput, NotFound
from keyrotor.store import db
from keyrotor.store import tokens as store

PREFIX = "krt_"
_TOKEN = re.compile(r"krt_[A-Za-z0-9_-]{43}")
MAX_EXPIRES_DAYS = 3650


def new_token() -> str:
    """A fresh random token."""
    return PREFIX + base64.urlsafe_b64encode(secrets.token_bytes(32)).rstrip(b"=").decode()


def token_hash(token: str) -> bytes:
    """The SHA-256 of a token (what the database keeps)."""
    return hashlib.sha256(token.encode("utf-8", "surrogatepass")).digest()


def looks_like_token(value: str) -> bool:
    """Whether ``value`` has the shape of a keyrotor API token."""
    return _TOKEN.fullmatch(value) is not None


@dataclass(frozen=True, slots=True)
class IssuedToken:
    """A token just made: the only time its text exists outside the caller's hands."""

    id: int
    actor: str
    token: str
    expires_at: datetime | None

    def as_dict(self) -> dict[str, Any]:
        return {
            "actor": self.actor,
            "token": self.token,
            "id": self.id,
            "expires_at": self.expires_at.isoformat() if self.expires_at else None,
        }


async def create_token(
    sessions: async_sessionmaker[AsyncSession],
    actor: str,
    *,
    by: str,
    expires_in_days: int | None = None,
    now: datetime | None = None,
) -> IssuedToken:
    """Make a token for ``actor`` and store its hash (a ``config_change`` by ``by``).

    Raises:
        InvalidInput: a bad actor (``*`` included: no token may name the wildcard) or expiry.
    """
    check_actor(actor)
    check_actor(by)
    expires_at = None
    if expires_in_days is not None:
        if not 1 <= expires_in_days <= MAX_EXPIRES_DAYS:
            raise InvalidInput(f"--expires-in-days must be between 1 and {MAX_EXPIRES_DAYS}")
        expires_at = (now or datetime.now(UTC)) + timedelta(days=expires_in_days)
    token = new_token()
    async with db.transaction(sessions) as session:
        record = await store.insert_token(
            session, actor, token_hash(token), created_by=by, expires_at=expires_at
        )
        after = {"id": record.id, "actor": actor, "expires_at": record.as_dict()["expires_at"]}
        await record_config_change(session, by, "api_token", None, after)
    return IssuedToken(record.id, actor, token, record.expires_at)


async def list_tokens(sessions: async_sessionmaker[AsyncSession]) -> list[store.TokenRecord]:
    """Every token (never its text: only hashes are kept)."""
    async with db.transaction(sessions) as session:
        return await store.list_tokens(session)


async def revoke_token(
    sessions: async_sessionmaker[AsyncSession], token_id: int, *, by: str
) -> store.TokenRecord:
    """Revoke a token (a ``config_change`` by ``by``; revoking twice changes nothing).

    Raises:
        NotFound: no token has that id.
    """
    check_actor(by)
    async with db.transaction(sessions) as session:
        before = await store.get_token(session, token_id)
        if before is None:
            raise NotFound(f"no API token with id {token_id}")
        after = await store.revoke_token(session, token_id)
        assert after is not None
        if before.revoked_at is None:
            await record_config_change(session, by, "api_token", _brief(before), _brief(after))
    return after


def _brief(record: store.TokenRecord) -> dict[str, Any]:
    doc = record.as_dict()
    return {k: doc[k] for k in ("id", "actor", "expires_at", "revoked_at")}


@dataclass(frozen=True, slots=True)
class Bearer:
    """Who a valid token names."""

    token_id: int
    actor: str


class TokenVerifier:
    """Checks presented tokens against the table, remembering answers for ``ttl_s`` seconds.

    A revoked or expired token stops working within ``ttl_s`` (expiry is checked on every call,
    revocation when the cached answer is read again). The cache is keyed by the token's hash, so
    no token text stays in memory after a request.
    """

    _MAX_ENTRIES = 10_000

    def __init__(
        self,
        sessions: async_sessionmaker[AsyncSession],
        *,
        ttl_s: float,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._sessions = sessions
        self._ttl_s = ttl_s
        self._clock = clock
        # digest -> (cached until, the bearer or None when unknown or revoked, its expiry as a
        # Unix time or inf): what a request needs, decided once a lookup.
        self._cache: dict[bytes, tuple[float, Bearer | None, float]] = {}
        self._pending: dict[bytes, asyncio.Future[tuple[Bearer | None, float]]] = {}

    async def verify(self, token: str) -> Bearer | None:
        """The bearer a token names, or None if it is unknown, revoked or expired."""
        if not looks_like_token(token):
            return None
        digest = token_hash(token)
        hit = self._cache.get(digest)
        if hit is not None and hit[0] > self._clock():
            bearer, expires = hit[1], hit[2]
        else:
            bearer, expires = await self._lookup(digest)
        if bearer is None or expires <= time.time():
            return None
        return bearer

    async def _lookup(self, digest: bytes) -> tuple[Bearer | None, float]:
        # One lookup a token at a time: when a busy token's entry expires, the requests in
        # flight share one query instead of each taking a connection for the same row.
        task = self._pending.get(digest)
        if task is None:
            task = self._pending[digest] = asyncio.ensure_future(self._fetch(digest, self._clock()))
            task.add_done_callback(lambda done: self._settled(digest, done))
        # Shielded: a request that goes away does not cancel the others' lookup.
        return await asyncio.shield(task)

    def _settled(self, digest: bytes, task: asyncio.Future[tuple[Bearer | None, float]]) -> None:
        self._pending.pop(digest, None)
        if not task.cancelled():
            task.exception()  # retrieved: its waiters, if any are left, raise it themselves

    async def _fetch(self, digest: bytes, now: float) -> tuple[Bearer | None, float]:
        async with db.transaction(self._sessions) as session:
            found = await store.find_by_hash(session, digest)
        bearer, expires = None, math.inf
        if found is not None and hmac.compare_digest(found[1], digest):
            record = found[0]
            if record.revoked_at is None:
                bearer = Bearer(record.id, record.actor)
                if record.expires_at is not None:
                    expires = record.expires_at.timestamp()
        if self._ttl_s > 0:
            if len(self._cache) >= self._MAX_ENTRIES:
                self._cache.clear()
            self._cache[digest] = (now + self._ttl_s, bearer, expires)
        return bearer, expires
