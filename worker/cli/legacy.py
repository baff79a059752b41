"""``keyrotor legacy migrate|import-dek``: the old Node backend's ciphertexts and DEKs."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Annotated, Any

import typer

from keyrotor import legacy_migration
from keyrotor.legacy_migration import LegacyReport
from keyrotor.policy import check_scope
from keyrotor.runs import RunFailed, RunInfo, check_request_id
from keyrotor.settings import Settings
from worker.cli.common import RequestIdOpt, err_console, manager, print_json, progress, run

app = typer.Typer(help="Migrate the old backend's legacy ciphertexts and DEKs.")

JsonOpt = Annotated[bool, typer.Option("--json", help="print JSON for scripts")]


def _print_report(report: LegacyReport, *, json_out: bool) -> None:
    if json_out:
        print_json(report.as_dict())
        return
    what = "would migrate" if report.dry_run else "migrated"
    for c in report.columns.values():
        err_console.print(
            f"{c.column}: {what} {c.migrated}, already migrated {c.already_migrated}, "
            f"changed meanwhile {len(c.changed)}, failed {c.failed_count}"
        )
        for f in c.failed[:50]:
            err_console.print(f"  [red]FAIL[/red] id={f['id']}: {f['reason']}")
        for w in c.warnings[:20]:
            err_console.print(f"  [yellow]warn[/yellow] id={w['id']}: {w['warning']}")
    state = "" if report.dry_run else f"run {report.run_id} {report.state}: "
    err_console.print(f"{state}{what} {report.migrated}, failed {report.failed}")


@app.command("migrate")
def migrate(
    dry_run: Annotated[
        bool, typer.Option("--dry-run", help="decrypt and report, write nothing (runs here, not on a worker)")
    ] = False,
    wait: Annotated[
        bool, typer.Option("--wait", help="wait for the run to end (progress on stderr)")
    ] = False,
    json_out: JsonOpt = False,
    timeout: Annotated[
        float | None, typer.Option("--timeout", help="with --wait: give up after this")
    ] = None,
    request_id: RequestIdOpt = None,
) -> None:
    """Move every legacy value (secrets and registered columns) to kr1, online and resumable.

    Runs on the workers (`keyrotor worker`) as the job `migrate_legacy`; with --dry-run it runs
    here and changes nothing. Exit 1 if any value failed (with --wait or --dry-run).
    """
    if request_id is not None:
        check_request_id(request_id)
    if dry_run:

        async def dry() -> LegacyReport:
            async with manager() as km:
                with progress() as bar:
                    task = bar.add_task("decrypting legacy values", total=None)

                    def update(done: int, total: int) -> None:
                        bar.update(task, completed=done, total=total)

                    return await legacy_migration.migrate_legacy(
                        km,
                        dry_run=True,
                        workers=km.settings.legacy_workers,
                        batch_rows=km.settings.legacy_batch_rows,
                        on_progress=update,
                    )

        report = run(dry)
        _print_report(report, json_out=json_out)
        if report.failed:
            raise typer.Exit(1)
        return

    async def go() -> tuple[RunInfo, bool]:
        from jobs.common import enqueue_driver
        from worker.client import KeyrotorClient, RunHandle

        async with KeyrotorClient(Settings.from_env()) as client:
            async with manager() as km:
                r, created = await legacy_migration.open_legacy_run(km, trigger="cli", request_id=request_id)
            job = await enqueue_driver(client.redis, client.settings, r)
            handle = RunHandle(client, r.id, job, created)
            if not wait:
                return await handle.status(), created
            with progress() as bar:
                task = bar.add_task("migrating legacy values", total=None)

                def update(info: RunInfo) -> None:
                    bar.update(task, completed=info.rows_done, total=info.rows_total or None)

                return await handle.wait(timeout, on_progress=update), created

    r, created = run(go)
    report = legacy_migration.report_of(r)
    if json_out:
        print_json({**report.as_dict(), "joined": not created, "rows_done": r.rows_done, "error": r.error})
    elif wait:
        _print_report(report, json_out=False)
    else:
        joined = "" if created else " (joined the open run)"
        err_console.print(f"run {r.id}: legacy migration {r.state}{joined}; follow it with `keyrotor runs`")
    if wait and r.state != "completed":
        raise RunFailed(f"run {r.id} {r.state}: {r.error or 'no reason recorded'}")
    if wait and report.failed:
        raise typer.Exit(1)


@app.command("import-dek")
def import_dek(
    scope: Annotated[str, typer.Argument(help="the scope that adopts the DEK")],
    file: Annotated[
        Path | None,
        typer.Option("--file", help="file holding the 144-character encrypted_dek (default: stdin)"),
    ] = None,
    json_out: JsonOpt = False,
) -> None:
    """Adopt the old backend's encrypted_dek as a decrypt-only (grace) version of SCOPE."""
    check_scope(scope)
    blob = file.read_text() if file is not None else sys.stdin.read()

    async def go() -> Any:
        async with manager() as km:
            return await legacy_migration.import_dek(km, scope, blob)

    imported = run(go)
    if json_out:
        print_json(imported.as_dict())
    else:
        err_console.print(
            f"{scope}: legacy DEK adopted as v{imported.version} ({imported.state} until "
            f"{(imported.grace_until or '-')[:19]}); run `keyrotor legacy migrate` before then"
        )
