"""``keyrotor kek status``, ``keyrotor kek migrate`` and ``keyrotor keygen``."""

from __future__ import annotations

import contextlib
from typing import Annotated, Any

import structlog
import typer
from rich.table import Table

from keyrotor import runs
from keyrotor.errors import KekError, KekUnavailable
from keyrotor.kek.base import PROVIDER_SETTING, KekProvider
from keyrotor.kek.factory import open_provider
from keyrotor.kek.local import generate_key
from keyrotor.rotation import kek_migration
from keyrotor.runs import RunFailed, RunInfo, check_request_id
from keyrotor.settings import Settings
from keyrotor.store import db
from keyrotor.worker.cli.common import (
    RequestIdOpt,
    err_console,
    logs_to_stderr,
    out_console,
    print_json,
    progress,
    run,
)

app = typer.Typer(help="The KEK: its provider, the DEKs it wraps, migration to another provider.")

JsonOpt = Annotated[bool, typer.Option("--json", help="print JSON for scripts")]


def register(root: typer.Typer) -> None:
    root.add_typer(app, name="kek")
    root.command("keygen")(keygen)


def keygen() -> None:
    """Print a new master key for ENCRYPTION_KEY: `krk1_` and 32 random bytes (base64url).

    The documented way to make a local KEK: such a key needs no stretching and passes the
    strength check by construction. Keep it where you keep other secrets; it is printed once.
    """
    out_console.print(generate_key(), highlight=False, soft_wrap=True)


@app.command("status")
def status(json_out: JsonOpt = False) -> None:
    """The KEK provider, its current version, DEKs per KEK id and version, and the provider check."""

    async def go() -> dict[str, Any]:
        settings = Settings.from_env()
        engine = db.create_engine(settings.database_url, pool_size=1)
        try:
            sessions = db.sessionmaker(engine)
            try:
                kek = await open_provider(settings)
            except (KekError, KekUnavailable) as exc:  # still show the DEKs during an outage
                return await kek_migration.kek_status(sessions, settings.secrets_provider, exc)
            try:
                return await kek_migration.kek_status(sessions, kek)
            finally:
                await kek.aclose()
        finally:
            await engine.dispose()

    doc = run(go)
    if json_out:
        print_json(doc)
    else:
        check = "ok" if doc["check"]["ok"] else f"FAILED ({doc['check']['error']})"
        oldest = doc.get("min_decryption_version")
        out_console.print(
            f"provider: {doc['provider']} (SECRETS_PROVIDER={doc['setting']}), "
            f"current KEK version: {doc['current_kek_version']}"
            + (f", unwraps versions >= {oldest}" if oldest is not None else "")
            + f", check: {check}"
        )
        table = Table(title="DEKs per KEK")
        for col in ("provider", "kek_id", "kek_version", "deks"):
            table.add_column(col)
        for row in doc["deks"]:
            table.add_row(row["provider"], row["kek_id"], str(row["kek_version"]), str(row["deks"]))
        out_console.print(table)
        if doc["deks_on_other_providers"]:
            out_console.print(
                f"{doc['deks_on_other_providers']} DEK(s) are wrapped by another provider: "
                "finish `keyrotor kek migrate` before removing its configuration"
            )
    if not doc["check"]["ok"]:
        raise typer.Exit(1)


