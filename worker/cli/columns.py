"""``keyrotor columns register|list|unregister|ignore|unignore``: application-owned ciphertext
columns, and every location where values were sealed (keyrotor.census.report)."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Annotated, TypeVar, cast

import typer
from rich.markup import escape
from rich.table import Table
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from keyrotor.audit.log import check_actor
from keyrotor.census import columns
from keyrotor.census import report as census
from keyrotor.census.locations import EVERY_SCOPE, display
from keyrotor.store import db
from keyrotor.worker.cli.common import err_console, out_console, print_json, run, settings

T = TypeVar("T")

app = typer.Typer(help="Application-owned kr1 columns that rotation, retirement and verify cover.")

JsonOpt = Annotated[bool, typer.Option("--json", help="print JSON for scripts")]
AsOpt = Annotated[
    str | None, typer.Option("--as", help="who makes the change (default: KEYROTOR_DEFAULT_ACTOR)")
]


async def _with_sessions(fn: Callable[[async_sessionmaker[AsyncSession]], Awaitable[T]]) -> T:
    engine = db.create_engine(settings().database_url, pool_size=1)
    try:
        return await fn(db.sessionmaker(engine))
    finally:
        await engine.dispose()


@app.command("register")
def register(
    column: Annotated[str, typer.Argument(help="TABLE.COLUMN (or SCHEMA.TABLE.COLUMN)")],
    pk: Annotated[str, typer.Option("--pk", help="the table's unique integer key column")],
    scope_column: Annotated[
        str | None, typer.Option("--scope-column", help="a text column naming each row's scope")
    ] = None,
    scope: Annotated[str | None, typer.Option("--scope", help="the one scope of every row")] = None,
    context_template: Annotated[
        str | None,
        typer.Option("--context-template", help="AAD context with {pk}; default TABLE.COLUMN:{pk}"),
    ] = None,
    create_index: Annotated[
        bool, typer.Option("--create-index", help="also create the recommended expression index")
    ] = False,
    as_: AsOpt = None,
    json_out: JsonOpt = False,
) -> None:
    """Register a column of kr1 values; every rotation, retirement and verify then covers it
    (a ``config_change`` audit event)."""
    actor = check_actor(as_ if as_ is not None else settings().default_actor)
    col: columns.ManagedColumn = run(
        lambda: _with_sessions(
            lambda s: columns.register(
                s,
                column,
                pk=pk,
                scope_column=scope_column,
                scope=scope,
                context_template=context_template,
                create_index=create_index,
                actor=actor,
            )
        )
    )
    if json_out:
        print_json(col.as_dict())
        return
    err_console.print(f"registered {col.name} (key {col.pk_column}, context {col.context_template!r})")
    if not create_index:
        err_console.print(
            "recommended, so rotation finds a version's rows by index (run it, or pass --create-index):\n"
            f"  {col.index_sql()};"
        )


@app.command("list")
def list_cmd(json_out: JsonOpt = False) -> None:
    """The registered columns, and every location values were sealed for and how it is covered."""

    async def go(s: async_sessionmaker[AsyncSession]) -> list[columns.ManagedColumn]:
        async with db.transaction(s) as session:
            return await columns.list_columns(session)

    found: list[columns.ManagedColumn] = run(lambda: _with_sessions(go))
    located: list[census.LocationView] = run(lambda: _with_sessions(_locations))
    if json_out:
        print_json({"columns": [c.as_dict() for c in found], "locations": [v.as_dict() for v in located]})
        return
    table = Table(title="managed columns")
    for name in ("column", "key", "scope", "context", "registered"):
        table.add_column(name)
    for c in found:
        where = f"column {c.scope_column}" if c.scope_column else f"{c.scope}"
        registered = c.registered_at.isoformat()[:19] if c.registered_at else "-"
        table.add_row(c.name, c.pk_column, where, c.context_template, registered)
    out_console.print(table)
    _print_locations(located)


@app.command("unregister")
def unregister(column: Annotated[str, typer.Argument(help="TABLE.COLUMN")], as_: AsOpt = None) -> None:
    """Stop covering a column (its values are left as they are; a ``config_change`` audit event)."""
    actor = check_actor(as_ if as_ is not None else settings().default_actor)
    run(lambda: _with_sessions(lambda s: columns.unregister(s, column, actor=actor)))
    err_console.print(f"unregistered {column}")


async def _locations(s: async_sessionmaker[AsyncSession]) -> list[census.LocationView]:
    async with db.transaction(s) as session:
        return await census.list_locations(session)


_COVERAGE = {
    "keyrotor": "keyrotor's own table ({by})",
    "registered": "registered column {by}",
    "acknowledged": "[yellow]acknowledged[/yellow]",
    "unregistered": "[red]UNREGISTERED[/red]",
}


def _print_locations(located: list[census.LocationView]) -> None:
    if not located:
        err_console.print("no locations recorded yet (every encrypt records where its value goes)")
        return
    table = Table(title="locations (where values were sealed)")
    for name in ("scope", "location", "coverage", "DEK versions: encryptions", "last seen (UTC)"):
        table.add_column(name)
    for v in located:
        versions = ", ".join(
            f"v{u.version}" + (f" ({u.state})" if u.state else "") + f": {u.encryptions:,}"
            for u in v.versions
        )
        coverage = _COVERAGE[v.coverage].format(by=escape(v.by))
        # Locations are the application's text: never read as rich markup.
        table.add_row(
            escape(v.scope), escape(display(v.location)), coverage, versions, v.last_seen.isoformat()[:19]
        )
    out_console.print(table)
    found = census.unregistered(located)
    if found:
        err_console.print(f"[yellow]warning:[/yellow] {escape(census.advice(found))}")


LocationArg = Annotated[str, typer.Argument(help="a location from `columns list` ('(no context)': none)")]


ScopesOpt = Annotated[
    list[str] | None,
    typer.Option("--scope", help="a scope it is for (repeatable; default: those with values there now)"),
]


@app.command("ignore")
def ignore(
    location: LocationArg,
    reason: Annotated[str, typer.Option("--reason", help="why its values may be lost (audited)")],
    scope: ScopesOpt = None,
    all_scopes: Annotated[
        bool, typer.Option("--all-scopes", help="every scope, also those that write there later")
    ] = False,
    as_: AsOpt = None,
    json_out: JsonOpt = False,
) -> None:
    """Acknowledge a location the census cannot count: its values may be lost when their DEK
    version is destroyed (a ``config_change`` audit event). It covers the scopes whose values
    were recorded there so far, or those named with --scope, or every scope with --all-scopes."""
    census.parse_location(location)
    actor = check_actor(as_ if as_ is not None else settings().default_actor)

    async def go(s: async_sessionmaker[AsyncSession]) -> dict[str, object]:
        async with db.transaction(s) as session:
            return await census.ignore(
                session, location, reason=reason, actor=actor, scopes=scope or (), every_scope=all_scopes
            )

    ack = run(lambda: _with_sessions(go))
    if json_out:
        print_json({"acknowledged": ack})
        return
    scopes = cast(list[str], ack["scopes"])
    which = "every scope" if scopes == [EVERY_SCOPE] else ", ".join(scopes)
    err_console.print(
        f"acknowledged {escape(display(str(ack['location'])))} for {escape(which)}: its values may be lost"
    )


@app.command("unignore")
def unignore(
    location: LocationArg, scope: ScopesOpt = None, as_: AsOpt = None, json_out: JsonOpt = False
) -> None:
    """Take back ``columns ignore`` (for the scopes named with --scope, or all): the location
    again keeps those scopes' DEK versions from destruction."""
    census.parse_location(location)
    actor = check_actor(as_ if as_ is not None else settings().default_actor)

    async def go(s: async_sessionmaker[AsyncSession]) -> dict[str, object]:
        async with db.transaction(s) as session:
            return await census.unignore(session, location, actor=actor, scopes=scope or ())

    removed = run(lambda: _with_sessions(go))
    if json_out:
        print_json({"removed": removed})
        return
    scopes = cast(list[str], removed["scopes"])
    which = "every scope" if scopes == [EVERY_SCOPE] else ", ".join(scopes)
    where = escape(display(str(removed["location"])))
    err_console.print(f"no longer acknowledged: {where} for {escape(which)}")
