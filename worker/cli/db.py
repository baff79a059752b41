"""``keyrotor db``: the schema."""

from __future__ import annotations

import typer

from keyrotor.store import db
from keyrotor.worker.cli.common import err_console, run, settings

app = typer.Typer(help="Database schema.", no_args_is_help=True)


@app.command("upgrade")
def upgrade() -> None:
    """Create the database if missing and apply every migration."""
    url = settings().database_url

    async def go() -> set[str]:
        created = await db.ensure_database(url)
        if created:
            err_console.print("created database")
        engine = db.create_engine(url)
        try:
            await db.upgrade(engine)
            return await db.current_revisions(engine)
        finally:
            await engine.dispose()

    revisions = run(go)
    err_console.print(f"schema at {', '.join(sorted(revisions))}")
