"""``keyrotor worker``, ``rotate``, ``rotate-kek``, ``retire`` and ``runs``."""

from __future__ import annotations

from collections.abc import Callable
from typing import Annotated, Any

import typer
from rich.table import Table

from keyrotor.errors import KeyrotorError
from keyrotor.inputs import check_scope
from keyrotor.queue.client import KeyrotorClient, RunHandle
from keyrotor.runs import RunFailed, RunInfo, check_request_id
from keyrotor.settings import Settings
from keyrotor.worker.cli.common import RequestIdOpt, err_console, out_console, print_json, progress, run
from keyrotor.worker.cli.scheduler import rotate_dry_run
from keyrotor.worker.logs import configure_logging


def _client() -> KeyrotorClient:
    return KeyrotorClient(Settings.from_env())


JsonOpt = Annotated[bool, typer.Option("--json", help="print JSON for scripts")]
WaitOpt = Annotated[bool, typer.Option("--wait", help="wait for the run to end (progress on stderr)")]
TimeoutOpt = Annotated[
    float | None,
    typer.Option("--timeout", min=0, help="with --wait: stop waiting after this many seconds (exit 1)"),
]
# retire always waits: the destruction (or the refusal) is its answer.
RetireTimeoutOpt = Annotated[
    float | None,
    typer.Option(
        "--timeout",
        min=0,
        help="stop waiting after this many seconds (exit 1); the run goes on on the workers",
    ),
]


class StillRunning(KeyrotorError):
    """The run did not end within the command's --timeout (it goes on on the workers)."""


async def wait_run(
    handle: RunHandle, timeout_s: float | None, on_progress: Callable[[RunInfo], None] | None = None
) -> RunInfo:
    """``handle.wait``, with its timeout as one line that says the run goes on.

    Raises:
        StillRunning: the run is still open after ``timeout_s`` seconds.
    """
    try:
        return await handle.wait(timeout_s, on_progress=on_progress)
    except TimeoutError:
        raise StillRunning(
            f"run {handle.run_id} did not end within {timeout_s:g}s; it goes on on the workers: "
            f"follow it with `keyrotor runs`"
        ) from None


def register(app: typer.Typer) -> None:
    app.command("worker")(worker)
    app.command("rotate")(rotate)
    app.command("rotate-kek")(rotate_kek)
    app.command("retire")(retire)
    app.command("runs")(runs_cmd)


def worker(
    burst: Annotated[bool, typer.Option("--burst", help="exit once the queue is empty")] = False,
) -> None:
    """Run a rotation worker (arq) until SIGTERM/SIGINT; any number may share Redis and Postgres.

    A stop takes at most KEYROTOR_WORKER_STOP_GRACE_SECONDS plus 10 s; it exits 0, or 3 when
    steps still running at the end of the grace had to be cancelled (rolled back; their jobs
    resume elsewhere), or 4 when the shutdown overran that limit.
    """
    # Imported here: the worker brings every job and its HTTP server (aiohttp, about a third of
    # a second to import), which no other command needs.
    from keyrotor.worker.main import LeasedWorker, worker_settings

    settings = Settings.from_env()
    configure_logging(settings)
    w = LeasedWorker(**worker_settings(settings), burst=burst)
    w.run()
    if w.stop.code:
        raise typer.Exit(w.stop.code)


def _describe(r: RunInfo) -> str:
    total = "?" if r.rows_total is None else str(r.rows_total)
    what = {"dek": f"DEK rotation of {r.scope}", "kek": "KEK rewrap", "retire": f"retirement of {r.scope}"}
    versions = ""
    if r.kind == "dek" and r.to_version:
        versions = f" v{r.from_version} -> v{r.to_version}"
    elif r.kind == "retire":
        versions = f" v{r.from_version}"
    return f"run {r.id}: {what.get(r.kind, r.kind)}{versions}: {r.state}, {r.rows_done}/{total} rows"


async def _follow(handle: RunHandle, *, wait: bool, timeout_s: float | None, label: str) -> RunInfo:
    if not wait:
        return await handle.status()
    with progress() as bar:
        task = bar.add_task(label, total=None)

        def update(r: RunInfo) -> None:
            bar.update(task, completed=r.rows_done, total=r.rows_total or None)

        return await wait_run(handle, timeout_s, update)


def _finish(r: RunInfo, handle: RunHandle, *, wait: bool, json_out: bool) -> None:
    if json_out:
        print_json({**r.as_dict(), "arq_job_id": handle.job.job_id, "joined": not handle.created})
    else:
        joined = "" if handle.created else " (joined the open run)"
        err_console.print(_describe(r) + joined)
    if wait and r.state != "completed":
        raise RunFailed(f"run {r.id} {r.state}: {r.error or 'no reason recorded'}")


