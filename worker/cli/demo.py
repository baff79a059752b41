"""``keyrotor demo``: the whole system end to end on a local PostgreSQL and Redis.

1. create the database if missing and apply the migrations;
2. store demo API keys for openai, anthropic and google (read back to prove the round trip),
   plus ``--rows`` per-tenant demo keys in each provider's scope, so the rotation has rows to
   re-encrypt and its progress bar something to show;
3. start a worker and a scheduler as subprocesses (``keyrotor worker``, ``keyrotor scheduler``;
   logs in a temporary directory) and wait until both report in;
4. rotate each provider's DEK on demand through the enqueue client, with a live progress bar
   (rows re-encrypted of the run's total; the demo worker re-encrypts in batches of
   :data:`DEMO_BATCH_ROWS` so the bar moves), waiting for completion;
5. show the status table (versions, grace, rows per version, next rotations, replicas), the
   worker's rotation counters scraped from its ``/metrics``, and the last audit events;
6. stop both processes with SIGTERM and wait for them.

Idempotent: a second run stores fresh demo values and rotates again (v2 -> v3, ...).
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import secrets
import signal
import socket
import string
import subprocess
import sys
import tempfile
import time
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Annotated, Any

import redis.asyncio as aioredis
import typer

from keyrotor.audit.log import AuditQuery, query_events
from keyrotor.queue.client import KeyrotorClient
from keyrotor.replication import check as replication
from keyrotor.runs import RunInfo
from keyrotor.settings import Settings
from keyrotor.store import db, ops
from keyrotor.worker.cli.audit import event_line
from keyrotor.worker.cli.common import err_console, manager, out_console, progress, run, settings
from keyrotor.worker.cli.health import HEALTH_CHECK_SUFFIX
from keyrotor.worker.cli.status import status
from keyrotor.worker.logs import Redactor, known_secrets


def _random(n: int) -> str:
    alphabet = string.ascii_letters + string.digits + "-_"
    return "".join(secrets.choice(alphabet) for _ in range(n))


def _openai() -> str:
    return "sk-proj-" + _random(48)


def _anthropic() -> str:
    return "sk-ant-api03-" + _random(95)


def _google() -> str:
    return "AIza" + _random(35)


DEMO_KEYS: dict[str, Callable[[], str]] = {"openai": _openai, "anthropic": _anthropic, "google": _google}
READY_TIMEOUT_S = 30.0
DEFAULT_ROWS = 5_000
DEMO_BATCH_ROWS = 500
ROTATE_TIMEOUT_S = 60.0
# Past the worker's own bound (KEYROTOR_WORKER_STOP_GRACE_SECONDS, 10, plus 10 s): a worker
# killed here did not stop as it should have.
STOP_TIMEOUT_S = 25.0
# Lines of a killed process's log shown on stderr.
TAIL_LINES = 40


def _masked(value: str) -> str:
    return value[:7] + "…" + f"({len(value)} chars)"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


class _Process:
    """A ``keyrotor`` subcommand in a subprocess, its output in a log file.

    ``command`` replaces the ``keyrotor`` command line (tests: a process that ignores SIGTERM).
    """

    def __init__(
        self,
        name: str,
        args: list[str],
        env: dict[str, str],
        log_dir: Path,
        *,
        command: list[str] | None = None,
    ) -> None:
        self.name = name
        self.log_path = log_dir / f"{name}.log"
        # What the process's own logging blanks, blanked again in what the demo shows of its log:
        # a line it printed past its logging (a crash's traceback) passes the same redaction.
        self._redactor = Redactor(known_secrets(Settings.from_env(env), env))
        self._log = self.log_path.open("ab")
        self.proc = subprocess.Popen(
            command or [sys.executable, "-c", "from keyrotor.worker.cli import main; main()", *args],
            env=env,
            stdout=self._log,
            stderr=subprocess.STDOUT,
        )

    def tail(self, lines: int = TAIL_LINES) -> list[str]:
        """The last ``lines`` lines of the process's log, redacted."""
        text = self.log_path.read_text(errors="replace")
        return [self._redactor.redact(line) for line in text.splitlines()[-lines:]]

    def check_alive(self) -> None:
        if self.proc.poll() is not None:
            tail = "\n".join(self.tail())
            raise RuntimeError(f"the {self.name} exited ({self.proc.returncode}); its log ends:\n{tail}")

    def stop(self, timeout_s: float = STOP_TIMEOUT_S) -> int | None:
        """SIGTERM, then SIGKILL after ``timeout_s``; returns the exit status.

        A process that had to be killed gets the end of its log printed to stderr: a CI run
        that fails here then shows which step the process was stuck in.
        """
        killed = False
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout_s)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(5)
                killed = True
        self._log.close()
        if killed:
            lines = self.tail()
            err_console.print(
                f"the {self.name} did not stop within {timeout_s:g}s of SIGTERM and was killed; "
                f"the last {len(lines)} lines of its log ({self.log_path}):",
                markup=False,
                highlight=False,
                soft_wrap=True,
            )
            for line in lines:
                err_console.print("  " + line, markup=False, highlight=False, soft_wrap=True)
        return self.proc.returncode


