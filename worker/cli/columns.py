"""``keyrotor columns register|list|unregister``: application-owned ciphertext columns."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Annotated, TypeVar

import typer
from rich.table import Table
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from keyrotor import columns
from keyrotor.store import db
from worker.cli.common import err_console, out_console, print_json, run, settings

T = TypeVar("T")

app = typer.Typer(help="Application-owned kr1 columns that rotation, retirement and verify cover.")

JsonOpt = Annotated[bool, typer.Option("--json", help="print JSON for scripts")]


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
    json_out: JsonOpt = False,
) -> None:
    """Register a column of kr1 values; every rotation, retirement and verify then covers it."""
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
    """The registered columns."""

    async def go(s: async_sessionmaker[AsyncSession]) -> list[columns.ManagedColumn]:
        async with db.transaction(s) as session:
            return await columns.list_columns(session)

    found: list[columns.ManagedColumn] = run(lambda: _with_sessions(go))
    if json_out:
        print_json({"columns": [c.as_dict() for c in found]})
        return
    table = Table(title="managed columns")
    for name in ("column", "key", "scope", "context", "registered"):
        table.add_column(name)
    for c in found:
        where = f"column {c.scope_column}" if c.scope_column else f"{c.scope}"
        registered = c.registered_at.isoformat()[:19] if c.registered_at else "-"
        table.add_row(c.name, c.pk_column, where, c.context_template, registered)
    out_console.print(table)


@app.command("unregister")
def unregister(column: Annotated[str, typer.Argument(help="TABLE.COLUMN")]) -> None:
    """Stop covering a column (its values are left as they are)."""
    run(lambda: _with_sessions(lambda s: columns.unregister(s, column)))
    err_console.print(f"unregistered {column}")
