"""``keyrotor status`` and ``keyrotor verify``."""

from __future__ import annotations

from typing import Annotated, Any

import redis.asyncio as aioredis
import typer
from redis.exceptions import RedisError
from rich.markup import escape
from rich.table import Table

from keyrotor import KeyManager
from keyrotor.audit import lockdown
from keyrotor.census import columns
from keyrotor.census import report as census
from keyrotor.errors import ScopeNotFound
from keyrotor.inputs import check_scope
from keyrotor.legacy import scope as legacy_scope
from keyrotor.queue.enqueue import job_id
from keyrotor.replication import check as replication
from keyrotor.rotation.verify import verify_columns, verify_secrets
from keyrotor.settings import Settings
from keyrotor.store import db, repo
from keyrotor.worker.cli.common import err_console, manager, out_console, print_json, progress, run
from keyrotor.worker.cli.replicas import region_table

_DRIVERS = ("rotate_dek", "retire_dek", "destroy_dek")  # the jobs that drive a scope's open run
JsonOpt = Annotated[bool, typer.Option("--json", help="print JSON for scripts")]


def register(app: typer.Typer) -> None:
    app.command("status")(status)
    app.command("verify")(verify)


async def collect_status(scope: str | None) -> dict[str, Any]:
    """The document ``status --json`` prints."""
    async with manager() as km:
        async with db.transaction(km.sessions) as session:
            scopes = await repo.status(session, scope)
            managed = await columns.census_by_scope(session)
            unregistered = await census.unregistered_locations(session)
            legacy_left = await legacy_scope.legacy_remaining(session, managed)
            open_grant = await lockdown.wildcard_grant(session)
        await mark_queued(km.settings, scopes)
        replicas = await replica_status(km)
    if scope is not None and not scopes:
        raise ScopeNotFound(f"scope {scope!r} does not exist")
    add_column_rows(scopes, [c.pop("rows_by_scope") for c in managed])
    for s in scopes:
        s["next_rotation_at"] = s["policy"]["next_rotation_at"] if s["policy"]["enabled"] else None
    if scope is not None:
        unregistered = [v for v in unregistered if v.scope == scope]
    locations = {
        "unregistered": [v.as_dict() for v in unregistered],
        "warning": census.advice(unregistered) if unregistered else None,
    }
    grants = {"wildcard": open_grant, "warning": lockdown.OPEN_GRANT_WARNING if open_grant else None}
    return {
        "scopes": scopes,
        "columns": managed,
        "replicas": replicas,
        "locations": locations,
        "legacy": {"remaining": legacy_left},
        "grants": grants,
    }


def add_column_rows(scopes: list[dict[str, Any]], per_column: list[dict[str, dict[str, int]]]) -> None:
    """Add to each scope the rows of the registered columns (``column_rows_by_version``) and
    every row with its own (``all_rows_by_version``, ``all_rows_total``). ``rows_by_version``
    and ``rows_total`` stay keyrotor's ``secrets`` alone, as scripts have read them."""
    for s in scopes:
        in_columns: dict[str, int] = {}
        for rows_by_scope in per_column:
            for version, n in rows_by_scope.get(s["scope"], {}).items():
                in_columns[version] = in_columns.get(version, 0) + n
        every = dict(s["rows_by_version"])
        for version, n in in_columns.items():
            every[version] = every.get(version, 0) + n
        s["column_rows_by_version"] = dict(sorted(in_columns.items(), key=lambda kv: (len(kv[0]), kv[0])))
        s["all_rows_by_version"] = dict(sorted(every.items(), key=lambda kv: (len(kv[0]), kv[0])))
        s["all_rows_total"] = sum(every.values())


async def replica_status(km: KeyManager) -> dict[str, Any]:
    """Each configured region's status from its last check (``kek_replicas``; nothing is contacted)."""
    configured = [r.name for r in km.replication.regions] if km.replication else []
    stored = await replication.stored_status(km.sessions) if configured else []
    return {"primary": km.settings.primary_region, "regions": replication.merge_status(configured, stored)}


