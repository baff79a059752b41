"""``keyrotor demo``: the main job end to end on a local PostgreSQL and Redis."""

from __future__ import annotations

import secrets
import string

from keyrotor.store import db
from worker.cli.common import err_console, manager, run, settings
from worker.cli.status import status

DEMO_KEYS = {
    "openai": lambda: "sk-proj-" + _random(48),
    "anthropic": lambda: "sk-ant-api03-" + _random(95),
    "google": lambda: "AIza" + _random(35),
}


def _random(n: int) -> str:
    alphabet = string.ascii_letters + string.digits + "-_"
    return "".join(secrets.choice(alphabet) for _ in range(n))


def _masked(value: str) -> str:
    return value[:7] + "…" + f"({len(value)} chars)"


def demo() -> None:
    """Create the schema, store demo API keys for openai, anthropic and google, and show the status."""
    url = settings().database_url

    async def go() -> None:
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
                assert back == value
                err_console.print(f"[bold]2.[/bold] stored and read back {provider}/demo = {_masked(value)}")

    run(go)
    err_console.print("[bold]3.[/bold] status:")
    status(scope=None, json_out=False)
