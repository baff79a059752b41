"""Security (#19, finding 2): the audit chain against whoever can write the database.

The attacks, as the review reproduced them: delete the log from row 3 on, change row 3's actor
and re-insert the rows with recomputed hashes (unkeyed SHA-256, or HMAC under a key of the
attacker's own); append forged events with INSERT alone; delete the newest rows; downgrade the
tail to the unkeyed format; delete rows as the application role after setting
``keyrotor.audit_prune``. Each is checked with the real ``keyrotor audit verify`` (and prune)
in a subprocess, against a real Postgres.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import os
import re
import subprocess
import sys
import uuid
from collections.abc import Callable
from datetime import datetime
from pathlib import Path
from typing import Any

import asyncpg
import pytest

from keyrotor import KeyManager, Settings
from keyrotor.audit.log import GENESIS, AuditEvent, canonical, write_event
from keyrotor.store import db
from tests.cli_helpers import keyrotor
from tests.conftest import PG_ADMIN

ROLES_SQL = Path(__file__).resolve().parents[2] / "deploy" / "postgres" / "roles.sql"
_COLS = (
    "id, event_type, scope, key_version, success, actor, ip_address, user_agent, error_message, "
    "metadata::text, created_at, prev_hash, row_hash, audit_key_id"
)


async def _events(settings: Settings, n: int, path: str | None = None) -> None:
    """``n`` audited calls through a real KeyManager (keyed rows), then close (a checkpoint)."""
    overrides: dict[str, Any] = {"audit_checkpoint_file": path} if path else {}
    async with KeyManager(settings.model_copy(update=overrides)) as km:
        for i in range(n):
            token = await km.encrypt("openai", f"sk-{i}", context=f"users.key:{i}", actor=f"user:{i}")
            await km.decrypt("openai", token, context=f"users.key:{i}", actor=f"user:{i}")


def _mac(key: bytes | None, prev: bytes, body: bytes) -> bytes:
    if key is None:
        return hashlib.sha256(prev + body).digest()
    return hmac.new(key, prev + body, hashlib.sha256).digest()


async def _rewrite_from(url: str, first: int, key: bytes | None, key_id: int | None) -> int:
    """The attack: delete rows ``first``.. as the owner, change ``first``'s actor, put them back
    with hashes recomputed (plain SHA-256 when ``key`` is None). Returns the rows rewritten."""
    conn = await asyncpg.connect(url)
    try:
        async with conn.transaction():
            rows = await conn.fetch(
                f"SELECT {_COLS} FROM encryption_audit_log WHERE id >= $1 ORDER BY id", first
            )
            prev = bytes(
                await conn.fetchval("SELECT row_hash FROM encryption_audit_log WHERE id = $1", first - 1)
            )
            # The owner's way round the append-only trigger (a superuser could also disable it).
            await conn.execute("SELECT set_config('keyrotor.audit_prune', 'on', true)")
            await conn.execute("DELETE FROM encryption_audit_log WHERE id >= $1", first)
            for r in rows:
                actor = "attacker" if r["id"] == first else r["actor"]
                body = canonical(
                    r["id"], r["event_type"], r["scope"], r["key_version"], r["success"], actor,
                    r["ip_address"], r["user_agent"], r["error_message"], r["created_at"], r["metadata"],
                    key_id,
                )  # fmt: skip
                row_hash = _mac(key, prev, body)
                await conn.execute(
                    "INSERT INTO encryption_audit_log (id, event_type, scope, key_version, success, actor, "
                    "ip_address, user_agent, error_message, metadata, created_at, prev_hash, row_hash, "
                    "audit_key_id) VALUES ($1,$2,$3,$4,$5,$6,$7,$8,$9,$10::json,$11,$12,$13,$14)",
                    r["id"], r["event_type"], r["scope"], r["key_version"], r["success"], actor,
                    r["ip_address"], r["user_agent"], r["error_message"], r["metadata"], r["created_at"],
                    prev, row_hash, key_id,
                )  # fmt: skip
                prev = row_hash
    finally:
        await conn.close()
    return len(rows)


async def _append_forged(url: str, key: bytes | None, key_id: int | None) -> None:
    """INSERT alone: a forged ``decrypt`` event appended after the head, hash recomputed."""
    conn = await asyncpg.connect(url)
    try:
        head = await conn.fetchrow("SELECT id, row_hash FROM encryption_audit_log ORDER BY id DESC LIMIT 1")
        row_id, prev = (int(head["id"]), bytes(head["row_hash"])) if head else (0, GENESIS)
        created = datetime.now().astimezone()
        body = canonical(
            row_id + 1, "decrypt", "openai", 1, True, "innocent", None, None, None, created, "{}", key_id
        )
        await conn.execute(
            "INSERT INTO encryption_audit_log (id, event_type, scope, key_version, success, actor, metadata, "
            "created_at, prev_hash, row_hash, audit_key_id) "
            "VALUES ($1, 'decrypt', 'openai', 1, true, 'innocent', '{}'::json, $2, $3, $4, $5)",
            row_id + 1, created, prev, _mac(key, prev, body), key_id,
        )  # fmt: skip
    finally:
        await conn.close()


def _verify(env: dict[str, str], *args: str) -> tuple[int, dict[str, Any], str]:
    done = keyrotor("audit", "verify", "--json", *args, env=env)
    try:
        report = json.loads(done.stdout) if done.stdout.strip() else {}
    except ValueError:
        report = {}
    return done.returncode, report, done.stderr


@pytest.mark.parametrize("forgery", ["unkeyed", "wrong_key", "append_unkeyed", "append_wrong_key"])
async def test_a_rewritten_or_appended_chain_does_not_verify(
    forgery: str, settings: Settings, env: dict[str, str], record: Callable[..., None]
) -> None:
    await _events(settings, 4)
    code, report, _ = _verify(env)
    assert code == 0 and report["ok"] and report["keyed"] == report["checked"] >= 8, report
    head = report["head_id"]
    url = env["DATABASE_URL"]
    wrong = os.urandom(32)
    if forgery == "unkeyed":
        await _rewrite_from(url, 3, None, None)
    elif forgery == "wrong_key":
        await _rewrite_from(url, 3, wrong, 1)
    elif forgery == "append_unkeyed":
        await _append_forged(url, None, None)
    else:
        await _append_forged(url, wrong, 1)
    code, report, stderr = _verify(env)
    assert code == 1 and report["ok"] is False, (report, stderr)
    expected = "downgraded" if "unkeyed" in forgery else "edited"
    assert report["problem"] == expected
    assert report["bad_id"] == (head + 1 if forgery.startswith("append") else 3)
    record(
        "security", finding=2, what=f"audit chain forged ({forgery}) is refused by verify", tries=1, held=1
    )


async def test_tail_truncation_after_a_checkpoint_is_caught(
    settings: Settings, env: dict[str, str], tmp_path: Path, record: Callable[..., None]
) -> None:
    checkpoints = tmp_path / "audit-checkpoints.jsonl"
    await _events(settings, 3, str(checkpoints))
    lines = checkpoints.read_text().splitlines()
    assert lines, "closing the KeyManager writes a checkpoint"
    latest = json.loads(lines[-1])
    assert latest["format"] == "krcp1" and latest["head_id"] >= 6 and len(latest["mac"]) == 64
    code, report, _ = _verify(env, "--checkpoint-file", str(checkpoints))
    assert code == 0 and report["checkpoint"].startswith(f"{latest['head_id']}:{latest['head_hash']}")

    conn = await asyncpg.connect(env["DATABASE_URL"])
    try:
        async with conn.transaction():
            await conn.execute("SELECT set_config('keyrotor.audit_prune', 'on', true)")
            await conn.execute("DELETE FROM encryption_audit_log WHERE id > $1", latest["head_id"] - 2)
    finally:
        await conn.close()
    code, report, _ = _verify(env)
    assert code == 0, "without a checkpoint, a truncated tail still verifies: the reason for checkpoints"
    code, report, stderr = _verify(env, "--checkpoint-file", str(checkpoints))
    assert code == 1 and report["problem"] == "deleted", (report, stderr)

    # A checkpoint edited to match the truncated log does not verify: its MAC needs the KEK.
    forged = {**latest, "head_id": latest["head_id"] - 2}
    with checkpoints.open("a") as f:
        f.write(json.dumps(forged) + "\n")
    code, report, _ = _verify(env, "--checkpoint-file", str(checkpoints))
    assert code == 1 and "not signed" in report["detail"]
    record("security", finding=2, what="newest audit rows deleted after a signed checkpoint", tries=2, held=2)


async def _roles(url: str) -> tuple[str, str]:
    """deploy/postgres/roles.sql applied with a tag; the app and worker URLs."""
    tag = uuid.uuid4().hex[:8]
    app, worker = f"keyrotor_app_{tag}", f"keyrotor_worker_{tag}"
    sql = ROLES_SQL.read_text().replace("keyrotor_app", app).replace("keyrotor_worker", worker)
    conn = await asyncpg.connect(url)
    try:
        await conn.execute(sql)
        for role in (app, worker):
            await conn.execute(f"ALTER ROLE {role} LOGIN PASSWORD 'pw-{role}'")
            # Even a DELETE privilege granted by mistake must not open the log.
            await conn.execute(f"GRANT DELETE ON encryption_audit_log TO {role}")
    finally:
        await conn.close()
    return app, worker


def _as(url: str, role: str) -> str:
    return re.sub(r"^postgresql://[^@]*@", f"postgresql://{role}:pw-{role}@", url)


async def test_only_the_owner_can_prune(
    settings: Settings, env: dict[str, str], record: Callable[..., None]
) -> None:
    await _events(settings, 2)
    url = env["DATABASE_URL"]
    roles = await _roles(url)
    try:
        for role in roles:
            conn = await asyncpg.connect(_as(url, role))
            try:
                with pytest.raises(asyncpg.InsufficientPrivilegeError):
                    async with conn.transaction():
                        await conn.execute("SELECT set_config('keyrotor.audit_prune', 'on', true)")
                        await conn.execute("DELETE FROM encryption_audit_log WHERE id <= 2")
            finally:
                await conn.close()
            done = keyrotor(
                "audit", "prune", "--before", "now", "--yes", env={**env, "DATABASE_URL": _as(url, role)}
            )
            assert done.returncode == 1 and done.stderr.startswith("keyrotor: error:"), done.stderr
            assert "append-only (DELETE refused" in done.stderr, done.stderr
        rows = await _count(url)
        done = keyrotor("audit", "prune", "--before", "now", "--yes", env=env)  # the owner
        assert done.returncode == 0, done.stderr
        assert await _count(url) == 1  # the anchor
        code, report, _ = _verify(env)
        assert code == 0 and report["anchored"], report
    finally:
        admin = await asyncpg.connect(PG_ADMIN)
        try:
            await admin.execute(f"DROP DATABASE IF EXISTS {url.rsplit('/', 1)[1]} WITH (FORCE)")
            for role in roles:
                await admin.execute(f"DROP ROLE IF EXISTS {role}")
        finally:
            await admin.close()
    record(
        "security",
        finding=2,
        what=f"audit DELETE/prune by app and worker roles ({rows} rows)",
        tries=4,
        held=4,
    )


async def _count(url: str) -> int:
    conn = await asyncpg.connect(url)
    try:
        return int(await conn.fetchval("SELECT count(*) FROM encryption_audit_log"))
    finally:
        await conn.close()


async def test_old_unkeyed_rows_verify_and_a_downgrade_after_the_switch_is_caught(
    settings: Settings, env: dict[str, str], record: Callable[..., None]
) -> None:
    # Rows written before the audit key existed (as an older keyrotor wrote them).
    engine = db.create_engine(env["DATABASE_URL"])
    try:
        async with db.transaction(db.sessionmaker(engine)) as session:
            for i in range(3):
                await write_event(session, AuditEvent("config_change", actor=f"old:{i}", metadata={"i": i}))
    finally:
        await engine.dispose()
    await _events(settings, 2)  # the first KeyManager creates the key: the switch
    conn = await asyncpg.connect(env["DATABASE_URL"])
    try:
        assert await conn.fetchval("SELECT switch_after FROM audit_keys WHERE id = 1") == 3
        kinds = await conn.fetch("SELECT id, audit_key_id FROM encryption_audit_log ORDER BY id")
    finally:
        await conn.close()
    assert [r["audit_key_id"] for r in kinds] == [None] * 3 + [1] * (len(kinds) - 3)
    code, report, _ = _verify(env)
    assert code == 0 and report["switch_after"] == 3 and report["keyed"] == len(kinds) - 3, report

    await _append_forged(env["DATABASE_URL"], None, None)  # an unkeyed row after the switch
    code, report, _ = _verify(env)
    assert code == 1 and report["problem"] == "downgraded" and report["bad_id"] == len(kinds) + 1, report

    # Moving the recorded switch point past the forged row breaks the key's wrap instead.
    conn = await asyncpg.connect(env["DATABASE_URL"])
    try:
        await conn.execute("UPDATE audit_keys SET switch_after = $1", len(kinds) + 1)
    finally:
        await conn.close()
    code, report, stderr = _verify(env)
    assert code == 1 and "cannot unwrap audit key 1" in report["detail"], (report, stderr)
    record("security", finding=2, what="audit tail downgraded to the unkeyed format", tries=2, held=2)


_KEYLESS_WRITER = """
import asyncio, sys
from keyrotor.audit.log import AuditEvent, write_event
from keyrotor.errors import ConfigurationError
from keyrotor.store import db

async def main() -> None:
    engine = db.create_engine(sys.argv[1])
    try:
        async with db.transaction(db.sessionmaker(engine)) as session:
            await write_event(session, AuditEvent("config_change", actor="keyless"))
    except ConfigurationError as exc:
        print("refused:", exc)
    finally:
        await engine.dispose()

asyncio.run(main())
"""


async def test_a_process_without_the_audit_key_cannot_append_after_the_switch(
    settings: Settings, env: dict[str, str], record: Callable[..., None]
) -> None:
    await _events(settings, 1)
    before = await _count(env["DATABASE_URL"])
    done = subprocess.run(
        [sys.executable, "-c", _KEYLESS_WRITER, env["DATABASE_URL"]],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert done.stdout.startswith("refused: the audit chain is keyed"), done.stdout + done.stderr
    assert await _count(env["DATABASE_URL"]) == before
    record("security", finding=2, what="unkeyed append by a process without the audit key", tries=1, held=1)