async def mark_queued(settings: Settings, scopes: list[dict[str, Any]]) -> None:
    """Set ``queued`` on each scope: whether its open run's driver job waits in the arq queue
    (False with no open run, None if Redis cannot be asked). One pipelined round trip."""
    for s in scopes:
        s["queued"] = False
    open_runs = [s for s in scopes if s.get("run")]
    if not open_runs:
        return
    client: Any = aioredis.from_url(  # type: ignore[no-untyped-call]
        settings.redis_url, socket_connect_timeout=2, socket_timeout=2
    )
    try:
        async with client.pipeline(transaction=False) as pipe:
            for s in open_runs:
                for name in _DRIVERS:
                    pipe.zscore(settings.queue_name, job_id(settings, name, s["scope"], s["run"]["id"]))
            scores = await pipe.execute()
    except (RedisError, OSError):
        for s in open_runs:
            s["queued"] = None
        return
    finally:
        await client.aclose()
    for i, s in enumerate(open_runs):
        s["queued"] = any(score is not None for score in scores[len(_DRIVERS) * i : len(_DRIVERS) * (i + 1)])


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
    _print_notes(doc)
    if not doc["scopes"]:
        err_console.print("no scopes yet: store a value with `keyrotor secrets put SCOPE NAME`")
        return
    out_console.print(_scopes_table(doc["scopes"]))
    if doc["columns"]:
        out_console.print(_columns_table(doc["columns"]))
    if doc["locations"]["warning"]:
        err_console.print(f"[yellow]warning:[/yellow] {escape(doc['locations']['warning'])}")


def _print_notes(doc: dict[str, Any]) -> None:
    """What comes before the scopes: the open grant, legacy values left, the replicas' table."""
    if doc["grants"]["warning"]:
        err_console.print(f"[yellow]warning:[/yellow] {escape(doc['grants']['warning'])}")
    if doc["legacy"]["remaining"]:
        err_console.print(
            f"legacy values remaining: {doc['legacy']['remaining']} "
            "(`keyrotor legacy migrate` moves them to kr1)"
        )
    if doc["replicas"]["regions"]:
        primary = doc["replicas"]["primary"]
        out_console.print(
            region_table(doc["replicas"]["regions"], f"replicas of primary {primary} (last check)")
        )


def _scopes_table(scopes: list[dict[str, Any]]) -> Table:
    table = Table(title="keyrotor status")
    for col in (
        "scope",
        "active",
        "keys (state, grace until)",
        "rows by version\n(secrets + columns)",
        "rotations",
        "next rotation",
    ):
        table.add_column(col)
    for s in scopes:
        keys = "\n".join(_key_line(k) for k in s["keys"])
        rows = ", ".join(f"v{v}: {n}" for v, n in s["all_rows_by_version"].items()) or "-"
        policy = s["policy"]
        nxt = (policy["next_rotation_at"] or "")[:19] if policy["enabled"] else "disabled"
        if s.get("run"):  # an open rotation or retirement: queued (its job waits for a worker) or running
            nxt = f"{nxt or '-'}\n{_run_state(s['run'], s.get('queued'))}"
        if s.get("retirement_refused"):
            r = s["retirement_refused"]
            keys += f"\n[red]retirement of v{r['version']} refused (run {r['run_id']}):[/red] {r['error']}"
        table.add_row(s["scope"], f"v{s['active_version']}", keys, rows, str(s["rotation_count"]), nxt or "-")
    return table


def _columns_table(managed: list[dict[str, Any]]) -> Table:
    cols = Table(title="application columns")
    for col in ("column", "scope", "legacy values", "rows by version"):
        cols.add_column(col)
    for c in managed:
        by_version = ", ".join(f"v{v}: {n}" for v, n in c["rows_by_version"].items()) or "-"
        where = c["scope"] or f"column {c['scope_column']}"
        cols.add_row(c["column"], where, str(c["legacy"]), by_version)
    return cols


def _key_line(k: dict[str, Any]) -> str:
    line = f"v{k['version']} {k['state']}"
    if k["state"] == "retired":  # decrypt-only; erased after destroy_after unless used meanwhile
        after = k.get("destroy_after")
        return line + (f", destroy after {after[:19]}" if after else ", destruction cancelled")
    return line + (f" until {k['grace_until'][:19]}" if k["grace_until"] else "")


def _run_state(r: dict[str, Any], queued: bool | None) -> str:
    if r["state"] == "running":
        total = "?" if r["rows_total"] is None else f"{r['rows_total']:,}"
        return f"run {r['id']} in progress, {r['rows_done']:,}/{total} rows"
    return (
        f"run {r['id']} " + {True: "queued", False: "pending", None: "pending (queue not reachable)"}[queued]
    )


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
                scopes = await repo.status(session, scope)
            with progress() as bar:
                task = bar.add_task("verifying", total=sum(s["rows_total"] for s in scopes))
                report = await verify_secrets(km, scope, on_progress=lambda n: bar.advance(task, n))
                report = await verify_columns(km, scope, report=report)
        # A scope with no key may still own legacy values in a registered column, so only a
        # scope that has neither is unknown: a typo must not pass as "0 failed".
        if scope is not None and not scopes and not report.checked:
            raise ScopeNotFound(f"scope {scope!r} does not exist")
        return report

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
