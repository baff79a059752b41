"""Helpers shared by the CLI commands: settings, the KeyManager, JSON and progress output."""

from __future__ import annotations

import asyncio
import errno
import json
import logging
import os
import re
import socket
import sys
from collections.abc import Callable, Coroutine
from typing import Annotated, Any, NoReturn, TypeVar
from urllib.parse import urlsplit

import typer
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

from keyrotor import KeyManager, Settings
from keyrotor.errors import ConfigurationError, InvalidInput, KeyrotorError, NotFound, StoreUnavailable
from keyrotor.worker.logs import configure_logging

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


def fail(message: str, code: int) -> NoReturn:
    """One line on stderr (``keyrotor: error: ...``) and exit ``code``."""
    print(f"keyrotor: error: {message}", file=sys.stderr)
    raise SystemExit(code)


def fail_with(exc: Exception) -> NoReturn:
    """End the command (or a process it started) on ``exc`` as the CLI does: one line and exit 2
    for bad input or configuration, 1 for a failed operation; never a traceback (but with
    ``KEYROTOR_DEBUG`` set, an unexpected error is raised again)."""
    if isinstance(exc, InvalidInput | NotFound | ConfigurationError):
        fail(str(exc), 2)
    if isinstance(exc, KeyrotorError):
        # A database error the user fixes with one command (no database, no schema) comes
        # through the store as StoreRejected: say what to run, as a usage error.
        fix = database_hint(exc)
        if fix is not None:
            fail(fix, 2)
        if isinstance(exc, StoreUnavailable) and str(exc).startswith("database unavailable"):
            # The library's message names the driver's error only; here the database is the one
            # DATABASE_URL names (the variable, not the URL: it may carry a password).
            fail(f"{exc}: check that PostgreSQL is running and DATABASE_URL points at it", 1)
        fail(str(exc), 1)
    if os.environ.get("KEYROTOR_DEBUG"):
        raise exc
    fix = database_hint(exc)
    if fix is not None:
        fail(fix, 2)
    # An unexpected error's message may quote data; print its type only.
    fail(f"unexpected {type(exc).__name__} (set KEYROTOR_DEBUG=1 for the traceback)", 1)


# Why a server cannot take its address: another process holds the port, the address is not
# this host's, or the port is privileged. Anything else is not the address's fault.
_LISTEN_ERRNOS = {errno.EADDRINUSE, errno.EADDRNOTAVAIL, errno.EACCES}


def listen_error(host: str, port: int, exc: OSError) -> ConfigurationError | None:
    """The one-line error for a server that could not listen on ``host:port`` because of the
    address (busy, not this host's, privileged, a name that does not resolve), else None."""
    if isinstance(exc, socket.gaierror):
        reason = f"the host name does not resolve ({exc.strerror})"
    elif exc.errno in _LISTEN_ERRNOS:
        # The errno's own text: asyncio's strerror repeats the address in its own words.
        reason = os.strerror(exc.errno).lower()
    else:
        return None
    return ConfigurationError(f"cannot listen on {host}:{port}: {reason}")


# Postgres errors a user fixes with configuration or one command, by SQLSTATE.
_DATABASE_HINTS = {
    "3D000": "the database in DATABASE_URL does not exist: `keyrotor db upgrade` creates it",
    "42P01": "the database has no keyrotor schema (or an older one): run `keyrotor db upgrade`",
    "42703": "the database's keyrotor schema is older than this keyrotor: run `keyrotor db upgrade`",
    "28P01": "Postgres refused the credentials in DATABASE_URL",
    "28000": "Postgres refused the role or host of DATABASE_URL (pg_hba.conf)",
}


def database_hint(exc: BaseException) -> str | None:
    """A one-line explanation for a database error a user can fix, found anywhere in the chain."""
    seen: set[int] = set()
    todo: list[BaseException | None] = [exc]
    while todo:
        e = todo.pop()
        if e is None or id(e) in seen:
            continue
        seen.add(id(e))
        code = getattr(e, "sqlstate", None) or getattr(e, "pgcode", None)
        if code == "3D000":
            return _missing_database(str(e))
        if isinstance(code, str) and code in _DATABASE_HINTS:
            return _DATABASE_HINTS[code]
        orig = getattr(e, "orig", None)
        todo += [e.__cause__, e.__context__, orig if isinstance(orig, BaseException) else None]
    return None


def _missing_database(message: str) -> str:
    """The hint for SQLSTATE 3D000: ``db upgrade`` creates DATABASE_URL's database, but a command
    that also connects to the secondary regions may have missed one of theirs instead."""
    named = re.search(r'database "([^"]+)" does not exist', message)
    try:
        ours = urlsplit(Settings.from_env().database_url).path.lstrip("/")
    except (KeyrotorError, ValueError):
        ours = None
    if named is None or ours is None or named.group(1) == ours:
        return _DATABASE_HINTS["3D000"]
    return (
        f"the database {named.group(1)!r} does not exist; it is not DATABASE_URL's: "
        "a secondary region's database is created by `keyrotor replicas init`"
    )


def settings() -> Settings:
    """Settings from the environment (read once per command)."""
    return Settings.from_env()


def logs_to_stderr(settings: Settings, *, from_level: int = logging.NOTSET) -> None:
    """Send this command's log events to stderr, formatted and redacted as a worker's are, and
    only those at ``from_level`` or above (default: the ``KEYROTOR_LOG_LEVEL`` filter alone).

    A command's stdout is its result (a value, a table, ``--json``); the events the library
    logs while it runs (a refused retirement, a run's batches) must not land in it.
    """
    configure_logging(settings)
    for handler in logging.getLogger().handlers:
        if isinstance(handler, logging.StreamHandler) and handler.stream in (sys.stdout, sys.stderr):
            handler.setStream(sys.stderr)
            handler.setLevel(from_level)


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
