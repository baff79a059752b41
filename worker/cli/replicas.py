"""``keyrotor replicas check|init|promote|status``: multi-region KEK replication (docs/replication.md)."""

from __future__ import annotations

import contextlib
import sys
from collections.abc import AsyncIterator
from typing import Annotated, Any

import typer
from rich.table import Table

from keyrotor.errors import ConfigurationError, InvalidInput, KekUnavailable
from keyrotor.kek.base import KekProvider
from keyrotor.kek.factory import open_provider
from keyrotor.replication import check as replication
from keyrotor.replication.check import Replication
from keyrotor.settings import Settings
from keyrotor.store import db
from keyrotor.worker.cli.common import err_console, out_console, print_json, run

app = typer.Typer(help="Copies of the primary's DEKs in the secondary regions: check, repair, promote.")

JsonOpt = Annotated[bool, typer.Option("--json", help="print JSON for scripts")]
_COLOURS = {"in_sync": "green", "unreachable": "red", "corrupt": "red", "drifted": "red"}


def register(root: typer.Typer) -> None:
    root.add_typer(app, name="replicas")


@contextlib.asynccontextmanager
async def open_replication(settings: Settings) -> AsyncIterator[Replication]:
    """The primary's engine and KEK provider, and the configured regions.

    The KEK provider may be unavailable (a primary outage): promotion works without it.

    Raises:
        ConfigurationError: no regions are configured, or their variables are invalid.
    """
    if not replication.parse_regions(settings):
        raise ConfigurationError(
            "no secondary regions configured: set KEYROTOR_REGIONS (docs/replication.md)"
        )
    engine = db.create_engine(
        settings.database_url, pool_size=2, connect_args={"timeout": settings.region_connect_timeout_s}
    )
    kek: KekProvider | None = None
    try:
        with contextlib.suppress(KekUnavailable):
            kek = await open_provider(settings)
        rep = Replication.open(settings, db.sessionmaker(engine), kek)
        try:
            yield rep
        finally:
            await rep.aclose()
    finally:
        if kek is not None:
            await kek.aclose()
        await engine.dispose()


def _colour(status: str) -> str:
    colour = _COLOURS.get(status, "yellow")
    return f"[{colour}]{status}[/{colour}]"


def region_table(regions: list[dict[str, Any]], title: str) -> Table:
    """A rich table of region reports (check results or the stored status)."""
    table = Table(title=title)
    for col in ("region", "status", "kek version", "last ok", "detail"):
        table.add_column(col)
    for r in regions:
        status = _colour(r["status"])
        if r.get("repaired"):
            status += f"\n(was {r['found']}, {r['repaired']} repaired)"
        table.add_row(
            r["region"],
            status,
            "-" if r["kek_version"] is None else str(r["kek_version"]),
            (r["last_ok_at"] or "never")[:19],
            r["detail"],
        )
    return table


@app.command("check")
def check(
    json_out: JsonOpt = False,
    repair: Annotated[
        bool, typer.Option("--repair", help="re-replicate stale, missing, drifted and corrupt copies")
    ] = False,
    region: Annotated[
        list[str] | None, typer.Option("--region", help="only this region (repeatable)")
    ] = None,
) -> None:
    """Check every secondary region's copies against the primary; exit 1 unless all are in sync."""
    settings = Settings.from_env()

    async def go() -> dict[str, Any]:
        async with open_replication(settings) as rep:
            report = await rep.check(repair=repair, regions=region or None, actor=settings.default_actor)
            return report.as_dict()

    doc = run(go)
    if json_out:
        print_json(doc)
    else:
        out_console.print(region_table(doc["regions"], f"replicas of primary {doc['primary']}"))
    if not doc["in_sync"]:
        if not json_out:
            _advise(doc["regions"], repaired=repair)
        raise typer.Exit(1)


def _advise(regions: list[dict[str, Any]], *, repaired: bool) -> None:
    """What to do about the regions not in sync: a repair copies keys into a region it can
    reach, so an unreachable one needs its database or key back (or created) first."""
    unreachable = [r["region"] for r in regions if r["status"] == "unreachable"]
    fixable = [r["region"] for r in regions if r["status"] not in ("in_sync", "unreachable")]
    if fixable and not repaired:
        err_console.print(
            f"not in sync: {', '.join(fixable)}: `keyrotor replicas check --repair` re-replicates "
            "from the primary",
            highlight=False,
            soft_wrap=True,
        )
    if unreachable:
        err_console.print(
            f"unreachable: {', '.join(unreachable)} (its database or its key did not answer; a region "
            "database never created: `keyrotor replicas init`)",
            highlight=False,
            soft_wrap=True,
        )


@app.command("status")
def status(json_out: JsonOpt = False) -> None:
    """Each region's status as recorded by its last check (no region is contacted)."""
    settings = Settings.from_env()

    async def go() -> dict[str, Any]:
        configured = [r.name for r in replication.parse_regions(settings)]
        engine = db.create_engine(settings.database_url, pool_size=1)
        try:
            stored = await replication.stored_status(db.sessionmaker(engine))
        finally:
            await engine.dispose()
        return {"primary": settings.primary_region, "regions": replication.merge_status(configured, stored)}

    doc = run(go)
    if json_out:
        print_json(doc)
    elif not doc["regions"]:
        err_console.print("no secondary regions configured (KEYROTOR_REGIONS)")
    else:
        out_console.print(region_table(doc["regions"], f"replicas of primary {doc['primary']} (last check)"))


@app.command("init")
def init(json_out: JsonOpt = False) -> None:
    """Create each region's database if needed and migrate it (then `replicas check --repair` fills it)."""
    settings = Settings.from_env()
    done = run(lambda: replication.init_regions(settings))
    if json_out:
        print_json({"regions": done})
    else:
        err_console.print(f"initialised {len(done)} region(s): {', '.join(done) or '-'}")


@app.command("promote")
def promote(
    region: Annotated[str, typer.Argument(help="the secondary region to make primary")],
    json_out: JsonOpt = False,
    yes: Annotated[bool, typer.Option("--yes", help="do not ask for confirmation")] = False,
) -> None:
    """Promote a secondary to primary for a lasting outage: its verified copies become its DEKs."""
    settings = Settings.from_env()
    # --json only picks the output: the question stands (on stderr), and a script says --yes.
    if not yes:
        if not sys.stdin.isatty():
            raise InvalidInput("promoting a region cannot be undone: confirm on a terminal, or pass --yes")
        typer.confirm(
            f"promote {region} to primary? Replication will never write to it again", abort=True, err=True
        )

    async def go() -> dict[str, Any]:
        async with open_replication(settings) as rep:
            return await rep.promote(region, by=settings.default_actor)

    doc = run(go)
    if json_out:
        print_json(doc)
    else:
        err_console.print(
            f"promoted {doc['region']}: {doc['scopes']} scopes, {doc['deks']} DEKs. Next: {doc['next']}"
        )
