"""The operations endpoint of the worker and the scheduler: ``/metrics``, ``/healthz``, ``/readyz``.

A small aiohttp server on ``KEYROTOR_METRICS_HOST:KEYROTOR_METRICS_PORT`` (default
``127.0.0.1:9108``; port 0 disables it), inside the process's own event loop:

- ``/metrics``: prometheus_client's default registry (the library's metrics, the KEK provider's,
  the audit queue's) plus the arq queue depth, read from Redis at scrape time.
- ``/healthz``: the process is alive and its event loop responsive (a ticker runs every second;
  a lag above :data:`MAX_LOOP_LAG_S` answers 503). Kubernetes restarts on failure.
- ``/readyz``: the process can do its work: Postgres and Redis answer, and (worker) the KEK
  provider's ``check()`` passed within ``KEYROTOR_KEK_CHECK_TTL_SECONDS`` (cached, at most 30 s,
  so probes do not hammer a KMS). A scheduler is ready as leader or as standby; its role is
  reported, not judged. The body is JSON naming each check; errors name the class only.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from collections.abc import Awaitable, Callable
from typing import Any

import structlog
from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, REGISTRY, Counter, Gauge, generate_latest

# Registered on import: a scrape shows every family (at zero) even before first use, e.g. the
# KEK provider metrics of a process on the local keyring, which never calls a remote KEK.
import keyrotor.audit.writer
import keyrotor.kek.metrics
import keyrotor.metrics  # noqa: F401

log = structlog.get_logger("keyrotor.http")

METRICS_PATH, HEALTHZ_PATH, READYZ_PATH = "/metrics", "/healthz", "/readyz"
PATHS = (METRICS_PATH, HEALTHZ_PATH, READYZ_PATH)
MAX_LOOP_LAG_S = 5.0
CHECK_TIMEOUT_S = 3.0
# How long stop() lets requests in flight finish, then again after cancelling them (aiohttp's
# default, 60 s, would outlast a stopping worker's whole grace; a scrape is worth no wait).
OPS_SHUTDOWN_TIMEOUT_S = 1.0

ARQ_QUEUE_DEPTH = Gauge(
    "keyrotor_arq_queue_depth", "Jobs waiting in the arq queue (read at scrape).", ["queue"]
)
ARQ_JOBS = Counter(
    "keyrotor_arq_jobs_total",
    "arq jobs run by this worker, by function and outcome (success, retry, failed, cancelled).",
    ["function", "outcome"],
)

Check = Callable[[], Awaitable[Any]]


class CheckFailed(RuntimeError):
    """A check's failure whose text is safe to show: the class name of the error it met."""


class KekCheckCache:
    """``kek.check()`` at most once per ``ttl_s``; remembers the last outcome.

    A failure raises :class:`CheckFailed` naming the class of the error (remembered as text, so
    a provider's message never outlives the call).
    """

    def __init__(self, check: Check, ttl_s: float) -> None:
        self._check = check
        self._ttl_s = ttl_s
        self._at = -float("inf")
        self._error: str | None = None
        self._lock = asyncio.Lock()

    async def __call__(self) -> str:
        async with self._lock:
            if time.monotonic() - self._at >= self._ttl_s:
                try:
                    await asyncio.wait_for(self._check(), CHECK_TIMEOUT_S)
                    self._error = None
                except Exception as exc:
                    self._error = type(exc).__name__
                self._at = time.monotonic()
        if self._error is not None:
            raise CheckFailed(self._error)
        return "ok"


