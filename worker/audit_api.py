"""The read-only HTTP API of the audit log (aiohttp).

    GET /audit/events?event=&scope=&actor=&since=&until=&limit=&after_id=
        {"events": [...], "next_after_id": <id of the last event, or null when the page is short>}
    GET /audit/verify
        the chain report of ``keyrotor.audit.verify.verify_chain`` ({"ok": true, ...}); keyed
        rows are checked with the audit key, so the server opens the KEK provider

Every request needs ``Authorization: Bearer <KEYROTOR_AUDIT_API_TOKEN>`` (compared in
constant time); the app refuses to be built without a token. Bad parameters give 400 with
``{"error": "..."}``. Run it with ``keyrotor audit serve``, or mount the app built by
:func:`create_app` into another aiohttp server (``prefix=""`` and ``add_subapp("/audit", ...)``).
"""

from __future__ import annotations

import asyncio
import functools
import hmac
from collections.abc import AsyncIterator, Awaitable, Callable

from aiohttp import web
from aiohttp.typedefs import Middleware
from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession, async_sessionmaker

from keyrotor.audit.key import load_keys
from keyrotor.audit.log import AuditQuery, query_events
from keyrotor.audit.verify import verify_chain
from keyrotor.errors import ConfigurationError, InvalidInput, KeyrotorError, TransientError
from keyrotor.kek.base import KekProvider
from keyrotor.kek.factory import open_provider
from keyrotor.settings import Settings
from keyrotor.store import db

MIN_TOKEN_CHARS = 16
MAX_PAGE = 1_000

_SESSIONS = web.AppKey("sessions", async_sessionmaker[AsyncSession])
_VERIFY_LOCK = web.AppKey("verify_lock", asyncio.Lock)
_KEK = web.AppKey("kek", KekProvider)

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def create_app(
    settings: Settings, *, engine: AsyncEngine | None = None, prefix: str = "/audit"
) -> web.Application:
    """The audit API application.

    Args:
        settings: ``KEYROTOR_AUDIT_API_TOKEN`` and ``DATABASE_URL`` are used.
        engine: an engine to share (not disposed by the app); by default the app makes one.
        prefix: the path the routes live under.

    Raises:
        ConfigurationError: no token, or one shorter than 16 characters.
    """
    app = web.Application(middlewares=[_authenticator(_token(settings)), _typed_errors])
    app[_VERIFY_LOCK] = asyncio.Lock()
    app.cleanup_ctx.append(functools.partial(_resources, settings, engine))
    app.router.add_get(f"{prefix}/events", _events)
    app.router.add_get(f"{prefix}/verify", _verify)
    return app


def _token(settings: Settings) -> str:
    token = settings.audit_api_token.get_secret_value() if settings.audit_api_token else ""
    if len(token) < MIN_TOKEN_CHARS:
        raise ConfigurationError(
            f"the audit API needs KEYROTOR_AUDIT_API_TOKEN (at least {MIN_TOKEN_CHARS} characters); "
            "refusing to serve the audit log without authentication"
        )
    return token


def _authenticator(token: str) -> Middleware:
    """A middleware refusing (401) every request without ``Authorization: Bearer <token>``."""
    expected = f"Bearer {token}".encode()

    @web.middleware
    async def authenticate(request: web.Request, handler: Handler) -> web.StreamResponse:
        given = request.headers.get("Authorization", "").encode("utf-8", "surrogateescape")
        if not hmac.compare_digest(given, expected):
            return web.json_response(
                {"error": "missing or wrong bearer token"},
                status=401,
                headers={"WWW-Authenticate": 'Bearer realm="keyrotor-audit"'},
            )
        return await handler(request)

    return authenticate


@web.middleware
async def _typed_errors(request: web.Request, handler: Handler) -> web.StreamResponse:
    try:
        return await handler(request)
    except InvalidInput as exc:
        return web.json_response({"error": str(exc)}, status=400)
    except TransientError as exc:
        return web.json_response({"error": str(exc)}, status=503)
    except KeyrotorError as exc:
        return web.json_response({"error": str(exc)}, status=500)


async def _resources(
    settings: Settings, engine: AsyncEngine | None, app: web.Application
) -> AsyncIterator[None]:
    """The app's sessions and KEK provider while it runs; an engine of its own unless given one."""
    own = engine is None
    eng = db.create_engine(settings.database_url) if engine is None else engine
    app[_SESSIONS] = db.sessionmaker(eng)
    app[_KEK] = await open_provider(settings)
    try:
        yield
    finally:
        await app[_KEK].aclose()
        if own:
            await eng.dispose()


async def _events(request: web.Request) -> web.Response:
    q = request.query
    unknown = set(q) - {"event", "scope", "actor", "since", "until", "limit", "after_id"}
    if unknown:
        raise InvalidInput(f"unknown parameter(s): {', '.join(sorted(unknown))[:200]}")
    query = AuditQuery.parse(
        event=q.get("event"),
        scope=q.get("scope"),
        actor=q.get("actor"),
        since=q.get("since"),
        until=q.get("until"),
        after_id=q.get("after_id"),
        limit=q.get("limit"),
    )
    if query.limit > MAX_PAGE:
        raise InvalidInput(f"limit must be between 1 and {MAX_PAGE}")
    async with db.transaction(request.app[_SESSIONS]) as session:
        events = await query_events(session, query)
    next_after = events[-1]["id"] if len(events) == query.limit else None
    return web.json_response({"events": events, "next_after_id": next_after})


async def _verify(request: web.Request) -> web.Response:
    # One walk at a time: it reads the whole table.
    async with request.app[_VERIFY_LOCK]:
        sessions = request.app[_SESSIONS]
        keys = await load_keys(sessions, request.app[_KEK])
        report = await verify_chain(sessions, keys=keys)
    return web.json_response(report.as_dict())
