"""A protected step (:func:`keyrotor.rotation.context.run_to_commit`) cancelled a second time,
as a stopping worker does once its grace is over, is reported rolled back only when it never sent
COMMIT: once COMMIT went out the server may have applied it, and the step's outcome is unknown."""

from __future__ import annotations

import asyncio
import time
from collections.abc import MutableMapping
from typing import Any

import asyncpg
import pytest
from sqlalchemy import text
from structlog.testing import capture_logs

from keyrotor.rotation.context import run_to_commit
from keyrotor.store import db
from tests.rotation_helpers import fetch

SLOW_COMMIT = """
CREATE TABLE slow_commit (id int);
CREATE FUNCTION slow_commit() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN PERFORM pg_sleep(3); RETURN NULL; END $$;
CREATE CONSTRAINT TRIGGER slow_commit AFTER INSERT ON slow_commit
  DEFERRABLE INITIALLY DEFERRED FOR EACH ROW EXECUTE FUNCTION slow_commit();
"""


async def _cancel_twice_during(
    database_url: str, sql_running: str, statement: str
) -> list[MutableMapping[str, Any]]:
    """Run a protected step (one transaction: ``statement``, then COMMIT), cancel it once and
    then again once a backend runs ``sql_running``; return its ``protected_step_cancelled`` lines."""
    engine = db.create_engine(database_url)
    maker = db.sessionmaker(engine)

    async def step() -> None:
        async with db.transaction(maker) as session:
            await session.execute(text(statement))

    try:
        with capture_logs() as logs:
            task = asyncio.ensure_future(run_to_commit(step()))
            deadline = time.monotonic() + 10
            while not (
                await fetch(
                    database_url,
                    "SELECT count(*) FROM pg_stat_activity WHERE state = 'active' AND query ILIKE $1",
                    sql_running,
                )
            )[0][0]:
                assert time.monotonic() < deadline, f"no backend ran {sql_running}"
                await asyncio.sleep(0.02)
            task.cancel()  # the first cancellation: the step goes on
            await asyncio.sleep(0.2)
            assert not task.done()
            task.cancel()  # the second: the step is cancelled too
            with pytest.raises(asyncio.CancelledError):
                await asyncio.wait_for(task, 10)
    finally:
        await engine.dispose()
    return [e for e in logs if e["event"] == "protected_step_cancelled"]


async def test_a_step_cancelled_after_its_commit_was_sent_is_never_reported_rolled_back(
    database_url: str,
) -> None:
    admin = await asyncpg.connect(database_url)
    try:
        await admin.execute(SLOW_COMMIT)
    finally:
        await admin.close()
    # Cancelled while its COMMIT runs (a deferred trigger makes it take 3 s): possibly committed.
    during_commit = await _cancel_twice_during(database_url, "COMMIT%", "INSERT INTO slow_commit VALUES (1)")
    assert [e["outcome"] for e in during_commit] == ["unknown"]
    # Cancelled before COMMIT: rolled back, and nothing of it is there.
    before_commit = await _cancel_twice_during(
        database_url, "%pg_sleep(30)%", "INSERT INTO slow_commit SELECT 2 FROM pg_sleep(30)"
    )
    assert [e["outcome"] for e in before_commit] == ["rolled_back"]
    ids = await fetch(database_url, "SELECT id FROM slow_commit")
    assert 2 not in [r["id"] for r in ids]