async def _wait_ready(cfg: Settings, procs: list[_Process]) -> None:
    client: Any = aioredis.from_url(cfg.redis_url)  # type: ignore[no-untyped-call]
    deadline = time.monotonic() + READY_TIMEOUT_S
    try:
        while True:
            for p in procs:
                p.check_alive()
            worker = await client.get(cfg.queue_name + HEALTH_CHECK_SUFFIX)
            leader = await client.get(cfg.scheduler_leader_key)
            if worker is not None and leader is not None:
                return
            if time.monotonic() > deadline:
                raise RuntimeError(f"the worker or the scheduler did not report in {READY_TIMEOUT_S:g}s")
            await asyncio.sleep(0.2)
    finally:
        await client.aclose()


def _tenant_keys(provider: str, n: int) -> list[tuple[str, str]]:
    make = DEMO_KEYS[provider]
    return [(f"tenant-{i:05d}", make()) for i in range(1, n + 1)]


def _replicas_line(cfg: Settings) -> str | None:
    """What to say about replicas when the status command shows no region table."""
    if replication.parse_regions(cfg):
        return None  # `status` printed the regions' table
    return "replicas: not configured (no KEYROTOR_REGIONS; docs/replication.md)"


async def _rotate_all(cfg: Settings, worker: _Process) -> None:
    async with KeyrotorClient(cfg) as client:
        handles = {scope: await client.rotate(scope, trigger="cli") for scope in DEMO_KEYS}
        with progress() as bar:
            tasks = {scope: bar.add_task(f"rotating {scope}", total=None) for scope in handles}

            async def follow(scope: str) -> RunInfo:
                def update(r: RunInfo) -> None:
                    worker.check_alive()
                    bar.update(
                        tasks[scope], completed=r.rows_done, total=max(r.rows_total or 0, r.rows_done, 1)
                    )

                return await handles[scope].wait(ROTATE_TIMEOUT_S, poll_s=0.1, on_progress=update)

            done = await asyncio.gather(*(follow(s) for s in handles))
    for r in done:
        line = f"run {r.id}: {r.scope} v{r.from_version} -> v{r.to_version}: {r.state}, {r.rows_done} row(s)"
        err_console.print(("[green]" if r.state == "completed" else "[red]") + line)
        if r.state != "completed":
            raise RuntimeError(f"rotation of {r.scope} {r.state}: {r.error or 'no reason recorded'}")


def _scrape(port: int) -> list[str]:
    wanted = (
        "keyrotor_rotations_completed_total",
        "keyrotor_rows_reencrypted_total",
        "keyrotor_arq_jobs_total",
    )
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as resp:
        text = resp.read().decode()
    return [line for line in text.splitlines() if line.startswith(wanted)]


async def _audit_excerpt(cfg: Settings, n: int) -> tuple[list[str], int]:
    """The newest ``n`` audit events, leaving out the per-tenant demo keys' ``encrypt`` events
    (thousands of them would hide the rotations); returns the lines and how many were left out."""
    engine = db.create_engine(cfg.database_url, pool_size=1)
    try:
        async with db.transaction(db.sessionmaker(engine)) as session:
            ids = await ops.newest_audit_ids_but_demo_bulk(session, n)
            skipped = await ops.count_demo_bulk_after(session, min(ids)) if ids else 0
            events = [
                e
                for i in sorted(ids)
                for e in await query_events(session, AuditQuery(after_id=i - 1, limit=1))
            ]
    finally:
        await engine.dispose()
    return [event_line(e) for e in events], skipped


