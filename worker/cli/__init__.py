"""The ``keyrotor`` command line.

Each command group lives in its own module and is registered here. Every command runs one
coroutine with ``asyncio.run``; keyrotor's typed errors become a one-line message and a
non-zero exit (1 for a failed operation, 2 for bad usage), never a traceback.
"""

from __future__ import annotations

import os
import sys
from typing import NoReturn

import typer

from keyrotor.errors import ConfigurationError, InvalidInput, KeyrotorError, NotFound
from worker.cli import audit as audit_cmd
from worker.cli import columns as columns_cmd
from worker.cli import db as db_cmd
from worker.cli import demo as demo_cmd
from worker.cli import health as health_cmd
from worker.cli import kek as kek_cmd
from worker.cli import legacy as legacy_cmd
from worker.cli import policy as policy_cmd
from worker.cli import replicas as replicas_cmd
from worker.cli import rotate as rotate_cmd
from worker.cli import scheduler as scheduler_cmd
from worker.cli import secrets as secrets_cmd
from worker.cli import status as status_cmd

app = typer.Typer(
    name="keyrotor",
    help="Envelope encryption for AI-provider API keys, and the worker that rotates their keys.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)
app.add_typer(db_cmd.app, name="db")
app.add_typer(secrets_cmd.app, name="secrets")
app.add_typer(columns_cmd.app, name="columns")
app.add_typer(legacy_cmd.app, name="legacy")
status_cmd.register(app)
app.command("demo")(demo_cmd.demo)
audit_cmd.register(app)
rotate_cmd.register(app)
policy_cmd.register(app)
scheduler_cmd.register(app)
health_cmd.register(app)
kek_cmd.register(app)
replicas_cmd.register(app)


def _fail(message: str, code: int) -> NoReturn:
    print(f"keyrotor: error: {message}", file=sys.stderr)
    raise SystemExit(code)


def main(argv: list[str] | None = None) -> None:
    """Entry point of the ``keyrotor`` console script."""
    try:
        # With standalone_mode=False click returns the code of a `typer.Exit` instead of exiting.
        code = app(args=argv, standalone_mode=False)
        if isinstance(code, int) and code:
            raise SystemExit(code)
    except typer.Abort:
        _fail("aborted", 130)
    except typer.TyperException as exc:
        # Usage errors (typer vendors click; its ClickException derives from TyperException).
        show = getattr(exc, "show", None)
        if callable(show):
            show()
        else:
            print(f"keyrotor: error: {exc.format_message()}", file=sys.stderr)
        raise SystemExit(exc.exit_code) from None
    except (InvalidInput, NotFound, ConfigurationError) as exc:
        _fail(str(exc), 2)
    except KeyrotorError as exc:
        _fail(str(exc), 1)
    except KeyboardInterrupt:
        _fail("interrupted", 130)
    except Exception as exc:
        if os.environ.get("KEYROTOR_DEBUG"):
            raise
        # An unexpected error's message may quote data; print its type only.
        _fail(f"unexpected {type(exc).__name__} (set KEYROTOR_DEBUG=1 for the traceback)", 1)


if __name__ == "__main__":  # pragma: no cover
    main()
