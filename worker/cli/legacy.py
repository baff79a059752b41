"""``keyrotor legacy migrate|import-dek``: the old Node backend's ciphertexts and DEKs."""

from __future__ import annotations

import sys
import uuid
from pathlib import Path
from typing import Annotated, Any

import typer
from arq.jobs import Job, SerializationError
from redis.exceptions import RedisError

from keyrotor import KeyManager
from keyrotor.errors import Conflict, QueueUnavailable
from keyrotor.inputs import check_scope
from keyrotor.legacy import migration as legacy_migration
from keyrotor.legacy import scope as legacy_scope
from keyrotor.legacy.migration import LegacyReport
from keyrotor.queue.client import KeyrotorClient, RunHandle
from keyrotor.queue.enqueue import driver_call, enqueue_driver
from keyrotor.runs import RunFailed, RunInfo, check_request_id
from keyrotor.settings import Settings
from keyrotor.store import db
from keyrotor.worker.cli.common import RequestIdOpt, err_console, manager, print_json, progress, run
from keyrotor.worker.cli.rotate import wait_run

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
        float | None,
        typer.Option("--timeout", min=0, help="with --wait: stop waiting after this many seconds (exit 1)"),
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
        _dry_run(json_out=json_out)
        return
    r, created, left = run(lambda: _queue_run(request_id, wait=wait, wait_s=timeout))
    report = legacy_migration.report_of(r)
    if json_out:
        extra = _remaining_doc(left) if left is not None else {}
        print_json(
            {**report.as_dict(), "joined": not created, "rows_done": r.rows_done, "error": r.error, **extra}
        )
    elif wait:
        _print_report(report, json_out=False)
        if left is not None:
            err_console.print(_remaining_line(left))
    else:
        joined = "" if created else " (joined the open run)"
        err_console.print(f"run {r.id}: legacy migration {r.state}{joined}; follow it with `keyrotor runs`")
    if wait and r.state != "completed":
        raise RunFailed(f"run {r.id} {r.state}: {r.error or 'no reason recorded'}")
    if wait and report.failed:
        raise typer.Exit(1)


def _dry_run(*, json_out: bool) -> None:
    """Decrypt and report here, writing nothing; exit 1 if any value failed."""

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
    still = run(_remaining)
    if json_out:
        print_json({**report.as_dict(), **_remaining_doc(still)})
    else:
        _print_report(report, json_out=False)
        err_console.print(_remaining_line(still))
    if report.failed:
        raise typer.Exit(1)


async def _queue_run(
    request_id: str | None, *, wait: bool, wait_s: float | None
) -> tuple[RunInfo, bool, int | None]:
    """Open (or join) the run and have a worker drive it; with ``wait``, follow it to its end
    (at most ``wait_s`` seconds, if given).

    Returns the run, whether this call opened it, and (after a wait) the legacy values left.
    """
    async with KeyrotorClient(Settings.from_env()) as client:
        async with manager() as km:
            r, created = await _open_run(km, request_id)
        job = await _drive(client, r)
        handle = RunHandle(client, r.id, job, created)
        if not wait:
            return await handle.status(), created, None
        with progress() as bar:
            task = bar.add_task("migrating legacy values", total=None)

            def update(info: RunInfo) -> None:
                bar.update(task, completed=info.rows_done, total=info.rows_total or None)

            ended = await wait_run(handle, wait_s, update)
        return ended, created, await _remaining()


SAFE_TO_DISABLE = (
    "no legacy value remains in secrets or any registered column: "
    "it is now safe to set KEYROTOR_LEGACY_DECRYPT=off"
)


async def _remaining() -> int:
    """Legacy values left in ``secrets`` and every registered column."""
    async with manager() as km, db.transaction(km.sessions) as session:
        return await legacy_scope.legacy_remaining(session)


def _remaining_line(left: int) -> str:
    if left == 0:
        return SAFE_TO_DISABLE
    return f"{left} legacy values remain: keep KEYROTOR_LEGACY_DECRYPT=on until they are migrated"


def _remaining_doc(left: int) -> dict[str, Any]:
    return {"legacy_remaining": left, "safe_to_disable_legacy_decrypt": left == 0}


async def _open_run(km: KeyManager, request_id: str | None) -> tuple[RunInfo, bool]:
    """Open a new run, or join the open one; never answer with a run that already ended.

    ``Conflict`` means the open run ended (say, failed) between our insert and our read: a run
    that has ended is not this invocation's, so ask again, which opens a new one.
    """
    for attempt in range(3):
        try:
            return await legacy_migration.open_legacy_run(km, trigger="cli", request_id=request_id)
        except Conflict:
            if attempt == 2:
                raise
    raise AssertionError("unreachable")  # pragma: no cover


async def _drive(client: KeyrotorClient, r: RunInfo) -> Job:
    """The job that drives ``r`` for this invocation.

    Joining an open run whose driver already failed (its result is kept in Redis) must not
    report that old failure as this invocation's: a new driver is enqueued, under an id of
    this invocation, and followed instead.

    Raises:
        QueueUnavailable: Redis cannot be reached.
    """
    job = await enqueue_driver(client.redis, client.settings, r)
    if r.terminal:
        return job
    try:
        info = await job.result_info()
        if info is None or info.success:
            return job
        name, args, kwargs = driver_call(r)
        fresh = f"{job.job_id}:cli{uuid.uuid4().hex[:12]}"
        queue = client.settings.queue_name
        again = await client.redis.enqueue_job(name, *args, _job_id=fresh, _queue_name=queue, **kwargs)
    except SerializationError:
        return job  # a result this version cannot read: follow the run itself
    except (RedisError, OSError) as exc:
        raise QueueUnavailable(f"cannot enqueue on Redis: {type(exc).__name__}") from exc
    return again if again is not None else job


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
