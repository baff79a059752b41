"""DATABASE_URL in the form providers hand out: libpq's ``sslmode`` is honoured, and what the
driver cannot take is a configuration error naming it, never an unexpected TypeError."""

from __future__ import annotations

import pytest
from sqlalchemy import text

from keyrotor.errors import ConfigurationError
from keyrotor.store import db


@pytest.mark.parametrize("mode", ["disable", "allow", "prefer"])
async def test_libpq_sslmode_connects(database_url: str, mode: str) -> None:
    # The local server has no TLS: these modes connect in plain text (require would refuse).
    engine = db.create_engine(f"{database_url}?sslmode={mode}")
    try:
        async with engine.connect() as conn:
            assert (await conn.execute(text("SELECT 1"))).scalar() == 1
    finally:
        await engine.dispose()


def test_sslmode_becomes_the_drivers_ssl_mode() -> None:
    url = db.async_url("postgresql://u:pw@db.example:5432/app?sslmode=verify-full")
    assert url.query == {"ssl": "verify-full"}


@pytest.mark.parametrize(
    ("query", "names"),
    [
        ("sslmode=bogus", "sslmode"),
        ("sslmode=require&ssl=disable", "sslmode"),
        ("sslrootcert=/etc/ca.pem", "PGSSLROOTCERT"),
        ("sslcert=/c.pem&sslkey=/k.pem", "PGSSLCERT"),
    ],
)
def test_what_the_driver_cannot_take_is_a_configuration_error(query: str, names: str) -> None:
    with pytest.raises(ConfigurationError) as info:
        db.async_url(f"postgresql://u:secret-pw@db.example/app?{query}")
    assert names in str(info.value) and "secret-pw" not in str(info.value)
