"""``keyrotor health [--json]``: is the deployment able to rotate keys? Exit 0 if so, 1 if not.

Checks, each bounded by a timeout and reported with its own status:

- ``postgres``: reachable, and the schema is at the migrations' head;
- ``redis``: reachable;
- ``kek``: the KEK provider's ``check()`` (a probe round trip), then one stored DEK per KEK id
  and version unwrapped with it, as a worker does at start-up: the probe passes with any valid
  key, so only a stored DEK tells a wrong ``ENCRYPTION_KEY`` (``KekMismatch``);
- ``worker``: a worker has written arq's ``<queue>:health-check`` key lately (it expires ~31 s
  after the last write);
- ``scheduler``: a scheduler leads (its heartbeat ``KEYROTOR_SCHEDULER_LEADER_KEY`` is set), or
  one that stopped cleanly is handing over to a standby (it marked the key, for one scan interval);
- ``replicas``: every secondary region's last replica check (``kek_replicas``) says
  ``in_sync`` and is no older than two check intervals; ``not_configured`` without
  ``KEYROTOR_REGIONS`` (neither green nor red).
- ``census``: ``warn`` (not a failure) while values of a DEK version that is not destroyed were
  sealed for a location that no registered column covers and no operator acknowledged
  (``keyrotor columns list``): that version is never destroyed until it is registered or ignored.
- ``grants``: ``warn`` (not a failure) while the open default grant ``* *`` is in place
  (``keyrotor lock-down`` replaces it with named grants).

Errors name the failure's class (and for our own typed errors their message), never a key or
a URL's credentials: the database and Redis URLs are not shown at all, and a KEK provider's own
errors name its address without any ``user:password@`` part (``vault (https://vault:8200)``).
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime, timedelta
from typing import Annotated, Any, TypeVar

import redis.asyncio as aioredis
import typer
from rich.table import Table
from sqlalchemy.ext.asyncio import AsyncSession

from keyrotor.audit import lockdown
from keyrotor.census import report as census
from keyrotor.errors import KeyrotorError
from keyrotor.kek.factory import open_provider
from keyrotor.replication import check as replication
from keyrotor.rotation.context import RotationContext
from keyrotor.settings import Settings
from keyrotor.store import db, ops
from keyrotor.worker.cli.common import database_hint, out_console, print_json, run
from keyrotor.worker.leadership import STEPPING_DOWN

T = TypeVar("T")

TIMEOUT_S = 5.0
HEALTH_CHECK_SUFFIX = ":health-check"  # arq.constants.health_check_key_suffix

Result = dict[str, Any]


def register(app: typer.Typer) -> None:
    app.command("health")(health)


def _error(exc: BaseException) -> str:
    if isinstance(exc, TimeoutError):
        return f"timed out after {TIMEOUT_S:g}s"
    # No database or no schema: the command that fixes it, as every other command says it.
    fix = database_hint(exc)
    if fix is not None:
        return fix
    if isinstance(exc, KeyrotorError):
        return f"{type(exc).__name__}: {exc}"
    return type(exc).__name__


async def _bounded(fn: Callable[[], Awaitable[Result]]) -> Result:
    try:
        return await asyncio.wait_for(fn(), TIMEOUT_S)
    except Exception as exc:
        return {"status": "fail", "error": _error(exc)}


async def collect(settings: Settings) -> dict[str, Result]:
    """Run every check concurrently. Each result has ``status``: ``ok``, ``fail``, ``warn`` or
    ``not_configured``, and a ``detail`` or an ``error``."""
    redis: Any = aioredis.from_url(  # type: ignore[no-untyped-call]
        settings.redis_url, socket_connect_timeout=2, socket_timeout=2, retry_on_timeout=False
    )
    checks: dict[str, Callable[[], Awaitable[Result]]] = {
        "postgres": lambda: postgres_health(settings),
        "redis": lambda: redis_health(redis),
        "kek": lambda: kek_health(settings),
        "worker": lambda: worker_health(settings, redis),
        "scheduler": lambda: scheduler_health(settings, redis),
        "replicas": lambda: replica_health(settings),
        "census": lambda: census_health(settings),
        "grants": lambda: grants_health(settings),
    }
    try:
        results = await asyncio.gather(*(_bounded(fn) for fn in checks.values()))
    finally:
        await redis.aclose()
    return dict(zip(checks, results, strict=True))


async def postgres_health(settings: Settings) -> Result:
    """The ``postgres`` check: reachable, and the schema at the migrations' head."""
    engine = db.create_engine(settings.database_url, pool_size=1)
    try:
        async with engine.connect() as conn:
            await ops.ping(conn)
        missing = db.head_revisions() - await db.current_revisions(engine)
    finally:
        await engine.dispose()
    if missing:
        return {"status": "fail", "error": "schema not up to date: run `keyrotor db upgrade`"}
    return {"status": "ok", "detail": "reachable, schema up to date"}


async def redis_health(redis: Any) -> Result:
    """The ``redis`` check: it answers a ping."""
    await redis.ping()
    return {"status": "ok", "detail": "reachable"}


