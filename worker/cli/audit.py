"""``keyrotor audit ...`` (the log) and ``keyrotor grant / revoke / grants`` (access control).

These commands need only ``DATABASE_URL``: reading the log or changing grants touches no key.
Changes (grant, revoke, prune) are recorded with the actor ``--as`` names (default
``KEYROTOR_DEFAULT_ACTOR``).
"""

from __future__ import annotations

import asyncio
import json
import signal
import sys
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime
from typing import Annotated, Any, TypeVar

import typer
from rich.markup import escape
from rich.table import Table
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from keyrotor.audit import checkpoint as checkpoints
from keyrotor.audit.grants import Grant, grant_access, list_grants, revoke_access
from keyrotor.audit.key import AuditKeyMismatch, load_keys
from keyrotor.audit.log import AuditQuery, check_actor, parse_time, query_events, tail_events
from keyrotor.audit.verify import ChainReport, parse_checkpoint, prune, verify_chain
from keyrotor.kek.factory import open_provider
from keyrotor.store import db
from keyrotor.worker.cli.common import (
    err_console,
    listen_error,
    out_console,
    print_json,
    progress,
    run,
    settings,
)

T = TypeVar("T")

app = typer.Typer(
    help="The audit log: tail, query, verify the hash chain, prune, serve.", no_args_is_help=True
)

JsonOpt = Annotated[bool, typer.Option("--json", help="print JSON for scripts")]
AsOpt = Annotated[
    str | None, typer.Option("--as", help="who makes the change (default: KEYROTOR_DEFAULT_ACTOR)")
]
TAIL_POLL_S = 1.0


def register(root: typer.Typer) -> None:
    """Add ``audit`` and the grant commands to the root command."""
    root.add_typer(app, name="audit")
    root.command("grant")(grant)
    root.command("revoke")(revoke)
    root.command("grants")(grants)


async def _with_sessions(fn: Callable[[async_sessionmaker[AsyncSession]], Awaitable[T]]) -> T:
    engine = db.create_engine(settings().database_url, pool_size=2, max_overflow=2)
    try:
        return await fn(db.sessionmaker(engine))
    finally:
        await engine.dispose()


def _actor(as_: str | None) -> str:
    return check_actor(as_ if as_ is not None else settings().default_actor)


def event_line(e: dict[str, Any]) -> str:
    """One audit event as the one-line text `audit tail` and `audit query` print."""
    when = datetime.fromisoformat(e["created_at"]).astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")
    parts = [when, f"#{e['id']}", f"{e['event_type']:<14}", e["scope"] or "-"]
    if e["key_version"] is not None:
        parts.append(f"v{e['key_version']}")
    parts.append(f"actor={e['actor'] or '-'}")
    if e["ip_address"]:
        parts.append(f"ip={e['ip_address']}")
    parts.append("ok" if e["success"] else f"FAILED: {e['error_message'] or ''}")
    if e["metadata"]:
        parts.append(json.dumps(e["metadata"], sort_keys=True))
    return " ".join(parts)


def _print_events(events: list[dict[str, Any]], json_lines: bool) -> None:
    for e in events:
        sys.stdout.write((json.dumps(e) if json_lines else event_line(e)) + "\n")
    sys.stdout.flush()


# --- audit ---------------------------------------------------------------------------------


@app.command("tail")
def tail(
    n: Annotated[int, typer.Option("-n", "--lines", min=1, max=10_000, help="how many recent events")] = 20,
    follow: Annotated[bool, typer.Option("-f", "--follow", help="keep printing new events")] = False,
    json_out: Annotated[bool, typer.Option("--json", help="one JSON object a line")] = False,
) -> None:
    """Print the newest events (and, with -f, new ones as they are written)."""

    async def go(sessions: async_sessionmaker[AsyncSession]) -> None:
        async with db.transaction(sessions) as session:
            events = await tail_events(session, n)
        _print_events(events, json_out)
        after = events[-1]["id"] if events else 0
        while follow:
            await asyncio.sleep(TAIL_POLL_S)
            async with db.transaction(sessions) as session:
                events = await query_events(session, AuditQuery(after_id=after, limit=1_000))
            _print_events(events, json_out)
            if events:
                after = events[-1]["id"]

    run(lambda: _with_sessions(go))


