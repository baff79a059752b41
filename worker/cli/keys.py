"""``keyrotor keys``: what an operator does to one DEK version by hand."""

from __future__ import annotations

from typing import Annotated

import typer

from keyrotor.inputs import check_scope
from keyrotor.queue.client import KeyrotorClient
from keyrotor.rotation.destruction import Restored
from keyrotor.worker.cli.common import err_console, print_json, run, settings

app = typer.Typer(help="One DEK version: bring a retired one back.")


@app.command("restore")
def restore(
    scope: Annotated[str, typer.Argument(help="the scope")],
    version: Annotated[int, typer.Argument(help="the retired DEK version", min=1)],
    actor: Annotated[
        str | None,
        typer.Option("--as", help="who restores it, for the audit log (default KEYROTOR_DEFAULT_ACTOR)"),
    ] = None,
    json_out: Annotated[bool, typer.Option("--json", help="print JSON for scripts")] = False,
) -> None:
    """Bring a retired DEK version back to grace (its pending destruction is cancelled)."""
    check_scope(scope)

    async def go() -> Restored:
        async with KeyrotorClient(settings()) as client:
            return await client.restore(scope, version, actor=actor)

    done = run(go)
    if json_out:
        print_json(done.as_dict())
        return
    err_console.print(
        f"{scope} v{version} restored to grace until {done.grace_until.isoformat()[:19]} "
        "(it decrypts; the scheduler retires it again after that if nothing needs it)"
    )
