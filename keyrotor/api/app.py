"""``keyrotor serve``: keyrotor's HTTP API on aiohttp.

Every route but ``/v1/health`` and ``/v1/openapi.json`` needs ``Authorization: Bearer <token>``
(``keyrotor tokens create``); the token names the actor every call acts as, and that actor's
grants decide each scope. Errors are ``{"error": {"code", "message"}}``. Several processes can
serve one database behind a load balancer: they share nothing but Postgres and Redis (each has
its own rate-limit buckets and token cache).

Nothing secret is logged: one line a request (at DEBUG) names the route template, the status,
the actor and the duration; never a token, a value or a body.
"""

from __future__ import annotations

import asyncio
import logging
import signal
import ssl
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import structlog
from aiohttp import web
from prometheus_client import Counter

from keyrotor.api import errors, openapi, routes
from keyrotor.api.limits import RateLimiter, client_ip, client_key, parse_proxies
from keyrotor.api.routes import CALLER, SERVICE
from keyrotor.api.service import Service
from keyrotor.api.tokens import TokenVerifier
from keyrotor.errors import ConfigurationError, KeyrotorError
from keyrotor.keys import KeyManager
from keyrotor.queue.client import KeyrotorClient
from keyrotor.settings import Settings

log = structlog.get_logger("keyrotor.api")
_debug_log = logging.getLogger("keyrotor.api")  # where structlog's lines go: its level decides

PUBLIC = frozenset({"/v1/health", openapi.PATH})
API_REQUESTS = Counter(
    "keyrotor_api_requests_total",
    "Requests to keyrotor serve, by route template and status (no scope, actor or token).",
    ["route", "status"],
)

Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def _route(request: web.Request) -> str:
    info = request.match_info
    resource = info.route.resource if info.http_exception is None else None
    return resource.canonical if resource is not None else "(unmatched)"


class _Requests:
    """``keyrotor_api_requests_total``'s children by (route, status), looked up once each."""

    def __init__(self) -> None:
        self._children: dict[tuple[str, int], Any] = {}

    def inc(self, route: str, status: int) -> None:
        child = self._children.get((route, status))
        if child is None:
            child = self._children[(route, status)] = API_REQUESTS.labels(route, str(status))
        child.inc()


_requests = _Requests()


@web.middleware
async def handle(request: web.Request, handler: Handler) -> web.StreamResponse:
    """The one middleware: authentication, then the handler, its errors as JSON, the counter."""
    started = time.perf_counter()
    try:
        if request.path in PUBLIC and request.method in ("GET", "HEAD"):  # a balancer may probe with HEAD
            response = await handler(request)
        else:
            await _authenticate(request)
            response = await handler(request)
    except errors.ApiError as exc:
        response = errors.response(exc)
    except KeyrotorError as exc:
        response = errors.response(errors.from_keyrotor(exc))
    except web.HTTPException as exc:
        code = errors.HTTP_CODES.get(exc.status, "http_error")
        response = errors.response(errors.ApiError(exc.status, code, exc.reason))
    except asyncio.CancelledError:
        raise
    except Exception as exc:
        # The type only: an exception's text may quote the request.
        log.error("api_error", route=_route(request), error=type(exc).__name__)
        response = errors.response(errors.ApiError(500, "internal_error", "internal error"))
    route = _route(request)
    _requests.inc(route, response.status)
    # DEBUG only, and only built when enabled: a line a request costs about as much as the
    # decrypt it reports; the counter above and the audit log keep the record.
    if _debug_log.isEnabledFor(logging.DEBUG):
        caller = request.get(CALLER)
        log.debug(
            "api_request",
            method=request.method,
            route=route,
            status=response.status,
            actor=caller.actor if caller is not None else None,
            ms=round((time.perf_counter() - started) * 1000, 2),
        )
    return response


