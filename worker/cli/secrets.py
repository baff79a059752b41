"""``keyrotor secrets``: store, read and bulk-import values in keyrotor's ``secrets`` table."""

from __future__ import annotations

import getpass
import json
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Annotated, TextIO

import typer

from keyrotor import KeyManager
from keyrotor.errors import InvalidInput
from keyrotor.inputs import check_scope
from keyrotor.worker.cli.common import err_console, manager, print_json, progress, run

app = typer.Typer(help="Encrypted values in keyrotor's own table.", no_args_is_help=True)

IMPORT_BATCH = 2_000
MAX_LINE_CHARS = 1_048_576


@app.command("put")
def put(
    scope: Annotated[str, typer.Argument(help="e.g. anthropic or tenant-42/openai")],
    name: Annotated[str, typer.Argument(help="the secret's name within the scope")],
) -> None:
    """Store a value read from stdin (never from the command line, where `ps` would show it)."""
    if sys.stdin.isatty():
        value = getpass.getpass(f"value for {scope}/{name}: ")
    else:
        value = sys.stdin.read()
        # One trailing newline is what `echo` and here-strings add; the value is the rest.
        if value.endswith("\n"):
            value = value[:-1]
            if value.endswith("\r"):
                value = value[:-1]

    async def go() -> None:
        async with manager() as km:
            await km.put_secret(scope, name, value)

    run(go)
    err_console.print(f"stored {scope}/{name}")


@app.command("get")
def get(scope: str, name: str) -> None:
    """Print a decrypted value to stdout."""

    async def go() -> str:
        async with manager() as km:
            return await km.get_secret(scope, name)

    sys.stdout.write(run(go) + "\n")


@dataclass(frozen=True, slots=True)
class ImportRow:
    scope: str
    name: str
    value: str


def read_rows(stream: TextIO) -> Iterator[ImportRow]:
    """Parse JSON lines ``{"scope", "name", "value"}``; blank lines are skipped.

    Raises:
        InvalidInput: naming the line number and what is wrong (never the value).
    """
    lines = iter(stream)
    lineno = 0
    while True:
        try:
            line = next(lines)
        except StopIteration:
            return
        except UnicodeDecodeError:
            # A file is read as strict UTF-8; the error would otherwise escape as an untyped crash.
            raise InvalidInput(f"line {lineno + 1}: not valid UTF-8") from None
        lineno += 1
        if len(line) > MAX_LINE_CHARS:
            raise InvalidInput(f"line {lineno}: longer than {MAX_LINE_CHARS} characters")
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except (json.JSONDecodeError, UnicodeDecodeError):
            raise InvalidInput(f"line {lineno}: not valid JSON") from None
        if not isinstance(obj, dict):
            raise InvalidInput(f"line {lineno}: expected a JSON object")
        missing = [k for k in ("scope", "name", "value") if not isinstance(obj.get(k), str)]
        if missing:
            raise InvalidInput(f"line {lineno}: missing or non-text field(s): {', '.join(missing)}")
        for key in ("scope", "name", "value"):
            try:
                obj[key].encode("utf-8")
            except UnicodeEncodeError:  # lone surrogates (\ud800 in JSON): refused before any write
                raise InvalidInput(f"line {lineno}: {key} is not valid Unicode") from None
        try:
            check_scope(obj["scope"])
        except InvalidInput as exc:
            raise InvalidInput(f"line {lineno}: {exc}") from None
        if not obj["value"]:
            raise InvalidInput(f"line {lineno}: value is empty")
        yield ImportRow(obj["scope"], obj["name"], obj["value"])


def _open(path: str) -> TextIO:
    if path == "-":
        return sys.stdin
    p = Path(path)
    if not p.is_file():
        raise InvalidInput(f"{path}: no such file")
    return p.open(encoding="utf-8", errors="strict")


@app.command("import")
def import_(
    file: Annotated[
        str, typer.Argument(help="JSON lines file ({scope, name, value} a line), or - for stdin")
    ],
    json_out: Annotated[bool, typer.Option("--json", help="print a JSON summary")] = False,
) -> None:
    """Import values in batches. The whole file is validated before anything is written."""
    if file == "-":
        # stdin can be read once: keep it (validation needs a first pass).
        rows = list(read_rows(sys.stdin))
        total = len(rows)
        source: Iterator[ImportRow] = iter(rows)
    else:
        with _open(file) as fh:
            total = sum(1 for _ in read_rows(fh))  # pass 1: validate, count
        source = _stream(file)

    async def go() -> dict[str, int]:
        per_scope: dict[str, int] = {}
        async with manager() as km:
            with progress() as bar:
                task = bar.add_task("importing", total=total)
                batch: dict[str, list[tuple[str, str]]] = {}
                pending = 0
                for row in source:
                    batch.setdefault(row.scope, []).append((row.name, row.value))
                    pending += 1
                    if pending >= IMPORT_BATCH:
                        await _flush(km, batch, per_scope)
                        bar.advance(task, pending)
                        batch, pending = {}, 0
                await _flush(km, batch, per_scope)
                bar.advance(task, pending)
        return per_scope

    per_scope = run(go)
    if json_out:
        print_json({"imported": sum(per_scope.values()), "scopes": per_scope})
    else:
        err_console.print(f"imported {sum(per_scope.values())} values into {len(per_scope)} scope(s)")


def _stream(path: str) -> Iterator[ImportRow]:
    with _open(path) as fh:
        yield from read_rows(fh)


async def _flush(km: KeyManager, batch: dict[str, list[tuple[str, str]]], per_scope: dict[str, int]) -> None:
    for scope, items in batch.items():
        # A name repeated within one batch would hit ON CONFLICT twice in one statement;
        # the last value wins, as it would row by row.
        deduped = list(dict(items).items())
        per_scope[scope] = per_scope.get(scope, 0) + await km.put_secrets(scope, deduped)
