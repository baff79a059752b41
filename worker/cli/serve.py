"""``keyrotor serve [--host] [--port] [--workers N]``: the HTTP API (keyrotor.api)."""

from __future__ import annotations

import asyncio
import multiprocessing
import multiprocessing.connection
import signal
from multiprocessing.process import BaseProcess
from types import FrameType
from typing import Annotated

import typer

from keyrotor.worker.cli.common import err_console, fail_with, listen_error, settings
from keyrotor.worker.logs import configure_logging


def register(app: typer.Typer) -> None:
    app.command("serve")(serve)


def serve(
    host: Annotated[
        str | None,
        typer.Option("--host", help="address to listen on (default: KEYROTOR_API_HOST, 127.0.0.1)"),
    ] = None,
    port: Annotated[
        int | None,
        typer.Option("--port", min=0, max=65535, help="port to listen on (default: KEYROTOR_API_PORT, 8180)"),
    ] = None,
    workers: Annotated[
        int,
        typer.Option(
            "--workers",
            min=1,
            max=64,
            help="processes sharing the port (SO_REUSEPORT; Linux): one event loop each, for hosts "
            "with cores to spare beyond the database's",
        ),
    ] = 1,
) -> None:
    """Serve the HTTP API: encrypt, decrypt, secrets, rotate, runs, status; bearer tokens from
    `keyrotor tokens create`. Several processes may serve one database behind a load balancer."""
    s = settings()
    host = host or s.api_host
    port = s.api_port if port is None else port
    if workers == 1:
        _run(host, port, reuse_port=False, announce=True)
        return
    if port == 0:
        err_console.print("--workers needs a fixed --port (0 would give each process its own)")
        raise typer.Exit(2)
    raise typer.Exit(_supervise(host, port, workers))


def _run(host: str, port: int, *, reuse_port: bool, announce: bool) -> None:
    # aiohttp and the API are imported here, not by every command of the CLI.
    from keyrotor.api.app import serve as run_server

    s = settings()
    configure_logging(s)
    listening = False

    def ready(url: str) -> None:
        nonlocal listening
        listening = True
        if announce:
            err_console.print(f"keyrotor API on {url} (bearer token required)", highlight=False)

    try:
        asyncio.run(run_server(s, host=host, port=port, ready=ready, reuse_port=reuse_port))
    except OSError as exc:
        error = None if listening else listen_error(host, port, exc)
        if error is None:
            raise
        raise error from exc


def _serve_one(host: str, port: int, announce: bool) -> None:
    """One process of ``--workers``: it ends on an error as the command does, in one line and
    with the CLI's exit status (2 for a configuration mistake), never with a traceback."""
    try:
        _run(host, port, reuse_port=True, announce=announce)
    except Exception as exc:
        fail_with(exc)


def _supervise(host: str, port: int, workers: int) -> int:
    """Run ``workers`` serving processes on one port until SIGTERM/SIGINT or until one of them
    dies (then the others are stopped too, and the exit status says so: a supervisor such as
    systemd or Kubernetes restarts the whole set)."""
    spawn = multiprocessing.get_context("spawn")  # a fresh interpreter each: no inherited loop
    children: list[BaseProcess] = [
        spawn.Process(target=_serve_one, args=(host, port, n == 0)) for n in range(workers)
    ]
    stopping = False

    def stop(signum: int, frame: FrameType | None) -> None:
        nonlocal stopping
        stopping = True
        for child in children:
            if child.is_alive() and child.pid is not None:
                child.terminate()  # SIGTERM: each finishes its requests and flushes its audit

    signal.signal(signal.SIGTERM, stop)
    signal.signal(signal.SIGINT, stop)
    for child in children:
        child.start()
    pending, failed = list(children), 0
    while pending:
        multiprocessing.connection.wait([child.sentinel for child in pending])
        for child in [c for c in pending if not c.is_alive()]:
            pending.remove(child)
            child.join()
            if not stopping:
                failed = child.exitcode or 1
                err_console.print(f"keyrotor serve: a worker process exited ({child.exitcode}); stopping")
                stop(signal.SIGTERM, None)
    return failed if failed else 0 if stopping else 1
