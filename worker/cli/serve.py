"""``keyrotor serve [--host] [--port]``: the HTTP API (keyrotor.api)."""

from __future__ import annotations

import asyncio
from typing import Annotated

import typer

from keyrotor.worker.cli.common import err_console, settings
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
) -> None:
    """Serve the HTTP API: encrypt, decrypt, secrets, rotate, runs, status; bearer tokens from
    `keyrotor tokens create`. Several processes may serve one database behind a load balancer."""
    # aiohttp and the API are imported here, not by every command of the CLI.
    from keyrotor.api.app import serve as run_server

    s = settings()
    configure_logging(s)

    def ready(url: str) -> None:
        err_console.print(f"keyrotor API on {url} (bearer token required)", highlight=False)

    asyncio.run(
        run_server(s, host=host or s.api_host, port=s.api_port if port is None else port, ready=ready)
    )