def rotate(
    scope: Annotated[str, typer.Argument(help="the scope whose DEK to rotate")],
    wait: WaitOpt = False,
    json_out: JsonOpt = False,
    timeout: TimeoutOpt = None,
    dry_run: Annotated[
        bool, typer.Option("--dry-run", help="print what the rotation would do (rows, time); change nothing")
    ] = False,
    request_id: RequestIdOpt = None,
) -> None:
    """Rotate a scope's DEK now (or join its open rotation). Exit 0 once completed with --wait."""
    check_scope(scope)
    if request_id is not None:
        check_request_id(request_id)
    if dry_run:
        rotate_dry_run(scope, json_out=json_out)
        return

    async def go() -> tuple[RunInfo, RunHandle]:
        async with _client() as client:
            handle = await client.rotate(scope, trigger="cli", request_id=request_id)
            return await _follow(handle, wait=wait, timeout_s=timeout, label=f"re-encrypting {scope}"), handle

    r, handle = run(go)
    _finish(r, handle, wait=wait, json_out=json_out)


def rotate_kek(
    wait: WaitOpt = False,
    json_out: JsonOpt = False,
    timeout: TimeoutOpt = None,
    request_id: RequestIdOpt = None,
) -> None:
    """Rewrap every DEK under the current KEK version (local keyring: ENCRYPTION_KEY_VERSION)."""
    if request_id is not None:
        check_request_id(request_id)

    async def go() -> tuple[RunInfo, RunHandle]:
        async with _client() as client:
            handle = await client.rotate_kek(trigger="cli", request_id=request_id)
            return await _follow(handle, wait=wait, timeout_s=timeout, label="rewrapping DEKs"), handle

    r, handle = run(go)
    _finish(r, handle, wait=wait, json_out=json_out)


def retire(
    scope: Annotated[str, typer.Argument(help="the scope")],
    version: Annotated[int, typer.Argument(help="the DEK version to retire", min=1)],
    force_now: Annotated[
        bool,
        typer.Option(
            "--force-now",
            help="skip the wait for the grace period (never the proof nor the destruction window)",
        ),
    ] = False,
    json_out: JsonOpt = False,
    timeout: RetireTimeoutOpt = None,
    request_id: RequestIdOpt = None,
) -> None:
    """Retire an old DEK version: re-encrypt stragglers, prove no value needs it, make it
    decrypt-only. Its key is erased after KEYROTOR_DESTROY_AFTER_DAYS unless used meanwhile."""
    check_scope(scope)
    if request_id is not None:
        check_request_id(request_id)

    async def go() -> tuple[RunInfo, RunHandle, str | None]:
        async with _client() as client:
            handle = await client.retire(
                scope, version, force_now=force_now, trigger="cli", request_id=request_id
            )
            done = await wait_run(handle, timeout)
            return done, handle, await client.destroy_after(scope, version)

    r, handle, destroy_after = run(go)
    _finish(r, handle, wait=True, json_out=json_out)
    if not json_out and destroy_after is not None:
        err_console.print(
            f"{scope} v{version} is retired: it decrypts (each use is audited and cancels its destruction); "
            f"its key is erased after {destroy_after[:19]} if unused; `keyrotor keys restore {scope} "
            f"{version}` brings it back"
        )


def runs_cmd(
    json_out: JsonOpt = False,
    limit: Annotated[int, typer.Option("--limit", min=1, max=1000, help="how many")] = 20,
    scope: Annotated[str | None, typer.Option("--scope", help="only this scope's runs")] = None,
    request_id: Annotated[
        str | None, typer.Option("--request-id", help="only the runs asked for under this request id")
    ] = None,
) -> None:
    """Recent rotation runs, newest first."""
    if scope is not None:
        check_scope(scope)
    if request_id is not None:
        check_request_id(request_id)

    async def go() -> list[RunInfo]:
        async with _client() as client:
            return await client.runs(limit=limit, scope=scope, request_id=request_id)

    found = run(go)
    if json_out:
        print_json({"runs": [r.as_dict() for r in found]})
        return
    table = Table(title="rotation runs")
    for col in (
        "id",
        "kind",
        "scope",
        "versions",
        "state",
        "rows",
        "attempts",
        "trigger",
        "created",
        "error",
    ):
        table.add_column(col)
    for r in found:
        versions = (
            f"v{r.from_version or '?'} -> v{r.to_version}" if r.to_version else f"v{r.from_version or '-'}"
        )
        rows: Any = f"{r.rows_done}/{r.rows_total if r.rows_total is not None else '?'}"
        table.add_row(
            str(r.id),
            r.kind,
            r.scope or "-",
            versions,
            r.state,
            rows,
            str(r.attempts),
            r.trigger,
            r.created_at.isoformat()[:19],
            (r.error or "")[:80],
        )
    out_console.print(table)
