"""The SQLAlchemy models describe exactly the schema the migrations build.

``alembic revision --autogenerate`` diffs the models against a database: a table or index that
only a migration knows about would come out as a ``drop``, so every one must be declared.
"""

from __future__ import annotations

from typing import Any

from alembic.autogenerate import compare_metadata
from alembic.migration import MigrationContext
from sqlalchemy import Connection

from keyrotor.store import db, models


async def test_models_match_the_migrated_schema(database_url: str) -> None:
    engine = db.create_engine(database_url)
    try:

        def diff(sync: Connection) -> list[Any]:
            context = MigrationContext.configure(sync, opts={"compare_type": True})
            return list(compare_metadata(context, models.Base.metadata))

        async with engine.connect() as conn:
            assert await conn.run_sync(diff) == []
    finally:
        await engine.dispose()