@app.command("migrate")
def migrate(
    to: Annotated[str, typer.Option("--to", help="the target provider: local, aws or vault")],
    source: Annotated[
        str | None,
        typer.Option("--from", help="the provider the DEKs are on (default: SECRETS_PROVIDER)"),
    ] = None,
    wait: Annotated[
        bool, typer.Option("--wait", help="wait for the run to end (progress on stderr)")
    ] = False,
    inline: Annotated[
        bool, typer.Option("--inline", help="run the migration in this process instead of a worker")
    ] = False,
    json_out: JsonOpt = False,
    timeout: Annotated[
        float | None, typer.Option("--timeout", help="with --wait: give up after this many seconds")
    ] = None,
    request_id: RequestIdOpt = None,
) -> None:
    """Rewrap every DEK from the current provider to another (resumable; only DEKs are decrypted).

    The target is configured by its usual variables (AWS_*, VAULT_*, ENCRYPTION_KEY), which the
    workers need too unless --inline is given.
    """
    if request_id is not None:
        check_request_id(request_id)
    settings = Settings.from_env()
    src = kek_migration.check_provider_setting(source or settings.secrets_provider)
    dst = kek_migration.check_provider_setting(to)

    async def go() -> tuple[RunInfo, str | None]:
        # Fail fast, here, if the target is not configured or not reachable.
        target = await kek_migration.open_named_provider(dst, settings)
        try:
            await target.check()
            if inline:
                return await _inline(settings, src, target, request_id), None
        finally:
            await target.aclose()
        return await _enqueued(settings, src, dst, wait=wait, timeout_s=timeout, request_id=request_id)

    r, job_id = run(go)
    done = r.state == "completed"
    if json_out:
        doc = {**r.as_dict(), "arq_job_id": job_id}
        if done:
            doc["next_step"] = kek_migration.next_step(dst)
        print_json(doc)
    else:
        total = "?" if r.rows_total is None else str(r.rows_total)
        err_console.print(f"run {r.id}: KEK migration {src} -> {dst}: {r.state}, {r.rows_done}/{total} DEKs")
        if done:
            err_console.print(f"next: {kek_migration.next_step(dst)}")
    if (wait or inline) and not done:
        raise RunFailed(f"run {r.id} {r.state}: {r.error or 'no reason recorded'}")


async def _inline(settings: Settings, src: str, target: KekProvider, request_id: str | None) -> RunInfo:
    logs_to_stderr(settings)  # the run logs its batches; stdout stays for --json
    engine = db.create_engine(settings.database_url, pool_size=2)
    try:
        sessions = db.sessionmaker(engine)
        async with db.transaction(sessions) as session:
            r, _ = await kek_migration.request_migration(
                session, src, target_name(target), trigger="cli", request_id=request_id
            )
        structlog.contextvars.bind_contextvars(**runs.request_context(r.request_ids))
        async with contextlib.AsyncExitStack() as stack:
            source = await kek_migration.open_named_provider(src, settings)
            stack.push_async_callback(source.aclose)
            result = await kek_migration.migrate_kek(
                sessions, source, target, run_id=r.id, batch_size=settings.kek_rewrap_batch
            )
        return result.run
    finally:
        await engine.dispose()


def target_name(provider: KekProvider) -> str:
    """The ``SECRETS_PROVIDER`` value of an open provider (``aws-kms`` -> ``aws``)."""
    return PROVIDER_SETTING.get(provider.name, provider.name)


async def _enqueued(
    settings: Settings, src: str, dst: str, *, wait: bool, timeout_s: float | None, request_id: str | None
) -> tuple[RunInfo, str | None]:
    # Imported here: the queue client loads arq and redis, which `kek status` and an inline
    # migration never need.
    from keyrotor.queue.client import KeyrotorClient, RunHandle
    from keyrotor.queue.enqueue import enqueue_driver

    async with KeyrotorClient(settings) as client:
        async with db.transaction(client.sessions) as session:
            r, created = await kek_migration.request_migration(
                session, src, dst, trigger="cli", request_id=request_id
            )
        job = await enqueue_driver(client.redis, settings, r)
        handle = RunHandle(client, r.id, job, created)
        if not wait:
            return await handle.status(), job.job_id
        with progress() as bar:
            task = bar.add_task(f"migrating DEKs {src} -> {dst}", total=None)

            def update(info: RunInfo) -> None:
                bar.update(task, completed=info.rows_done, total=info.rows_total or None)

            return await handle.wait(timeout_s, on_progress=update), job.job_id
