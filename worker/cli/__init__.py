"""The ``keyrotor`` command line.

Each command group lives in its own module and is registered here. Every command runs one
coroutine with ``asyncio.run``; keyrotor's typed errors become a one-line message and a
non-zero exit (1 for a failed operation, 2 for bad usage), never a traceback.
"""

from __future__ import annotations

import logging
import os

import typer

from keyrotor.audit import key as audit_key
from keyrotor.errors import ConfigurationError
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
from keyrotor.worker.cli.common import fail, fail_with, logs_to_stderr

app = typer.Typer(
    name="keyrotor",
    help="Envelope encryption for AI-provider API keys, and the worker that rotates their keys.",
    no_args_is_help=True,
    pretty_exceptions_enable=False,
    add_completion=False,
)
# Processes whose log is their output, on stdout (each configures it itself).
_LOGGING_ON_STDOUT = {"worker", "scheduler", "serve"}


@app.callback()
def _one_command(ctx: typer.Context) -> None:
    # Every other command keeps stdout for its result and stderr for its one error line: the
    # library's events go to stderr, and only errors unless the operator set a log level (a
    # refused retirement's warning would repeat the error line).
    if ctx.invoked_subcommand in _LOGGING_ON_STDOUT:
        return
    try:
        s = Settings.from_env()
    except ConfigurationError:
        return  # a command that needs the settings reports them itself; keygen does not
    logs_to_stderr(s, from_level=logging.NOTSET if "KEYROTOR_LOG_LEVEL" in os.environ else logging.ERROR)


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
        fail("aborted", 130)
    except typer.TyperException as exc:
        # Usage errors (typer vendors click; its ClickException derives from TyperException):
        # one line, like every other error, pointing at the command's help.
        message = exc.format_message()
        if not message:  # a group called bare: click has printed its help already
            raise SystemExit(exc.exit_code) from None
        ctx = getattr(exc, "ctx", None)
        see = f" (see `{ctx.command_path} --help`)" if ctx is not None else ""
        fail(f"{message}{see}", exc.exit_code)
    except KeyboardInterrupt:
        fail("interrupted", 130)
    except Exception as exc:
        fail_with(exc)