@app.command("query")
def query(
    event: Annotated[str | None, typer.Option("--event", help="event type, e.g. decrypt")] = None,
    scope: Annotated[str | None, typer.Option("--scope", help="a scope or a prefix like tenant-42/*")] = None,
    since: Annotated[str | None, typer.Option("--since", help="ISO date/time or age (7d, 12h)")] = None,
    until: Annotated[str | None, typer.Option("--until", help="ISO date/time or age, exclusive")] = None,
    actor: Annotated[str | None, typer.Option("--actor", help="who")] = None,
    limit: Annotated[int, typer.Option("--limit", help="at most this many (1-10000)")] = 100,
    after_id: Annotated[int, typer.Option("--after-id", help="page on: events after this id")] = 0,
    json_out: JsonOpt = False,
) -> None:
    """Events matching the filters, oldest first."""
    q = AuditQuery.parse(
        event=event, scope=scope, actor=actor, since=since, until=until, after_id=after_id, limit=limit
    )

    async def go(sessions: async_sessionmaker[AsyncSession]) -> list[dict[str, Any]]:
        async with db.transaction(sessions) as session:
            return await query_events(session, q)

    events = run(lambda: _with_sessions(go))
    if json_out:
        print_json({"events": events, "next_after_id": events[-1]["id"] if len(events) == q.limit else None})
    else:
        _print_events(events, False)
        err_console.print(f"{len(events)} event(s)")


@app.command("verify")
def verify(
    json_out: JsonOpt = False,
    checkpoint: Annotated[
        str | None,
        typer.Option("--checkpoint", help="ID:HASH of a head printed earlier; it must still be there"),
    ] = None,
    checkpoint_file: Annotated[
        str | None,
        typer.Option(
            "--checkpoint-file",
            help="a file of signed checkpoints (KEYROTOR_AUDIT_CHECKPOINT_FILE): its latest must verify "
            "and its head must still be in the chain",
        ),
    ] = None,
) -> None:
    """Walk the whole chain (keyed rows with the audit key, through the KEK); exit 1 naming the
    first row that was edited, deleted, moved or downgraded, or a checkpoint that does not hold."""
    cp = parse_checkpoint(checkpoint) if checkpoint else None
    signed = checkpoints.latest(checkpoint_file) if checkpoint_file else None

    async def go(sessions: async_sessionmaker[AsyncSession]) -> ChainReport:
        kek = await open_provider(settings())
        try:
            keys = await load_keys(sessions, kek)
        except AuditKeyMismatch as exc:  # a wrong KEK, or audit_keys altered: the check fails
            return ChainReport().fail(0, "edited", str(exc))
        finally:
            await kek.aclose()
        with progress(transient=True) as bar:
            task = bar.add_task("verifying the audit chain", total=None)
            advance: Callable[[int], None] = lambda k: bar.advance(task, k)  # noqa: E731
            if signed is not None:
                return await checkpoints.verify_against(sessions, keys, signed, on_progress=advance)
            return await verify_chain(sessions, keys=keys, checkpoint=cp, on_progress=advance)

    report = run(lambda: _with_sessions(go))
    if json_out:
        print_json(report.as_dict())
    elif report.ok:
        head = f"head {report.head_id}:{report.head_hash}" if report.head_id else "empty log"
        pruned = f", pruned before id {report.first_id} (anchored)" if report.anchored else ""
        used = f"; checkpoint {report.checkpoint}" if report.checkpoint else ""
        print(f"audit chain OK: {report.checked} rows ({report.keyed} keyed){pruned}; {head}{used}")
        if report.checked and report.switch_after is None and signed is None:
            # Every row unkeyed and no audit key: a log written before the key existed, or one whose
            # key a database writer deleted and whose rows it rewrote; only a checkpoint tells.
            err_console.print(
                "warning: no audit key and no keyed row: the chain alone cannot show that audit_keys "
                "was not deleted and the rows rewritten; check with --checkpoint-file"
            )
    else:
        print(f"audit chain BROKEN at row {report.bad_id} ({report.problem}): {report.detail}")
    if not report.ok:
        raise typer.Exit(1)


@app.command("prune")
def prune_cmd(
    before: Annotated[
        str, typer.Option("--before", help="delete events older than this (ISO date/time or age)")
    ],
    yes: Annotated[bool, typer.Option("--yes", "-y", help="do not ask for confirmation")] = False,
    as_: AsOpt = None,
    json_out: JsonOpt = False,
) -> None:
    """Delete old events; an `anchor` event records the pruned head so the chain still verifies."""
    when = parse_time(before)
    actor = _actor(as_)
    if not yes and sys.stdin.isatty():
        typer.confirm(f"delete audit events created before {when.isoformat()}?", abort=True)
    result = run(lambda: _with_sessions(lambda s: prune(s, when, actor=actor)))
    if json_out:
        print_json(result.__dict__)
    elif result.deleted:
        err_console.print(
            f"pruned {result.deleted} event(s) through id {result.through_id}; "
            f"anchor is id {result.anchor_id}"
        )
    else:
        err_console.print("nothing to prune")


