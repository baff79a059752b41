"""API tokens: printed once, stored as hashes, listed without their text, revoked, audited."""

from __future__ import annotations

import asyncio
import json

import asyncpg
import pytest
from sqlalchemy import event

from keyrotor.api import tokens
from keyrotor.api.tokens import TokenVerifier, token_hash
from keyrotor.errors import InvalidInput, NotFound
from keyrotor.store import db
from tests.cli_helpers import keyrotor


def test_cli_create_list_revoke(env: dict[str, str], database_url: str) -> None:
    made = keyrotor("tokens", "create", "billing-svc", "--expires-in-days", "30", "--json", env=env)
    assert made.returncode == 0, made.stderr
    doc = json.loads(made.stdout)
    assert set(doc) == {"actor", "token", "id", "expires_at"}
    assert doc["actor"] == "billing-svc" and doc["token"].startswith("krt_") and doc["expires_at"]

    listed = keyrotor("tokens", "list", "--json", env=env)
    assert listed.returncode == 0, listed.stderr
    assert doc["token"] not in listed.stdout
    [row] = json.loads(listed.stdout)
    assert row["id"] == doc["id"] and row["revoked_at"] is None

    revoked = keyrotor("tokens", "revoke", str(doc["id"]), env=env)
    assert revoked.returncode == 0, revoked.stderr
    [row] = json.loads(keyrotor("tokens", "list", "--json", env=env).stdout)
    assert row["revoked_at"] is not None
    assert keyrotor("tokens", "revoke", "999", env=env).returncode == 2
    for bad in ("0", str(2**63)):  # not an id at all: refused before the database, one line
        refused = keyrotor("tokens", "revoke", bad, env=env)
        assert refused.returncode == 2 and "Traceback" not in refused.stderr, refused.stderr

    async def stored() -> tuple[list[asyncpg.Record], list[asyncpg.Record]]:
        conn = await asyncpg.connect(database_url)
        try:
            rows = await conn.fetch("SELECT token_hash FROM api_tokens")
            events = await conn.fetch(
                "SELECT metadata::text AS m FROM encryption_audit_log WHERE event_type = 'config_change'"
            )
            return rows, events
        finally:
            await conn.close()

    rows, events = asyncio.run(stored())
    assert [bytes(r["token_hash"]) for r in rows] == [token_hash(doc["token"])]
    api_events = [e["m"] for e in events if '"api_token"' in e["m"]]
    assert len(api_events) == 2  # created, revoked
    assert all(doc["token"] not in m for m in api_events)


def test_cli_plain_output_prints_the_token_alone(env: dict[str, str]) -> None:
    made = keyrotor("tokens", "create", "svc", env=env)
    assert made.returncode == 0, made.stderr
    assert tokens.looks_like_token(made.stdout.strip())


def test_wildcard_and_bad_expiry_are_refused(env: dict[str, str]) -> None:
    assert keyrotor("tokens", "create", "*", env=env).returncode == 2
    assert keyrotor("tokens", "create", "svc", "--expires-in-days", "0", env=env).returncode == 2


async def test_verifier(database_url: str) -> None:
    engine = db.create_engine(database_url)
    sessions = db.sessionmaker(engine)
    try:
        issued = await tokens.create_token(sessions, "app-1", by="admin")
        verifier = TokenVerifier(sessions, ttl_s=0)
        bearer = await verifier.verify(issued.token)
        assert bearer is not None and bearer.actor == "app-1" and bearer.token_id == issued.id
        assert await verifier.verify(issued.token[:-1] + ("A" if issued.token[-1] != "A" else "B")) is None
        assert await verifier.verify("not a token") is None
        await tokens.revoke_token(sessions, issued.id, by="admin")
        assert await verifier.verify(issued.token) is None
        with pytest.raises(NotFound):
            await tokens.revoke_token(sessions, 12345, by="admin")
        with pytest.raises(InvalidInput):
            await tokens.create_token(sessions, "*", by="admin")
    finally:
        await engine.dispose()


async def test_cached_answers_expire_and_concurrent_misses_share_one_lookup(database_url: str) -> None:
    engine = db.create_engine(database_url)
    sessions = db.sessionmaker(engine)
    statements: list[str] = []
    event.listen(engine.sync_engine, "before_cursor_execute", lambda *a: statements.append(a[2]))
    now = [100.0]
    try:
        issued = await tokens.create_token(sessions, "app-1", by="admin")
        verifier = TokenVerifier(sessions, ttl_s=5.0, clock=lambda: now[0])
        statements.clear()
        # 32 requests in flight when the entry is missing: one query between them.
        found = await asyncio.wait_for(
            asyncio.gather(*(verifier.verify(issued.token) for _ in range(32))), 30
        )
        assert {b.actor for b in found if b is not None} == {"app-1"} and len(found) == 32
        lookups = [s for s in statements if "api_tokens" in s]
        assert len(lookups) == 1
        await tokens.revoke_token(sessions, issued.id, by="admin")
        now[0] += 4.9  # within the TTL the cached answer stands ...
        assert await verifier.verify(issued.token) is not None
        now[0] += 0.2  # ... and past it the revocation is seen
        assert await verifier.verify(issued.token) is None
    finally:
        await engine.dispose()