async def _authenticate(request: web.Request) -> None:
    svc = request.app[SERVICE]
    # The client's address (through trusted proxies), so one bad client behind a balancer does
    # not lock out the others.
    # Every X-Forwarded-For line, in order: a proxy may add a line of its own after the client's
    # (HAProxy does), and the lines are one list (RFC 9110, 5.3); the first line alone would be
    # the client's to write.
    forwarded = request.headers.getall("X-Forwarded-For", ())
    ip = client_ip(request.remote, ",".join(forwarded) if forwarded else None, svc.proxies)
    peer = client_key(ip)
    if not svc.auth_failures.available(peer):
        raise errors.ApiError(
            429, "rate_limited", "too many failed authentications from this address; retry later",
            headers={"Retry-After": "5"},
        )  # fmt: skip
    scheme, _, token = request.headers.get("Authorization", "").partition(" ")
    bearer = await svc.verifier.verify(token.strip()) if scheme.lower() == "bearer" else None
    if bearer is None:
        svc.auth_failures.take(peer)
        raise errors.ApiError(
            401,
            "unauthenticated",
            "a valid bearer token is required (missing, unknown, expired or revoked)",
            headers={"WWW-Authenticate": 'Bearer realm="keyrotor"'},
        )
    caller = svc.caller(request, bearer, ip)
    request[CALLER] = caller
    svc.spend(caller, 1)


def check_tls(settings: Settings) -> ssl.SSLContext | None:
    """The TLS context of ``KEYROTOR_API_TLS_CERT``/``KEY`` (both or neither).

    Raises:
        ConfigurationError: only one is set, or they cannot be loaded.
    """
    cert, key = settings.api_tls_cert, settings.api_tls_key
    if not cert and not key:
        return None
    if not cert or not key:
        raise ConfigurationError("set both KEYROTOR_API_TLS_CERT and KEYROTOR_API_TLS_KEY, or neither")
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.minimum_version = ssl.TLSVersion.TLSv1_2
    try:
        context.load_cert_chain(cert, key)
    except (OSError, ssl.SSLError) as exc:
        raise ConfigurationError(
            f"cannot load the API's TLS certificate or key: {type(exc).__name__}"
        ) from None
    return context


def create_app(
    settings: Settings, *, km: KeyManager | None = None, client: KeyrotorClient | None = None
) -> web.Application:
    """The API application. ``km`` and ``client`` are opened and closed by the caller when given;
    by default the app opens its own with ``settings``.

    Raises:
        ConfigurationError: bad ``KEYROTOR_API_TRUSTED_PROXIES``.
    """
    proxies = parse_proxies(settings.api_trusted_proxies)
    app = web.Application(middlewares=[handle], client_max_size=settings.api_max_body_bytes)

    async def lifecycle(app: web.Application) -> AsyncIterator[None]:
        manager = km if km is not None else KeyManager(settings)
        if km is None:
            await manager.open()
        svc = Service(
            settings=settings,
            km=manager,
            verifier=TokenVerifier(manager.sessions, ttl_s=settings.api_token_cache_s),
            limiter=RateLimiter(settings.api_rate_per_second, settings.api_rate_burst),
            proxies=proxies,
            client=client,
            owns_client=client is None,
        )
        app[SERVICE] = svc
        try:
            yield
        finally:
            await svc.aclose()
            if km is None:
                await manager.close()

    app.cleanup_ctx.append(lifecycle)
    routes.add_routes(app)
    openapi.add_route(app)
    return app


async def serve(
    settings: Settings,
    *,
    host: str,
    port: int,
    ready: Callable[[str], None] | None = None,
    reuse_port: bool = False,
) -> None:
    """Serve until SIGTERM or SIGINT. ``reuse_port``: bind with ``SO_REUSEPORT``, so several
    processes share the port and the kernel spreads connections over them (``--workers``)."""
    tls = check_tls(settings)
    runner = web.AppRunner(create_app(settings), access_log=None, handle_signals=False)
    await runner.setup()
    try:
        site = web.TCPSite(
            runner, host, port, ssl_context=tls, reuse_address=True, reuse_port=reuse_port or None
        )
        await site.start()
        scheme = "https" if tls else "http"
        bound = runner.addresses[0][1] if runner.addresses else port
        if ready is not None:
            ready(f"{scheme}://{host}:{bound}/v1/")
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, stop.set)
        await stop.wait()
    finally:
        await runner.cleanup()