@app.command("serve")
def serve(
    host: Annotated[str, typer.Option("--host", help="address to listen on")] = "127.0.0.1",
    port: Annotated[int, typer.Option("--port", min=1, max=65535, help="port to listen on")] = 8087,
) -> None:
    """Serve the read-only HTTP API (GET /audit/events, GET /audit/verify); needs KEYROTOR_AUDIT_API_TOKEN."""
    # Imported here: aiohttp takes about a third of a second to import, and only this command
    # serves HTTP, so every other command starts without it.
    from aiohttp import web

    from keyrotor.worker.audit_api import create_app

    application = create_app(settings())

    async def go() -> None:
        runner = web.AppRunner(application, access_log=None, handle_signals=False)
        await runner.setup()
        try:
            try:
                await web.TCPSite(runner, host, port).start()
            except OSError as exc:
                error = listen_error(host, port, exc)
                if error is None:
                    raise
                raise error from exc
            # Announced once the port is taken, so the line never promises a server that failed.
            err_console.print(f"audit API on http://{host}:{port}/audit/ (bearer token required)")
            stop = asyncio.Event()
            for sig in (signal.SIGTERM, signal.SIGINT):
                asyncio.get_running_loop().add_signal_handler(sig, stop.set)
            await stop.wait()
        finally:
            await runner.cleanup()

    run(go)


# --- grants --------------------------------------------------------------------------------


def grant(
    actor: Annotated[str, typer.Argument(help="an actor, or '*' for everyone")],
    scope: Annotated[str, typer.Argument(help="a scope, a prefix like tenant-42/*, or '*'")],
    encrypt: Annotated[bool, typer.Option("--encrypt", help="allow encrypting")] = False,
    decrypt: Annotated[bool, typer.Option("--decrypt", help="allow decrypting")] = False,
    as_: AsOpt = None,
    json_out: JsonOpt = False,
) -> None:
    """Allow ACTOR to encrypt and/or decrypt in SCOPE (permissions add up)."""
    by = _actor(as_)

    async def go(sessions: async_sessionmaker[AsyncSession]) -> Grant:
        async with db.transaction(sessions) as session:
            return await grant_access(session, actor, scope, encrypt=encrypt, decrypt=decrypt, by=by)

    g = run(lambda: _with_sessions(go))
    if json_out:
        print_json(g.as_dict())
    else:
        err_console.print(f"granted: {_describe(g)}")


def revoke(
    actor: Annotated[str, typer.Argument(help="the actor as granted ('*' for the wildcard)")],
    scope: Annotated[str, typer.Argument(help="the scope pattern exactly as granted")],
    encrypt: Annotated[bool, typer.Option("--encrypt", help="only take away encrypting")] = False,
    decrypt: Annotated[bool, typer.Option("--decrypt", help="only take away decrypting")] = False,
    as_: AsOpt = None,
) -> None:
    """Remove ACTOR's grant on SCOPE (or only --encrypt / --decrypt of it)."""
    by = _actor(as_)

    async def go(sessions: async_sessionmaker[AsyncSession]) -> Grant | None:
        async with db.transaction(sessions) as session:
            return await revoke_access(session, actor, scope, encrypt=encrypt, decrypt=decrypt, by=by)

    left = run(lambda: _with_sessions(go))
    err_console.print(
        f"revoked; left: {_describe(left)}" if left else f"revoked {escape(actor)} on {escape(scope)}"
    )


def grants(json_out: JsonOpt = False) -> None:
    """List the grants."""

    async def go(sessions: async_sessionmaker[AsyncSession]) -> list[Grant]:
        async with db.transaction(sessions) as session:
            return await list_grants(session)

    rows = run(lambda: _with_sessions(go))
    if json_out:
        print_json({"grants": [g.as_dict() for g in rows]})
        return
    if not rows:
        err_console.print("no grants: every KeyManager call is denied")
        return
    table = Table(title="keyrotor grants")
    for col in ("actor", "scope", "encrypt", "decrypt", "since"):
        table.add_column(col)
    for g in rows:
        table.add_row(
            escape(g.actor),
            escape(g.scope),
            "yes" if g.can_encrypt else "-",
            "yes" if g.can_decrypt else "-",
            g.created_at.isoformat()[:19] if g.created_at else "-",
        )
    out_console.print(table)


def _describe(g: Grant) -> str:
    perms = "+".join(p for p, on in (("encrypt", g.can_encrypt), ("decrypt", g.can_decrypt)) if on)
    # Escaped: an actor is any printable text, and the console would read brackets as markup.
    return f"{escape(g.actor)} on {escape(g.scope)}: {perms}"
