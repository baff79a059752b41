"""Driver errors are sorted once (``db.wrap_exceptions``): transient ones retry, the rest fail runs."""

from __future__ import annotations

import pytest
from sqlalchemy import text

from keyrotor.errors import PermanentError, StoreBusy, StoreRejected, TransientError
from keyrotor.store import db

KEY_LIKE = "sk-ant-api03-" + "Zq9" * 12


async def test_database_errors_are_permanent_or_transient_and_never_echo_a_value(database_url: str) -> None:
    engine = db.create_engine(database_url)
    sessions = db.sessionmaker(engine)
    try:
        refused = [
            ("SELECT CAST(:x AS int)", {"x": KEY_LIKE}, "22000"),  # asyncpg cannot encode the argument
            ("SELECT 2147483647::int + 1", {}, "22003"),  # what an int4 key met: out of range
            ("SELECT no_such_column FROM key_scopes", {}, "42703"),  # a statement that cannot work
            ("SELECT CAST(CAST(:x AS text) AS uuid)", {"x": KEY_LIKE}, "22P02"),  # the server echoes it
        ]
        for sql, params, state in refused:
            with pytest.raises(StoreRejected) as caught:
                async with db.transaction(sessions) as session:
                    await session.execute(text(sql), params)
            assert isinstance(caught.value, PermanentError)
            message = str(caught.value)
            assert f"SQLSTATE {state}" in message and "\n" not in message
            assert "Zq9Zq9" not in message, message
        # The raw asyncpg connection under a session (the batch statements' path) is sorted alike.
        with pytest.raises(StoreRejected, match="out of int32 range"):
            async with db.transaction(sessions) as session:
                apg = (await (await session.connection()).get_raw_connection()).driver_connection
                assert apg is not None
                await apg.fetch("SELECT 1 WHERE 1::int > $1", -(2**63))
        with pytest.raises(StoreBusy, match="57014") as busy:
            async with db.transaction(sessions) as session:
                await session.execute(text("SET LOCAL statement_timeout = 20"))
                await session.execute(text("SELECT pg_sleep(2)"))
        assert isinstance(busy.value, TransientError)
    finally:
        await engine.dispose()