async def kek_health(settings: Settings) -> Result:
    """The ``kek`` check: the provider's probe round trip, then the stored DEKs it must unwrap."""
    provider = await open_provider(settings)
    engine = db.create_engine(settings.database_url, pool_size=1)
    try:
        await provider.check()
        checked = await RotationContext(db.sessionmaker(engine), provider, settings).check_kek()
    finally:
        await provider.aclose()
        await engine.dispose()
    return {
        "status": "ok",
        "detail": f"{provider.name}: probe round trip ok, {checked} stored DEK(s) unwrapped "
        "(one per KEK id and version)",
    }


async def worker_health(settings: Settings, redis: Any) -> Result:
    """The ``worker`` check: a worker wrote arq's health-check key lately."""
    key = settings.queue_name + HEALTH_CHECK_SUFFIX
    value = await redis.get(key)
    if value is None:
        return {"status": "fail", "error": f"no worker has reported lately ({key} is not set)"}
    return {"status": "ok", "detail": value.decode(errors="replace")}


async def scheduler_health(settings: Settings, redis: Any) -> Result:
    """The ``scheduler`` check: a scheduler leads (its heartbeat key is set), or one that stopped
    cleanly is handing over (an orderly handover is no failure; the mark expires if nobody takes over)."""
    value = await redis.get(settings.scheduler_leader_key)
    if value is None:
        return {"status": "fail", "error": "no scheduler leads (its heartbeat key is not set)"}
    name = value.decode(errors="replace")
    if name.endswith(STEPPING_DOWN):
        return {"status": "ok", "detail": f"handing over: leader {name.removesuffix(STEPPING_DOWN)} stopped"}
    return {"status": "ok", "detail": f"leader {name}"}


async def replica_health(settings: Settings) -> Result:
    """The ``replicas`` check: ok when every region's last check was in sync and recent."""
    configured = [r.name for r in replication.parse_regions(settings)]
    if not configured:
        return {"status": "not_configured", "detail": "no secondary regions (KEYROTOR_REGIONS)"}
    engine = db.create_engine(settings.database_url, pool_size=1)
    try:
        stored = replication.merge_status(
            configured, await replication.stored_status(db.sessionmaker(engine))
        )
    finally:
        await engine.dispose()
    oldest = datetime.now(UTC) - timedelta(seconds=2 * settings.replica_check_interval_s)
    bad = [
        f"{r['region']}: {r['status']}"
        for r in stored
        if r["status"] != "in_sync" or datetime.fromisoformat(r["checked_at"]) < oldest
    ]
    summary = ", ".join(f"{r['region']} {r['status']}" for r in stored)
    if bad:
        return {"status": "fail", "error": "not in sync or not checked lately: " + "; ".join(bad)}
    return {"status": "ok", "detail": summary}


async def _read(settings: Settings, query: Callable[[AsyncSession], Awaitable[T]]) -> T:
    """One read of a check, in a transaction on an engine of its own (closed after)."""
    engine = db.create_engine(settings.database_url, pool_size=1)
    try:
        async with db.transaction(db.sessionmaker(engine)) as session:
            return await query(session)
    finally:
        await engine.dispose()


async def census_health(settings: Settings) -> Result:
    """The ``census`` check: ``warn`` while an unregistered location holds values of a live version."""
    found = await _read(settings, census.unregistered_locations)
    if found:
        return {"status": "warn", "error": census.advice(found)}
    return {"status": "ok", "detail": "every location is registered, keyrotor's own or acknowledged"}


async def grants_health(settings: Settings) -> Result:
    """The ``grants`` check: ``warn`` while the open default grant ``* *`` is in place."""
    still_open = await _read(settings, lockdown.wildcard_grant)
    if still_open:
        return {"status": "warn", "error": lockdown.OPEN_GRANT_WARNING}
    return {"status": "ok", "detail": "no wildcard grant: only named actors may encrypt or decrypt"}


def healthy(results: dict[str, Result]) -> bool:
    """Green when no check failed (``warn`` and ``not_configured`` are not failures)."""
    return all(r["status"] != "fail" for r in results.values())


def health(json_out: Annotated[bool, typer.Option("--json", help="print JSON for scripts")] = False) -> None:
    """Check Postgres, Redis, the KEK provider, workers, the scheduler and replicas; exit 1 if any fails."""
    settings = Settings.from_env()

    async def go() -> dict[str, Result]:
        return await collect(settings)

    results = run(go)
    ok = healthy(results)
    if json_out:
        print_json({"healthy": ok, "checks": results})
    else:
        table = Table(
            title="keyrotor health: " + ("[green]healthy[/green]" if ok else "[red]UNHEALTHY[/red]")
        )
        for col in ("check", "status", "detail"):
            table.add_column(col)
        colour = {"ok": "green", "fail": "red", "warn": "yellow", "not_configured": "yellow"}
        for name, r in results.items():
            status = r["status"]
            table.add_row(
                name, f"[{colour[status]}]{status}[/{colour[status]}]", r.get("detail") or r.get("error", "")
            )
        out_console.print(table)
    if not ok:
        raise typer.Exit(1)
