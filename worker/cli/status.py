"""``keyrotor status`` and ``keyrotor verify``."""

from __future__ import annotations

from typing import Annotated, Any

import typer
from rich.table import Table

from keyrotor.errors import ScopeNotFound
from keyrotor.policy import check_scope
from keyrotor.store import db, repo
from keyrotor.verify import verify_secrets
from worker.cli.common import err_console, manager, out_console, print_json, progress, run

JsonOpt = Annotated[bool, typer.Option("--json", help="print JSON for scripts")]


def register(app: typer.Typer) -> None:
    app.command("status")(status)
    app.command("verify")(verify)


async def collect_status(scope: str | None) -> dict[str, Any]:
    """The document ``status --json`` prints."""
    async with manager() as km, db.transaction(km.sessions) as session:
        scopes = await repo.status(session, scope)
    if scope is not None and not scopes:
        raise ScopeNotFound(f"scope {scope!r} does not exist")
    return {"scopes": scopes}


def status(
    scope: Annotated[str | None, typer.Argument(help="one scope (default: all)")] = None,
    json_out: JsonOpt = False,
) -> None:
    """Scopes, their DEK versions and states, grace periods, policies and rows per version."""
    if scope is not None:
        check_scope(scope)
    doc = run(lambda: collect_status(scope))
    if json_out:
        print_json(doc)
        return
    if not doc["scopes"]:
        err_console.print("no scopes yet: store a value with `keyrotor secrets put SCOPE NAME`")
        return
    table = Table(title="keyrotor status")
    for col in (
        "scope",
        "active",
        "keys (state, grace until)",
        "rows by version",
        "rotations",
        "next rotation",
    ):
        table.add_column(col)
    for s in doc["scopes"]:
        keys = "\n".join(
            f"v{k['version']} {k['state']}" + (f" until {k['grace_until'][:19]}" if k["grace_until"] else "")
            for k in s["keys"]
        )
        rows = ", ".join(f"v{v}: {n}" for v, n in s["rows_by_version"].items()) or "-"
        policy = s["policy"]
        nxt = (policy["next_rotation_at"] or "")[:19] if policy["enabled"] else "disabled"
        table.add_row(s["scope"], f"v{s['active_version']}", keys, rows, str(s["rotation_count"]), nxt or "-")
    out_console.print(table)


def verify(
    scope: Annotated[str | None, typer.Argument(help="one scope (default: all)")] = None,
    json_out: JsonOpt = False,
) -> None:
    """Decrypt every stored value; exit 1 if any fails."""
    if scope is not None:
        check_scope(scope)

    async def go() -> Any:
        async with manager() as km:
            async with db.transaction(km.sessions) as session:
                total = sum(s["rows_total"] for s in await repo.status(session, scope))
            with progress() as bar:
                task = bar.add_task("verifying", total=total)
                return await verify_secrets(km, scope, on_progress=lambda n: bar.advance(task, n))

    report = run(go)
    if json_out:
        print_json(
            {
                "checked": report.checked,
                "ok": report.ok,
                "failed": report.failed,
                "failures": [f.__dict__ for f in report.failures],
            }
        )
    else:
        for f in report.failures[:50]:
            err_console.print(f"[red]FAIL[/red] {f.table} id={f.row_id} {f.scope}/{f.name}: {f.error}")
        err_console.print(f"checked {report.checked}: {report.ok} ok, {report.failed} failed")
    if report.failed:
        raise typer.Exit(1)