async def _store_demo_keys(url: str, rows: int) -> None:
    """Steps 1 and 2: the schema, then each provider's demo key (read back) and its tenants' keys."""
    if await db.ensure_database(url):
        err_console.print("created the database")
    engine = db.create_engine(url)
    try:
        await db.upgrade(engine)
    finally:
        await engine.dispose()
    err_console.print("[bold]1.[/bold] schema is up to date")
    async with manager() as km:
        for provider, make in DEMO_KEYS.items():
            value = make()
            await km.put_secret(provider, "demo", value)
            back = await km.get_secret(provider, "demo")
            if back != value:
                raise RuntimeError(f"{provider}/demo did not read back")
            err_console.print(f"[bold]2.[/bold] stored and read back {provider}/demo = {_masked(value)}")
            if rows:
                await km.put_secrets(provider, _tenant_keys(provider, rows))
                err_console.print(f"   and {rows} per-tenant {provider} keys ({provider}/tenant-00001 ...)")


def _start_processes(procs: list[_Process], log_dir: Path, port: int) -> None:
    """Step 3: a worker (metrics on ``port``, small batches so the bar moves) and a fast-scanning
    scheduler, appended to ``procs`` as they start so the caller stops whichever did."""
    base = {**os.environ, "KEYROTOR_LOG_FORMAT": "json"}
    worker_env = {
        **base,
        "KEYROTOR_METRICS_PORT": str(port),
        "KEYROTOR_METRICS_HOST": "127.0.0.1",
        "KEYROTOR_REENCRYPT_BATCH_ROWS": str(DEMO_BATCH_ROWS),
    }
    sched_env = {**base, "KEYROTOR_METRICS_PORT": "0", "KEYROTOR_SCAN_INTERVAL_SECONDS": "2"}
    procs.append(_Process("worker", ["worker"], worker_env, log_dir))
    procs.append(_Process("scheduler", ["scheduler"], sched_env, log_dir))
    err_console.print(
        f"[bold]3.[/bold] started a worker (pid {procs[0].proc.pid}, metrics on 127.0.0.1:{port}) "
        f"and a scheduler (pid {procs[1].proc.pid}); logs in {log_dir}"
    )


def _show_results(cfg: Settings, port: int) -> None:
    """Step 5: the status table, the replicas, the worker's counters and the audit excerpt."""
    err_console.print("[bold]5.[/bold] status:")
    status(scope=None, json_out=False)
    replicas = _replicas_line(cfg)
    if replicas is not None:
        out_console.print(replicas)
    with contextlib.suppress(OSError):
        out_console.print("worker metrics (excerpt):")
        for line in _scrape(port):
            out_console.print("  " + line, markup=False, highlight=False)
    lines, skipped = run(lambda: _audit_excerpt(cfg, 10))
    out_console.print(
        "audit log (last 10 events"
        + (f"; {skipped} encrypt events of the tenant keys among them left out" if skipped else "")
        + "):"
    )
    for line in lines:
        out_console.print("  " + line, markup=False, highlight=False)


def _stop(procs: list[_Process]) -> None:
    """Step 6: SIGTERM each process, the scheduler first, and wait for it."""
    codes = {p.name: p.stop() for p in reversed(procs)}
    if codes:
        err_console.print(
            "[bold]6.[/bold] stopped: " + ", ".join(f"{name} exit {code}" for name, code in codes.items())
        )


def demo(
    store_only: Annotated[
        bool, typer.Option("--no-processes", help="only store the keys and show the status")
    ] = False,
    rows: Annotated[
        int, typer.Option("--rows", min=0, max=100_000, help="per-tenant demo keys stored in each scope")
    ] = DEFAULT_ROWS,
) -> None:
    """Migrate, store demo API keys, start a worker and a scheduler, rotate, show status and audit, stop."""
    cfg = settings()
    run(lambda: _store_demo_keys(cfg.database_url, rows))
    if store_only:
        status(scope=None, json_out=False)
        return
    log_dir = Path(tempfile.mkdtemp(prefix="keyrotor-demo-"))
    port = _free_port()
    procs: list[_Process] = []
    try:
        _start_processes(procs, log_dir, port)
        run(lambda: _wait_ready(cfg, procs))
        err_console.print("   both reported in (arq health-check key, scheduler leader heartbeat)")
        err_console.print("[bold]4.[/bold] rotating every demo scope's DEK on demand:")
        run(lambda: _rotate_all(cfg, procs[0]))
        _show_results(cfg, port)
    finally:
        _stop(procs)
