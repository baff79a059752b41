"""``keyrotor lock-down``: replace the open default grant ``* *`` with named grants."""

from __future__ import annotations

from typing import Annotated

import typer
from rich.markup import escape
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from keyrotor.audit.lockdown import LockDownResult, lock_down, parse_grant
from keyrotor.audit.log import check_actor
from keyrotor.store import db
from keyrotor.worker.cli.common import err_console, print_json, run, settings


def register(app: typer.Typer) -> None:
    """Add ``lock-down`` to the root command."""
    app.command("lock-down")(lock_down_cmd)


def lock_down_cmd(
    grant: Annotated[
        list[str] | None,
        typer.Option(
            "--grant",
            help="ACTOR:SCOPE:PERMISSIONS, e.g. billing-svc:tenant-42/*:decrypt,encrypt (repeatable)",
        ),
    ] = None,
    allow_empty: Annotated[
        bool, typer.Option("--allow-empty", help="allow leaving nobody able to decrypt anything")
    ] = False,
    as_: Annotated[
        str | None, typer.Option("--as", help="who makes the change (default: KEYROTOR_DEFAULT_ACTOR)")
    ] = None,
    json_out: Annotated[bool, typer.Option("--json", help="print JSON for scripts")] = False,
) -> None:
    """Insert the named grants and remove the wildcard grant '* *', in one transaction.

    Refused (nothing changes) when afterwards nobody could decrypt anything, unless --allow-empty.
    """
    wanted = [parse_grant(spec) for spec in grant or []]
    s = settings()
    by = check_actor(as_ if as_ is not None else s.default_actor)

    async def go() -> LockDownResult:
        engine = db.create_engine(s.database_url, pool_size=1)
        try:
            sessions: async_sessionmaker[AsyncSession] = db.sessionmaker(engine)
            async with db.transaction(sessions) as session:
                return await lock_down(session, wanted, by=by, allow_empty=allow_empty)
        finally:
            await engine.dispose()

    result = run(go)
    if json_out:
        print_json(result.as_dict())
        return
    for g in result.granted:
        perms = "+".join(p for p, on in (("encrypt", g.can_encrypt), ("decrypt", g.can_decrypt)) if on)
        err_console.print(f"granted: {escape(g.actor)} on {escape(g.scope)}: {perms}")
    err_console.print(
        "removed the wildcard grant '* *'" if result.wildcard_removed else "no wildcard grant '* *' to remove"
    )