class OpsServer:
    """``/metrics``, ``/healthz`` and ``/readyz`` for one process.

    Args:
        role: ``worker`` or ``scheduler`` (reported in the bodies).
        checks: name -> coroutine function; each must finish within :data:`CHECK_TIMEOUT_S`
            and raise on failure; a returned string is reported as the check's detail.
        info: extra fields for ``/readyz`` (e.g. the scheduler's leader/standby role).
        before_scrape: refreshes gauges that are read on demand (the arq queue depth).
    """

    def __init__(
        self,
        *,
        role: str,
        host: str,
        port: int,
        checks: dict[str, Check],
        info: Callable[[], dict[str, Any]] | None = None,
        before_scrape: Check | None = None,
    ) -> None:
        self.role = role
        self.host = host
        self.port = port
        self.checks = checks
        self.info = info
        self.before_scrape = before_scrape
        self._runner: web.AppRunner | None = None
        self._ticker: asyncio.Task[None] | None = None
        self._last_tick = time.monotonic()

    async def start(self) -> bool:
        """Listen; returns False (logged as an error) if the port cannot be bound."""
        app = web.Application()
        handlers = {METRICS_PATH: self._metrics, HEALTHZ_PATH: self._healthz, READYZ_PATH: self._readyz}
        for path, handler in handlers.items():
            app.router.add_get(path, handler)
        self._runner = web.AppRunner(app, access_log=None, shutdown_timeout=OPS_SHUTDOWN_TIMEOUT_S)
        await self._runner.setup()
        site = web.TCPSite(self._runner, self.host, self.port, reuse_address=True)
        try:
            await site.start()
        except OSError as exc:
            # The process's work matters more than its metrics: say so loudly and carry on
            # (a probe against this port then fails, which is the visible symptom).
            log.error("ops_server_unavailable", role=self.role, port=self.port, error=f"{type(exc).__name__}")
            await self._runner.cleanup()
            self._runner = None
            return False
        self._ticker = asyncio.get_running_loop().create_task(self._tick(), name="keyrotor-http-ticker")
        log.info("ops_server_started", role=self.role, port=self.port)
        return True

    async def stop(self) -> None:
        """Stop listening; requests in flight are cancelled after ``OPS_SHUTDOWN_TIMEOUT_S``
        (the whole stop takes at most twice that)."""
        if self._ticker is not None:
            self._ticker.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._ticker
            self._ticker = None
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    async def _tick(self) -> None:
        while True:
            self._last_tick = time.monotonic()
            await asyncio.sleep(1.0)

    async def _metrics(self, request: web.Request) -> web.Response:
        if self.before_scrape is not None:
            try:
                await asyncio.wait_for(self.before_scrape(), CHECK_TIMEOUT_S)
            except Exception as exc:  # a scrape still answers with what it has
                log.debug("scrape_refresh_failed", error=type(exc).__name__)
        body = generate_latest(REGISTRY)
        return web.Response(body=body, headers={"Content-Type": CONTENT_TYPE_LATEST})

    async def _healthz(self, request: web.Request) -> web.Response:
        lag = time.monotonic() - self._last_tick
        ok = lag < MAX_LOOP_LAG_S
        return _json(
            {"status": "ok" if ok else "stalled", "role": self.role, "loop_lag_s": round(lag, 3)}, ok
        )

    async def _readyz(self, request: web.Request) -> web.Response:
        results = await run_checks(self.checks)
        ok = all(r["ok"] for r in results.values())
        body: dict[str, Any] = {
            "status": "ready" if ok else "not_ready",
            "role": self.role,
            "checks": results,
        }
        if self.info is not None:
            body.update(self.info())
        return _json(body, ok)


async def run_checks(checks: dict[str, Check]) -> dict[str, dict[str, Any]]:
    """Run the checks concurrently, each bounded by :data:`CHECK_TIMEOUT_S`."""

    async def one(check: Check) -> dict[str, Any]:
        try:
            detail = await asyncio.wait_for(check(), CHECK_TIMEOUT_S)
        except TimeoutError:
            return {"ok": False, "error": "timeout"}
        except Exception as exc:
            # Class names only: a driver's message may quote a URL with its password. A RuntimeError
            # of a driver is no exception; only CheckFailed's text is a class name already.
            return {"ok": False, "error": str(exc) if isinstance(exc, CheckFailed) else type(exc).__name__}
        return {"ok": True, **({"detail": detail} if isinstance(detail, str) else {})}

    names = list(checks)
    outcomes = await asyncio.gather(*(one(checks[n]) for n in names))
    return dict(zip(names, outcomes, strict=True))


def _json(body: dict[str, Any], ok: bool) -> web.Response:
    return web.Response(
        text=json.dumps(body, default=str), status=200 if ok else 503, content_type="application/json"
    )


def count_job(function: str, outcome: str) -> None:
    """Count one arq job outcome of this worker."""
    ARQ_JOBS.labels(function, outcome).inc()


def queue_depth_refresher(redis: Any, queue_name: str) -> Check:
    """A ``before_scrape`` that reads the arq queue's length (a sorted set) into the gauge."""

    async def refresh() -> None:
        ARQ_QUEUE_DEPTH.labels(queue_name).set(await redis.zcard(queue_name))

    return refresh
