"""``keyrotor tokens create|list|revoke``: the bearer tokens of ``keyrotor serve``."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Annotated, TypeVar

import typer
from rich.markup import escape
from rich.table import Table
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from keyrotor.api import tokens
from keyrotor.audit.log import check_actor
from keyrotor.store import db
from keyrotor.worker.cli.common import err_console, out_console, print_json, run, settings

T = TypeVar("T")
JsonOpt = Annotated[bool, typer.Option("--json", help="print JSON for scripts")]
AsOpt = Annotated[
    str | None, typer.Option("--as", help="who makes the change (default: KEYROTOR_DEFAULT_ACTOR)")
]

app = typer.Typer(
    help="API tokens of `keyrotor serve`: one actor each, stored as hashes only.", no_args_is_help=True
)


def _with_sessions(fn: Callable[[async_sessionmaker[AsyncSession]], Awaitable[T]]) -> T:
    s = settings()

    async def go() -> T:
        engine = db.create_engine(s.database_url, pool_size=1)
        try:
            return await fn(db.sessionmaker(engine))
        finally:
            await engine.dispose()

    return run(go)


@app.command("create")
def create(
    actor: Annotated[str, typer.Argument(help="the actor every call made with the token acts as")],
    expires_in_days: Annotated[
        int | None, typer.Option("--expires-in-days", help="days until the token stops working")
    ] = None,
    as_: AsOpt = None,
    json_out: JsonOpt = False,
) -> None:
    """Make a token for ACTOR and print it, once: only its hash is kept."""
    by = check_actor(as_ if as_ is not None else settings().default_actor)
    issued = _with_sessions(lambda ss: tokens.create_token(ss, actor, by=by, expires_in_days=expires_in_days))
    if json_out:
        print_json(issued.as_dict())
        return
    until = issued.expires_at.isoformat() if issued.expires_at else "never"
    err_console.print(
        f"token {issued.id} for {escape(issued.actor)} (expires: {until}); it is shown only now:"
    )
    print(issued.token)


@app.command("list")
def list_(json_out: JsonOpt = False) -> None:
    """List the tokens (ids, actors, expiry, revocation; never the tokens)."""
    records = _with_sessions(tokens.list_tokens)
    if json_out:
        print_json([r.as_dict() for r in records])
        return
    table = Table("id", "actor", "created", "expires", "revoked")
    for r in records:
        table.add_row(
            str(r.id),
            escape(r.actor),
            r.created_at.isoformat(timespec="seconds"),
            r.expires_at.isoformat(timespec="seconds") if r.expires_at else "-",
            r.revoked_at.isoformat(timespec="seconds") if r.revoked_at else "-",
        )
    out_console.print(table)


@app.command("revoke")
def revoke(
    token_id: Annotated[
        int,
        typer.Argument(metavar="ID", min=1, max=2**63 - 1, help="the token's id (`keyrotor tokens list`)"),
    ],
    as_: AsOpt = None,
    json_out: JsonOpt = False,
) -> None:
    """Revoke a token: `keyrotor serve` refuses it within KEYROTOR_API_TOKEN_CACHE_SECONDS."""
    by = check_actor(as_ if as_ is not None else settings().default_actor)
    record = _with_sessions(lambda ss: tokens.revoke_token(ss, token_id, by=by))
    if json_out:
        print_json(record.as_dict())
        return
    err_console.print(f"revoked token {record.id} of {escape(record.actor)}")
