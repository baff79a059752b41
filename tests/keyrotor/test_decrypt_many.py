"""KeyManager.decrypt_many: one pass over a scope's values, every value audited as a single
decrypt audits it, the batch's events committed together, a denial or an outage failing closed."""

from __future__ import annotations

import asyncio

import asyncpg
import pytest

from keyrotor import KeyManager, Settings
from keyrotor.audit.durable import DurableAuditWriter
from keyrotor.audit.grants import revoke_access
from keyrotor.audit.log import CHAIN_LOCK
from keyrotor.errors import (
    AccessDenied,
    DecryptionFailed,
    InvalidScope,
    MalformedCiphertext,
    StoreUnavailable,
)
from keyrotor.store import db
from tests.conftest import _admin
from tests.keyrotor.audit_helpers import rows, verify

KEY = "sk-ant-api03-" + "k" * 40


async def test_values_open_and_each_is_audited_in_one_commit(settings: Settings, database_url: str) -> None:
    async with KeyManager(settings) as km:
        good = [
            (await km.encrypt("anthropic", f"{KEY}{i}", context=f"u.k:{i}"), f"u.k:{i}") for i in range(5)
        ]
        assert isinstance(km.audit, DurableAuditWriter)
        commits = km.audit.commits
        items = [*good, (good[0][0], "u.k:wrong"), ("kr1:nope", "u.k:9"), good[1]]
        results = await km.decrypt_many("anthropic", items, actor="batcher")
        # Every event of the batch is committed when the call returns, in one commit.
        assert km.audit.commits == commits + 1
        logged = await rows(database_url, "actor = 'batcher'")
        assert (await verify(km)).ok
    assert results[:5] == [f"{KEY}{i}" for i in range(5)] and results[7] == f"{KEY}1"
    assert isinstance(results[5], DecryptionFailed) and isinstance(results[6], MalformedCiphertext)
    assert [r["event_type"] for r in logged] == ["decrypt"] * 5 + ["failed_decrypt"] * 2 + ["decrypt"]
    assert all(r["scope"] == "anthropic" for r in logged)
    assert logged[5]["key_version"] == 1 and logged[6]["key_version"] is None
    assert all(KEY not in repr(r) for r in logged)


async def test_an_actor_without_a_grant_gets_nothing_and_is_audited(
    settings: Settings, database_url: str
) -> None:
    async with KeyManager(settings) as km:
        token = await km.encrypt("anthropic", KEY, context="u.k:1")
        async with db.transaction(km.sessions) as session:
            await revoke_access(session, "*", "*", encrypt=True, decrypt=True, by="admin")
        km.grants.invalidate()
        with pytest.raises(AccessDenied):
            await km.decrypt_many("anthropic", [(token, "u.k:1")] * 3, actor="mallory")
        await km.flush_audit()
    logged = await rows(database_url, "actor = 'mallory'")
    assert [r["event_type"] for r in logged] == ["unauthorized"]


async def test_an_invalid_scope_is_refused_before_the_grants(settings: Settings, database_url: str) -> None:
    async with KeyManager(settings) as km:
        async with db.transaction(km.sessions) as session:
            await revoke_access(session, "*", "*", encrypt=True, decrypt=True, by="admin")
        km.grants.invalidate()
        with pytest.raises(InvalidScope):
            await km.decrypt_many(f"pasted {KEY}", [("kr1:1:AAAA", "")], actor="mallory")
        await km.flush_audit()
    logged = await rows(database_url, "actor = 'mallory'")
    assert [(r["event_type"], r["scope"]) for r in logged] == [("failed_decrypt", None)]
    assert KEY not in repr(logged)


async def test_an_outage_returns_no_plaintext(settings: Settings, database_url: str) -> None:
    name = database_url.rsplit("/", 1)[1]
    holder = await asyncpg.connect(database_url)
    async with KeyManager(settings) as km:
        token = await km.encrypt("anthropic", KEY, context="u.k:1")
        await km.decrypt("anthropic", token, context="u.k:1")  # DEK and grants cached
        await holder.execute("SELECT pg_advisory_lock($1)", CHAIN_LOCK)
        call = asyncio.create_task(km.decrypt_many("anthropic", [(token, "u.k:1")] * 4, actor="outage"))
        await asyncio.sleep(0.3)
        assert not call.done()  # decrypted, its events not committed: nothing is returned yet
        await _admin(f"ALTER DATABASE {name} ALLOW_CONNECTIONS false")
        try:
            holder_pid = await holder.fetchval("SELECT pg_backend_pid()")
            await _admin(
                f"SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                f"WHERE datname = '{name}' AND pid <> {int(holder_pid)}"
            )
            with pytest.raises(StoreUnavailable):
                await asyncio.wait_for(call, 60)
        finally:
            await _admin(f"ALTER DATABASE {name} ALLOW_CONNECTIONS true")
            await holder.close()
        assert await asyncio.wait_for(km.decrypt_many("anthropic", [(token, "u.k:1")]), 60) == [KEY]
    assert await rows(database_url, "actor = 'outage'") == []
