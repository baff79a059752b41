"""What every request of ``keyrotor serve`` shares: the KeyManager, the enqueue client, the token
verifier, the rate limiter, and who the caller is."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field
from typing import Any

from aiohttp import web

from keyrotor.api.errors import ApiError
from keyrotor.api.limits import Network, RateLimiter, retry_after
from keyrotor.api.tokens import Bearer, TokenVerifier
from keyrotor.audit.log import AuditEvent, write_event
from keyrotor.errors import InvalidScope
from keyrotor.inputs import check_scope
from keyrotor.keys import KeyManager
from keyrotor.queue.client import KeyrotorClient
from keyrotor.settings import Settings
from keyrotor.store import db

MAX_USER_AGENT_CHARS = 300
# Failed authentications a client address (an IPv6 /64: limits.client_key) may make: a second
# each, 20 at once. Beyond that its requests are refused before any token lookup, so guessing
# tokens costs the database nothing.
AUTH_FAILURES_PER_SECOND, AUTH_FAILURES_BURST = 1.0, 20


@dataclass(frozen=True, slots=True)
class Caller:
    """The authenticated caller of one request: the token's actor, never anything it sent."""

    token_id: int
    actor: str
    ip: str | None
    user_agent: str | None

    def who(self) -> dict[str, Any]:
        """Keyword arguments naming the caller to a KeyManager call."""
        return {"actor": self.actor, "ip": self.ip, "user_agent": self.user_agent}


@dataclass
class Service:
    settings: Settings
    km: KeyManager
    verifier: TokenVerifier
    limiter: RateLimiter
    proxies: tuple[Network, ...]
    client: KeyrotorClient | None = None
    owns_client: bool = True
    _client_lock: asyncio.Lock = field(default_factory=asyncio.Lock)
    auth_failures: RateLimiter = field(
        default_factory=lambda: RateLimiter(AUTH_FAILURES_PER_SECOND, AUTH_FAILURES_BURST)
    )

    async def rotation_client(self) -> KeyrotorClient:
        """The enqueue client, connected on first use (so Redis being down does not stop
        encrypt and decrypt)."""
        async with self._client_lock:
            if self.client is None:
                client = KeyrotorClient(self.settings, engine=self.km.engine)
                await client.open()
                self.client = client
            return self.client

    async def aclose(self) -> None:
        if self.client is not None and self.owns_client:
            await self.client.close()
        self.client = None

    def caller(self, request: web.Request, bearer: Bearer, ip: str | None) -> Caller:
        """The caller of ``request``: ``bearer``'s token and actor, ``ip`` (``client_ip``'s
        answer for the request) and its User-Agent."""
        ua = request.headers.get("User-Agent")
        return Caller(bearer.token_id, bearer.actor, ip, ua[:MAX_USER_AGENT_CHARS] if ua else None)

    def spend(self, caller: Caller, units: int, *, paid: int = 0) -> None:
        """Charge ``units`` to the caller's token; ``paid``: what the request was charged already.

        Raises:
            ApiError: 429 with ``Retry-After`` when the token is over its rate.
        """
        wait = self.limiter.take(caller.token_id, units, paid=paid)
        if wait > 0:
            raise ApiError(
                429,
                "rate_limited",
                "this token is over its rate limit (KEYROTOR_API_RATE_PER_SECOND); retry later",
                headers={"Retry-After": retry_after(wait)},
            )

    async def valid_scope(self, caller: Caller, scope: str, event_type: str) -> str:
        """``scope`` if it is a scope name; otherwise record a failed ``event_type`` naming no
        scope and raise.

        Routes that check grants themselves call this first, as a single encrypt or decrypt does:
        text that is not a scope name (a pasted key, say) never reaches a grant lookup, a
        denial's message or an ``unauthorized`` event.

        Raises:
            InvalidScope: not a scope name (400).
        """
        try:
            return check_scope(scope)
        except InvalidScope as exc:
            who = (caller.actor, caller.ip, caller.user_agent)
            await self.km.calls.failure(event_type, who, None, None, "", exc, {"via": "http"})
            raise

    async def refuse(self, caller: Caller, scope: str | None, operation: str, reason: str) -> ApiError:
        """Audit an ``unauthorized`` event for an operation the caller's grants do not allow, and
        return the 403 to raise."""
        await self.audit_denial(caller, scope, operation, reason)
        return ApiError(403, "forbidden", reason)

    async def audit_denial(
        self, caller: Caller, scope: str | None, operation: str, reason: str, **metadata: Any
    ) -> None:
        """Write the ``unauthorized`` event of a refused operation (``metadata`` adds to it)."""
        event = AuditEvent(
            "unauthorized",
            scope=scope,
            success=False,
            actor=caller.actor,
            ip_address=caller.ip,
            user_agent=caller.user_agent,
            error_message=reason,
            metadata={"operation": operation, "via": "http", **metadata},
        )
        async with db.transaction(self.km.sessions) as session:
            await write_event(session, event)
