"""Helpers shared by the CLI commands: settings, the KeyManager, JSON and progress output."""

from __future__ import annotations

import asyncio
import json
import sys
from collections.abc import Callable, Coroutine
from typing import Annotated, Any, TypeVar

import typer
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

from keyrotor import KeyManager, Settings

T = TypeVar("T")

# Checked by the command itself (keyrotor.runs.check_request_id) before anything is written.
RequestIdOpt = Annotated[
    str | None,
    typer.Option(
        "--request-id",
        help="your correlation id (1-128 of A-Za-z0-9._:/@-): kept on the run, on its jobs' log "
        "events and its audit events",
    ),
]

# Tables and progress go to stderr, so stdout stays clean for values and --json.
err_console = Console(stderr=True)
out_console = Console()


def settings() -> Settings:
    """Settings from the environment (read once per command)."""
    return Settings.from_env()


def run(fn: Callable[[], Coroutine[Any, Any, T]]) -> T:
    """Run one coroutine for a command."""
    return asyncio.run(fn())


def manager() -> KeyManager:
    """A KeyManager from the environment; use with ``async with``.

    It does not log the open-default-grant warning: a command's stderr is its own result or one
    error line, and ``status``/``health`` report the grant.
    """
    km = KeyManager(settings())
    km.warn_open_grants = False
    return km


def print_json(data: Any) -> None:
    """Machine-readable output: one JSON document on stdout."""
    sys.stdout.write(json.dumps(data, indent=2, sort_keys=False, default=str) + "\n")


def progress(*, transient: bool = False) -> Progress:
    """A progress bar on stderr (hidden when stderr is not a terminal)."""
    return Progress(
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TimeRemainingColumn(),
        console=err_console,
        transient=transient,
        disable=not err_console.is_terminal,
    )
