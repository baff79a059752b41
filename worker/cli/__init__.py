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

from keyrotor.audit import key as audit_key
from keyrotor.errors import ConfigurationError, InvalidInput, KeyrotorError, NotFound
from keyrotor.kek.factory import open_provider
from keyrotor.settings import Settings
from keyrotor.worker.cli import audit as audit_cmd
from keyrotor.worker.cli import columns as columns_cmd
from keyrotor.worker.cli import db as db_cmd
from keyrotor.worker.cli import demo as demo_cmd
from keyrotor.worker.cli import health as health_cmd
from keyrotor.worker.cli import kek as kek_cmd
from keyrotor.worker.cli import keys as keys_cmd
from keyrotor.worker.cli import legacy as legacy_cmd
from keyrotor.worker.cli import lockdown as lockdown_cmd
from keyrotor.worker.cli import policy as policy_cmd
from keyrotor.worker.cli import replicas as replicas_cmd
from keyrotor.worker.cli import rotate as rotate_cmd
from keyrotor.worker.cli import scheduler as scheduler_cmd
from keyrotor.worker.cli import secrets as secrets_cmd
from keyrotor.worker.cli import serve as serve_cmd
from keyrotor.worker.cli import status as status_cmd
from keyrotor.worker.cli import tokens as tokens_cmd

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
app.add_typer(keys_cmd.app, name="keys")
app.add_typer(tokens_cmd.app, name="tokens")
status_cmd.register(app)
app.command("demo")(demo_cmd.demo)
audit_cmd.register(app)
rotate_cmd.register(app)
policy_cmd.register(app)
scheduler_cmd.register(app)
health_cmd.register(app)
kek_cmd.register(app)
replicas_cmd.register(app)
lockdown_cmd.register(app)
serve_cmd.register(app)


def _fail(message: str, code: int) -> NoReturn:
    print(f"keyrotor: error: {message}", file=sys.stderr)
    raise SystemExit(code)


# Postgres errors a user fixes with configuration or one command, by SQLSTATE.
_DATABASE_HINTS = {
    "3D000": "the database in DATABASE_URL does not exist: `keyrotor db upgrade` creates it",
    "42P01": "the database has no keyrotor schema (or an older one): run `keyrotor db upgrade`",
    "42703": "the database's keyrotor schema is older than this keyrotor: run `keyrotor db upgrade`",
    "28P01": "Postgres refused the credentials in DATABASE_URL",
    "28000": "Postgres refused the role or host of DATABASE_URL (pg_hba.conf)",
}


def _database_hint(exc: BaseException) -> str | None:
    """A one-line explanation for a database error a user can fix, found anywhere in the chain."""
    seen: set[int] = set()
    todo: list[BaseException | None] = [exc]
    while todo:
        e = todo.pop()
        if e is None or id(e) in seen:
            continue
        seen.add(id(e))
        code = getattr(e, "sqlstate", None) or getattr(e, "pgcode", None)
        if isinstance(code, str) and code in _DATABASE_HINTS:
            return _DATABASE_HINTS[code]
        orig = getattr(e, "orig", None)
        todo += [e.__cause__, e.__context__, orig if isinstance(orig, BaseException) else None]
    return None


def main(argv: list[str] | None = None) -> None:
    """Entry point of the ``keyrotor`` console script."""
    # Commands that append audit events without a KeyManager (grant, prune, policy, ...) load
    # the audit chain's key through the KEK when they first need it.
    audit_key.set_kek_opener(lambda: open_provider(Settings.from_env()))
    try:
        _run(argv)
    finally:
        # The opener is this command's: a process that calls main() in-process (tests, an
        # embedding application) must not keep reading ENCRYPTION_KEY from its environment.
        audit_key.set_kek_opener(None)


def _run(argv: list[str] | None) -> None:
    try:
        # With standalone_mode=False click returns the code of a `typer.Exit` instead of exiting.
        code = app(args=argv, standalone_mode=False)
        if isinstance(code, int) and code:
            raise SystemExit(code)
    except typer.Abort:
        _fail("aborted", 130)
    except typer.TyperException as exc:
        # Usage errors (typer vendors click; its ClickException derives from TyperException):
        # one line, like every other error, pointing at the command's help.
        message = exc.format_message()
        if not message:  # a group called bare: click has printed its help already
            raise SystemExit(exc.exit_code) from None
        ctx = getattr(exc, "ctx", None)
        see = f" (see `{ctx.command_path} --help`)" if ctx is not None else ""
        _fail(f"{message}{see}", exc.exit_code)
    except (InvalidInput, NotFound, ConfigurationError) as exc:
        _fail(str(exc), 2)
    except KeyrotorError as exc:
        # A database error the user fixes with one command (no database, no schema) comes
        # through the store as StoreRejected: say what to run, as a usage error.
        fix = _database_hint(exc)
        if fix is not None:
            _fail(fix, 2)
        _fail(str(exc), 1)
    except KeyboardInterrupt:
        _fail("interrupted", 130)
    except Exception as exc:
        if os.environ.get("KEYROTOR_DEBUG"):
            raise
        fix = _database_hint(exc)
        if fix is not None:
            _fail(fix, 2)
        # An unexpected error's message may quote data; print its type only.
        _fail(f"unexpected {type(exc).__name__} (set KEYROTOR_DEBUG=1 for the traceback)", 1)


if __name__ == "__main__":  # pragma: no cover
    main()
