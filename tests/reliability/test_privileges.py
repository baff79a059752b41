"""Least privilege: deploy/postgres/roles.sql, applied to a test database and checked line by line.

Roles are cluster-wide, so each test suffixes the role names with a tag of its own and drops
them afterwards. The application role works (new scope, encrypt, decrypt, audit, decrypt with a
retired DEK and record that use) and cannot see destroyed DEKs, read or change the recorded uses,
or rewrite the audit log; the worker role rotates, retires and destroys, and cannot rewrite the
audit log either.
"""

from __future__ import annotations

import re
import uuid
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass
from pathlib import Path

import asyncpg
import pytest

from keyrotor import KeyManager, Settings
from keyrotor.queue.client import KeyrotorClient
from tests.conftest import PG_ADMIN
from tests.destruction_helpers import expire_window, open_destructions, wait_run
from tests.rotation_helpers import check_values, fetch, run_burst_worker, seed

ROLES_SQL = Path(__file__).resolve().parents[2] / "deploy" / "postgres" / "roles.sql"


@dataclass(frozen=True)
class Roles:
    app_url: str
    worker_url: str
    app: str
    worker: str


def _as(url: str, role: str) -> str:
    # postgresql://postgres@host:port/db -> postgresql://role:pw@host:port/db
    return re.sub(r"^postgresql://[^@]*@", f"postgresql://{role}:pw-{role}@", url)


@pytest.fixture
async def roles(wenv: dict[str, str]) -> AsyncIterator[Roles]:
    tag = uuid.uuid4().hex[:8]
    app, worker = f"keyrotor_app_{tag}", f"keyrotor_worker_{tag}"
    sql = ROLES_SQL.read_text().replace("keyrotor_app", app).replace("keyrotor_worker", worker)
    conn = await asyncpg.connect(wenv["DATABASE_URL"])
    try:
        await conn.execute(sql)
        await conn.execute(sql)  # re-running it is harmless
        for role in (app, worker):
            await conn.execute(f"ALTER ROLE {role} LOGIN PASSWORD 'pw-{role}'")
    finally:
        await conn.close()
    try:
        yield Roles(_as(wenv["DATABASE_URL"], app), _as(wenv["DATABASE_URL"], worker), app, worker)
    finally:
        admin = await asyncpg.connect(PG_ADMIN)
        try:
            dbname = wenv["DATABASE_URL"].rsplit("/", 1)[1]
            await admin.execute(f"DROP DATABASE IF EXISTS {dbname} WITH (FORCE)")
            for role in (app, worker):
                await admin.execute(f"DROP ROLE IF EXISTS {role}")
        finally:
            await admin.close()


async def _refused(url: str, sql: str) -> str:
    """Run ``sql`` as the role of ``url``; return the error class name (fails if it succeeds)."""
    conn = await asyncpg.connect(url)
    try:
        await conn.execute(sql)
    except asyncpg.PostgresError as exc:
        return type(exc).__name__
    finally:
        await conn.close()
    raise AssertionError(f"allowed: {sql}")


