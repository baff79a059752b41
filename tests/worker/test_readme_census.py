"""The README's own example, followed as a new user would: values kept in an application table
that nobody registered survive rotation, ``retire --force-now`` and a scheduler scan past the
grace; registering the table lets retirement go on, and the key is destroyed only after the
destruction window, with every value still readable.

Real processes throughout: ``keyrotor worker``, ``keyrotor scheduler --once`` and the CLI.
"""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import asyncpg

from keyrotor import KeyManager, Settings
from tests.rotation_helpers import WorkerProcess, cleanup_queue, keyrotor, value_for, worker_env

SCOPE = "anthropic"
ROWS = 40


async def _store_users(settings: Settings) -> dict[int, str]:
    """The README's example: ciphertexts in the application's own ``users`` table."""
    conn = await asyncpg.connect(settings.database_url)
    try:
        await conn.execute("CREATE TABLE users (id serial PRIMARY KEY, api_key text)")
        rows = await conn.fetch(
            "INSERT INTO users (api_key) SELECT NULL FROM generate_series(1, $1) RETURNING id", ROWS
        )
        ids = [int(r[0]) for r in rows]
        plain = {i: value_for(SCOPE, i) for i in ids}
        async with KeyManager(settings) as km:
            for i, value in plain.items():
                token = await km.encrypt(SCOPE, value, context=f"users.api_key:{i}")
                await conn.execute("UPDATE users SET api_key = $1 WHERE id = $2", token, i)
            await km.put_secret(SCOPE, "prod", "sk-ant-api03-own-table-value")
    finally:
        await conn.close()
    return plain


async def _all_decrypt(settings: Settings, plain: dict[int, str]) -> set[int]:
    """Decrypt every users row as the application does; returns the DEK versions seen."""
    conn = await asyncpg.connect(settings.database_url)
    try:
        rows = await conn.fetch("SELECT id, api_key FROM users ORDER BY id")
    finally:
        await conn.close()
    versions = set()
    async with KeyManager(settings) as km:
        for i, token in rows:
            assert await km.decrypt(SCOPE, token, context=f"users.api_key:{i}") == plain[i]
            versions.add(int(token.split(":")[1]))
        assert await km.get_secret(SCOPE, "prod") == "sk-ant-api03-own-table-value"
    return versions


async def _key_state(url: str, version: int) -> str:
    conn = await asyncpg.connect(url)
    try:
        state = await conn.fetchval(
            "SELECT d.state FROM data_keys d JOIN key_scopes s ON s.id = d.scope_id "
            "WHERE s.name = $1 AND d.version = $2",
            SCOPE,
            version,
        )
    finally:
        await conn.close()
    return str(state)


async def _sql(url: str, query: str, *args: object) -> None:
    conn = await asyncpg.connect(url)
    try:
        await conn.execute(query, *args)
    finally:
        await conn.close()


async def _wait_run(url: str, kind: str, states: tuple[str, ...], timeout_s: float = 60) -> str:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        conn = await asyncpg.connect(url)
        try:
            state = await conn.fetchval(
                "SELECT state FROM rotations WHERE kind = $1 ORDER BY id DESC LIMIT 1", kind
            )
        finally:
            await conn.close()
        if state in states:
            return str(state)
        await asyncio.sleep(0.2)
    raise AssertionError(f"no {kind} run reached {states} within {timeout_s}s")


async def test_readme_example_values_in_an_unregistered_table_are_never_destroyed(
    env: dict[str, str], tmp_path: Path
) -> None:
    wenv = worker_env(env, KEYROTOR_SCAN_INTERVAL_SECONDS="1")
    settings = Settings.from_env(wenv)
    plain = await _store_users(settings)
    worker = WorkerProcess(wenv, tmp_path / "worker.log")
    try:
        await worker.wait_started()
        rotated = keyrotor("rotate", SCOPE, "--wait", "--timeout", "60", env=wenv)
        assert rotated.returncode == 0, rotated.stderr
        # Rotation cannot see an unregistered table: its rows stay on v1, and still open.
        assert await _all_decrypt(settings, plain) == {1}

        refused = keyrotor("retire", SCOPE, "1", "--force-now", env=wenv)
        assert refused.returncode == 1, refused.stdout + refused.stderr
        line = refused.stderr.strip()
        assert len(line.splitlines()) == 1 and "Traceback" not in refused.stderr
        assert "users.api_key" in line and "columns register" in line and "columns ignore" in line
        assert await _key_state(settings.database_url, 1) == "grace"

        # The scheduler, once the grace is over, tries the same and is refused the same way.
        await _sql(
            settings.database_url,
            "UPDATE data_keys SET grace_until = now() - interval '1 second' WHERE version = 1",
        )
        scan = keyrotor("scheduler", "--once", env=wenv)
        assert scan.returncode == 0, scan.stderr
        assert await _wait_run(settings.database_url, "retire", ("failed",)) == "failed"
        assert await _key_state(settings.database_url, 1) == "grace"
        status = keyrotor("status", SCOPE, "--json", env=wenv)
        assert status.returncode == 0, status.stderr
        assert "users.api_key" in status.stdout, status.stdout
        assert await _all_decrypt(settings, plain) == {1}

        # Registered, the table is covered: retirement re-encrypts its stragglers and proves.
        reg = keyrotor("columns", "register", "users.api_key", "--pk", "id", "--scope", SCOPE, env=wenv)
        assert reg.returncode == 0, reg.stderr
        retired = keyrotor("retire", SCOPE, "1", "--force-now", env=wenv)
        assert retired.returncode == 0, retired.stdout + retired.stderr
        assert await _key_state(settings.database_url, 1) == "retired"
        assert await _all_decrypt(settings, plain) == {2}

        # Destroyed only once the destruction window has passed, and nothing is lost.
        await _sql(
            settings.database_url,
            "UPDATE data_keys SET destroy_after = now() - interval '1 second', "
            "retired_at = now() - interval '31 days' WHERE version = 1",
        )
        scan = keyrotor("scheduler", "--once", env=wenv)
        assert scan.returncode == 0, scan.stderr
        deadline = time.monotonic() + 60
        while await _key_state(settings.database_url, 1) != "destroyed":
            assert time.monotonic() < deadline, "v1 was not destroyed after its window"
            await asyncio.sleep(0.2)
        assert await _all_decrypt(settings, plain) == {2}
    finally:
        worker.close()
        await cleanup_queue(wenv["KEYROTOR_QUEUE_NAME"])
