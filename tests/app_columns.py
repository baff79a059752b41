"""An application's own tables of ciphertexts, as a README user keeps them, registered as columns.

Shared by the tests that read what keyrotor counts in them (dry runs, ``status``).
"""

from __future__ import annotations

import asyncpg

from keyrotor import KeyManager, Settings
from tests.cli_helpers import keyrotor

ROWS = 12


async def users_and_tenants(settings: Settings) -> None:
    """``users.api_key`` (``ROWS`` rows, every one in ``anthropic``) and ``tenant_keys.value``
    (the scope named by each row: two ``anthropic``, one ``openai``), with values sealed the
    README's way, plus one secret of keyrotor's own in ``anthropic``."""
    conn = await asyncpg.connect(settings.database_url)
    try:
        await conn.execute("CREATE TABLE users (id serial PRIMARY KEY, api_key text)")
        await conn.execute("CREATE TABLE tenant_keys (id uuid PRIMARY KEY, provider text, value text)")
        async with KeyManager(settings) as km:
            for i in range(1, ROWS + 1):
                token = await km.encrypt("anthropic", f"sk-ant-{i}", context=f"users.api_key:{i}")
                await conn.execute("INSERT INTO users (id, api_key) VALUES ($1, $2)", i, token)
            for i in range(3):
                pk = await conn.fetchval("SELECT gen_random_uuid()")
                scope = "anthropic" if i < 2 else "openai"
                token = await km.encrypt(scope, f"sk-{i}", context=f"tenant_keys.value:{pk}")
                await conn.execute("INSERT INTO tenant_keys VALUES ($1, $2, $3)", pk, scope, token)
            await km.put_secret("anthropic", "prod", "sk-ant-own")
    finally:
        await conn.close()


def register_both(env: dict[str, str]) -> None:
    """Register both tables' columns through the CLI, as the README does."""
    for args in (
        ("users.api_key", "--pk", "id", "--scope", "anthropic"),
        ("tenant_keys.value", "--pk", "id", "--scope-column", "provider"),
    ):
        res = keyrotor("columns", "register", *args, env=env)
        assert res.returncode == 0, res.stderr
