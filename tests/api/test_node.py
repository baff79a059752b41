"""The Node client's tests (``node --test clients/node/test/``) against a real ``keyrotor serve``;
values cross Python -> HTTP -> Node and back, and the settings rows of docs/node.md are read
through the client before and after ``legacy migrate``; a second server, whose database loses
keyrotor's schema, answers ``misconfigured``."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import uuid
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import asyncpg
import pytest

from keyrotor import KeyManager, Settings
from keyrotor.api import tokens
from keyrotor.census import columns
from keyrotor.crypto import legacy_format as legacy
from keyrotor.legacy import migration as legacy_migration
from tests.api.processes import ServeProcess
from tests.cli_helpers import keyrotor
from tests.conftest import MASTER_KEY, _admin, _url
from tests.rotation_helpers import fetch

ROOT = Path(__file__).resolve().parents[2]
NODE = shutil.which("node")
pytestmark = pytest.mark.skipif(NODE is None, reason="node is not installed")


@pytest.fixture
def served(env: dict[str, str], tmp_path: Path) -> Iterator[ServeProcess]:
    locked = keyrotor(
        "lock-down",
        "--grant",
        "node-app:node:decrypt,encrypt",
        "--grant",
        "node-app:tenant-1/*:decrypt,encrypt",
        "--grant",
        "node-app:openai:decrypt,encrypt",
        env=env,
    )
    assert locked.returncode == 0, locked.stderr
    server = ServeProcess({**env, "KEYROTOR_API_TOKEN_CACHE_SECONDS": "0"}, tmp_path / "serve.log")
    try:
        server.wait_ready()
        yield server
    finally:
        server.stop()


@pytest.fixture
async def schemaless(env: dict[str, str], template_db: str, tmp_path: Path) -> AsyncIterator[ServeProcess]:
    """``keyrotor serve`` on a database of its own that loses keyrotor's schema once the server is
    up (it refuses to start without one): every call then meets ``SchemaMissing``, a server
    misconfiguration that no retry mends."""
    name = f"kr_t_{uuid.uuid4().hex[:12]}"
    await _admin(f"CREATE DATABASE {name} TEMPLATE {template_db}")
    server = ServeProcess(
        {**env, "DATABASE_URL": _url(name), "KEYROTOR_API_TOKEN_CACHE_SECONDS": "0"},
        tmp_path / "schemaless.log",
    )
    try:
        server.wait_ready()
        conn = await asyncpg.connect(_url(name))
        try:
            await conn.execute("DROP SCHEMA public CASCADE; CREATE SCHEMA public")
        finally:
            await conn.close()
        yield server
    finally:
        server.stop()
        await _admin(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")


async def _settings_rows(settings: Settings, km: KeyManager) -> list[dict[str, object]]:
    """docs/node.md's ``settings`` table: one row ``legacy migrate`` moved to kr1, one it has not
    reached yet (an old-format value). Returns the rows as the application reads them."""
    url = settings.database_url
    await fetch(url, "CREATE TABLE settings (id bigserial PRIMARY KEY, provider text NOT NULL, api_key text)")
    insert = "INSERT INTO settings (provider, api_key) VALUES ($1, $2) RETURNING id"
    await fetch(url, insert, "openai", legacy.encrypt("sk-proj-migrated", MASTER_KEY))
    await columns.register(km.sessions, "settings.api_key", pk="id", scope_column="provider")
    report = await legacy_migration.migrate_legacy(km, workers=1)
    assert report.migrated == 1
    await fetch(url, insert, "openai", legacy.encrypt("sk-proj-not-yet", MASTER_KEY))
    rows = await fetch(url, "SELECT id, provider, api_key FROM settings ORDER BY id")
    assert rows[0]["api_key"].startswith("kr1:") and not rows[1]["api_key"].startswith("kr1:")
    plaintexts = ("sk-proj-migrated", "sk-proj-not-yet")
    return [{**dict(r), "plaintext": p} for r, p in zip(rows, plaintexts, strict=True)]


async def test_node_client_against_serve(
    served: ServeProcess, schemaless: ServeProcess, env: dict[str, str], tmp_path: Path
) -> None:
    settings = Settings.from_env(env)
    async with KeyManager(settings) as km:
        settings_rows = tmp_path / "settings_rows.json"
        settings_rows.write_text(json.dumps(await _settings_rows(settings, km)))
        token = (await tokens.create_token(km.sessions, "node-app", by="admin")).token
        denied = (await tokens.create_token(km.sessions, "nobody", by="admin")).token
        ct = await km.encrypt("node", "sk-from-python", context="settings.api_key:7", actor="node-app")
    from_python = tmp_path / "from_python.json"
    from_python.write_text(
        json.dumps(
            [
                {
                    "scope": "node",
                    "context": "settings.api_key:7",
                    "ciphertext": ct,
                    "plaintext": "sk-from-python",
                }
            ]
        )
    )
    out = tmp_path / "from_node.json"
    proc = subprocess.run(
        [str(NODE), "--test", "test/"],
        cwd=ROOT / "clients" / "node",
        env={
            "PATH": os.environ.get("PATH", ""),
            "HOME": os.environ.get("HOME", "/root"),
            "KEYROTOR_URL": served.url,
            "KEYROTOR_MISCONFIGURED_URL": schemaless.url,
            "KEYROTOR_TOKEN": token,
            "KEYROTOR_DENIED_TOKEN": denied,
            "KEYROTOR_FROM_PYTHON": str(from_python),
            "KEYROTOR_NODE_OUT": str(out),
            "KEYROTOR_SETTINGS_ROWS": str(settings_rows),
        },
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-2000:]
    assert "# skipped 0" in proc.stdout and "# fail 0" in proc.stdout
    async with KeyManager(settings) as km:
        for v in json.loads(out.read_text()):
            assert (
                await km.decrypt(v["scope"], v["ciphertext"], context=v["context"], actor="node-app")
                == v["plaintext"]
            )
    log = served.log()
    assert token not in log and denied not in log
    assert "sk-from-python" not in log and "sk-from-node" not in log and "sk-secret" not in log
    assert "sk-proj-" not in log