async def test_app_and_worker_roles_have_only_what_they_need(
    wenv: dict[str, str], roles: Roles, record: Callable[..., None]
) -> None:
    worker_s = Settings.from_env({**wenv, "DATABASE_URL": roles.worker_url})
    app_s = Settings.from_env({**wenv, "DATABASE_URL": roles.app_url, "KEYROTOR_LISTEN_KEY_CHANGES": "false"})
    # The application creates a scope and stores values with its own role.
    values = await seed(app_s, "openai", 50)
    async with KeyManager(app_s) as km:  # a v1 value the caller keeps itself (location "secret")
        kept = await km.encrypt("openai", "sk-kept-by-the-caller-0123456789", context="secret:kept")
    # The worker role rotates and then retires v1 (in-process worker, same code as the process).
    async with KeyrotorClient(worker_s) as client:
        handle = await client.rotate("openai")
        await run_burst_worker(worker_s)
        await handle.result(timeout_s=10)
        handle = await client.retire("openai", 1, force_now=True)
        await run_burst_worker(worker_s)
        assert (await handle.result(timeout_s=10)).state == "completed"
    # The application still reads and writes everything live, sees the retired v1 and records
    # its use (which cancels its destruction).
    assert await check_values(app_s, "openai", values) == {2: 50}
    assert (await fetch(roles.app_url, "SELECT count(*) FROM data_keys WHERE state = 'retired'"))[0][0] == 1
    async with KeyManager(app_s) as km:
        assert await km.decrypt("openai", kept, context="secret:kept") == "sk-kept-by-the-caller-0123456789"
    uses = await fetch(wenv["DATABASE_URL"], "SELECT dek_version, location FROM retired_key_uses")
    assert [tuple(r) for r in uses] == [(1, "secret")]
    # The worker role's destruction run finds that use and cancels the erasure; retiring again
    # is the answer to that (a new window, after that use), and the next one destroys it.
    await expire_window(wenv["DATABASE_URL"], "openai", 1)
    (destruction,) = await open_destructions(worker_s)
    await run_burst_worker(worker_s)
    assert (await wait_run(worker_s, destruction.id)).detail["outcome"] == "cancelled"
    async with KeyrotorClient(worker_s) as client:
        handle = await client.retire("openai", 1, force_now=True)
        await run_burst_worker(worker_s)
        assert (await handle.result(timeout_s=10)).state == "completed"
    await expire_window(wenv["DATABASE_URL"], "openai", 1)
    (destruction,) = await open_destructions(worker_s)
    await run_burst_worker(worker_s)
    assert (await wait_run(worker_s, destruction.id)).detail["outcome"] == "destroyed"
    async with KeyManager(app_s) as km:
        await km.put_secret("anthropic", "prod", "sk-ant-api03-privileges-0123456789")
        assert await km.get_secret("anthropic", "prod") == "sk-ant-api03-privileges-0123456789"
        await km.flush_audit()

    # The application's encryptions were counted against its DEKs' limits (keyrotor.census.usage), by
    # the app role, reserved before use: a first block of 16 for its one encrypt.
    counted = await fetch(
        wenv["DATABASE_URL"],
        "SELECT d.version, d.encryptions FROM data_keys d JOIN key_scopes k ON k.id = d.scope_id "
        "WHERE k.name = 'anthropic'",
    )
    assert [tuple(r) for r in counted] == [(1, 16)]
    # Where the values live: recorded by the application's encrypts and the worker's rotation,
    # counted by the application's usage flush.
    located = await fetch(
        wenv["DATABASE_URL"],
        "SELECT s.name, l.dek_version, l.location, l.encryptions FROM key_locations l "
        "JOIN key_scopes s ON s.id = l.scope_id ORDER BY 1, 2",
    )
    assert [tuple(r) for r in located] == [
        ("anthropic", 1, "secret", 1),
        ("openai", 1, "secret", 51),  # and the value the caller keeps itself
        ("openai", 2, "secret", 50),
    ]
    await fetch(roles.app_url, "SELECT count(*) FROM location_acks")
    await fetch(
        roles.app_url,
        "INSERT INTO retired_key_uses (scope_id, dek_version, location) "
        "SELECT id, 1, 'x' FROM key_scopes LIMIT 1",
    )
    # The operator's acknowledgements are the worker role's to write.
    await fetch(
        roles.worker_url,
        "INSERT INTO location_acks (location, reason, actor) VALUES ('legacy.values', 'dropped', 'ops')",
    )
    await fetch(roles.worker_url, "DELETE FROM location_acks WHERE location = 'legacy.values'")

    # History: the owner sees the destroyed v1; the application does not.
    owner = await fetch(wenv["DATABASE_URL"], "SELECT count(*) FROM data_keys WHERE state = 'destroyed'")
    assert owner[0][0] == 1
    app_sees = await fetch(
        roles.app_url, "SELECT count(*) FROM data_keys WHERE state NOT IN ('pending', 'active', 'grace')"
    )
    assert app_sees[0][0] == 0
    assert (await fetch(roles.app_url, "SELECT count(*) FROM data_keys"))[0][
        0
    ] == 2  # openai v2, anthropic v1
    audit_rows = (await fetch(wenv["DATABASE_URL"], "SELECT count(*) FROM encryption_audit_log"))[0][0]
    assert audit_rows > 0

    refused_app = {
        sql: await _refused(roles.app_url, sql)
        for sql in [
            "UPDATE encryption_audit_log SET success = NOT success",
            "DELETE FROM encryption_audit_log",
            "TRUNCATE encryption_audit_log",
            "UPDATE data_keys SET state = 'active'",
            "DELETE FROM data_keys",
            "UPDATE key_scopes SET active_version = 1",
            "DELETE FROM key_scopes",
            "ALTER TABLE data_keys DISABLE ROW LEVEL SECURITY",
            "DROP TABLE secrets",
            "SELECT * FROM rotation_ranges",
            "UPDATE rotations SET state = 'failed'",
            "INSERT INTO data_keys (scope_id, version, state, kek_id, kek_version) "
            "SELECT id, 99, 'destroyed', 'x', 1 FROM key_scopes LIMIT 1",
            # Granted columns, but only one way (migration 0007): a count never goes down, and
            # the application may make a rotation due sooner, never later.
            "UPDATE data_keys SET encryptions = 0",
            # The uses of retired DEKs: append only (a use must not be undone or read back).
            "SELECT * FROM retired_key_uses",
            "UPDATE retired_key_uses SET used_at = now() - interval '1 year'",
            "DELETE FROM retired_key_uses",
            "UPDATE data_keys SET destroy_after = NULL",
            "UPDATE key_scopes SET next_rotation_at = next_rotation_at + interval '1 year'",
            "UPDATE key_scopes SET next_rotation_at = NULL",
            # The census: the application adds locations and counts, and nothing else.
            "DELETE FROM key_locations",
            "UPDATE key_locations SET location = 'elsewhere'",
            "UPDATE key_locations SET dek_version = 99",
            "UPDATE key_locations SET first_seen = now()",
            "INSERT INTO location_acks (location, reason, actor) VALUES ('x', 'y', 'z')",
            "DELETE FROM location_acks",
            "SELECT * FROM retired_key_uses",
            "DELETE FROM retired_key_uses",
            "UPDATE data_keys SET destroy_after = now()",
        ]
    }
    refused_worker = {
        sql: await _refused(roles.worker_url, sql)
        for sql in [
            "UPDATE encryption_audit_log SET success = NOT success",
            "DELETE FROM encryption_audit_log",
            "TRUNCATE encryption_audit_log",
            "DROP TABLE secrets",
            "ALTER TABLE data_keys DISABLE ROW LEVEL SECURITY",
            "UPDATE data_keys SET encryptions = 0",
        ]
    }
    assert (await fetch(wenv["DATABASE_URL"], "SELECT count(*) FROM encryption_audit_log"))[0][
        0
    ] == audit_rows
    assert set(refused_app.values()) <= {
        "InsufficientPrivilegeError",
        "UndefinedColumnError",
        "CheckViolationError",
    }
    # ... while bringing a rotation closer stays the application's right (keyrotor.census.usage does).
    await fetch(roles.app_url, "UPDATE key_scopes SET next_rotation_at = now() WHERE name = 'anthropic'")
    record(
        "privileges",
        app_refused=len(refused_app),
        worker_refused=len(refused_worker),
        app_can=[
            "secrets rw",
            "live and retired DEKs r",
            "first DEK of a scope",
            "audit append",
            "retired-key uses append",
        ],
    )
