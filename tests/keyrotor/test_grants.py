"""Access control: patterns, denials (raised and audited), the in-process cache and its TTL."""

from __future__ import annotations

import asyncio
import json

import asyncpg
import pytest

from keyrotor import KeyManager, Settings
from keyrotor.audit.grants import Grant, check_pattern, list_grants, pattern_matches
from keyrotor.errors import AccessDenied, InvalidInput, NotFound
from keyrotor.store import db
from tests.keyrotor.audit_helpers import rows

OPENAI = "sk-proj-" + "g5T" * 16


@pytest.mark.parametrize(
    ("pattern", "scope", "expected"),
    [
        ("*", "anthropic", True),
        ("anthropic", "anthropic", True),
        ("anthropic", "openai", False),
        ("tenant-42/*", "tenant-42/openai", True),
        ("tenant-42/*", "tenant-42/x/y", True),
        ("tenant-42/*", "tenant-42", False),
        ("tenant-42/*", "tenant-420/openai", False),
        ("tenant-4/*", "tenant-42/openai", False),
    ],
)
def test_pattern_matches(pattern: str, scope: str, expected: bool) -> None:
    assert pattern_matches(check_pattern(pattern), scope) is expected


@pytest.mark.parametrize("pattern", ["", "**", "Tenant/*", "tenant/**", "*/openai", "a/*/b", "/*"])
def test_bad_patterns(pattern: str) -> None:
    with pytest.raises(InvalidInput):
        check_pattern(pattern)


def test_grant_matching() -> None:
    g = Grant("*", "tenant-1/*", True, False)
    assert g.matches("anyone", "tenant-1/openai") and not g.matches("anyone", "tenant-2/openai")
    assert Grant("alice", "*", False, True).matches("alice", "x") and not Grant(
        "alice", "*", False, True
    ).matches("bob", "x")


async def test_new_install_has_the_wildcard_grant(km: KeyManager) -> None:
    async with db.transaction(km.sessions) as session:
        grants = await list_grants(session)
    assert [(g.actor, g.scope, g.can_encrypt, g.can_decrypt) for g in grants] == [("*", "*", True, True)]
    token = await km.encrypt("anything/at-all", OPENAI, actor="whoever")
    assert await km.decrypt("anything/at-all", token, actor="someone-else") == OPENAI


async def test_denied_calls_raise_and_are_audited(km: KeyManager, database_url: str) -> None:
    token = await km.encrypt("tenant-42/openai", OPENAI, actor="setup")
    await km.revoke("*", "*", by="admin")
    await km.grant("alice", "tenant-42/*", decrypt=True, by="admin")
    await km.grant("writer", "tenant-42/openai", encrypt=True, by="admin")

    assert await km.decrypt("tenant-42/openai", token, actor="alice") == OPENAI
    with pytest.raises(AccessDenied, match="'alice' may not encrypt"):
        await km.encrypt("tenant-42/openai", OPENAI, actor="alice")
    with pytest.raises(AccessDenied):
        await km.decrypt("tenant-42/openai", token, actor="bob")
    with pytest.raises(AccessDenied):
        await km.decrypt("tenant-42/openai", token, actor="writer")
    assert (await km.encrypt("tenant-42/openai", OPENAI, actor="writer")).startswith("kr1:")
    with pytest.raises(AccessDenied):
        await km.put_secret("tenant-42/openai", "k", OPENAI, actor="alice")
    with pytest.raises(AccessDenied):
        await km.get_secret("tenant-42/openai", "k", actor="writer")  # denied before looking it up
    with pytest.raises(AccessDenied):
        await km.decrypt("tenant-42/openai", token)  # the default actor has no grant either
    await km.flush_audit()

    denied = await rows(database_url, "event_type = 'unauthorized'")
    assert [(r["actor"], json.loads(r["metadata"])["operation"]) for r in denied] == [
        ("alice", "encrypt"),
        ("bob", "decrypt"),
        ("writer", "decrypt"),
        ("alice", "encrypt"),
        ("writer", "decrypt"),
        ("system", "decrypt"),
    ]
    assert all(r["scope"] == "tenant-42/openai" and not r["success"] for r in denied)
    # a denial is recorded once, as `unauthorized`, not also as a failed call
    assert await rows(database_url, "event_type = 'failed_decrypt'") == []


async def test_grants_add_up_and_revoke_removes(km: KeyManager) -> None:
    await km.grant("carol", "openai", decrypt=True)
    g = await km.grant("carol", "openai", encrypt=True)
    assert (g.can_encrypt, g.can_decrypt) == (True, True)
    left = await km.revoke("carol", "openai", encrypt=True)
    assert left is not None and (left.can_encrypt, left.can_decrypt) == (False, True)
    assert await km.revoke("carol", "openai") is None
    with pytest.raises(NotFound):
        await km.revoke("carol", "openai")
    with pytest.raises(InvalidInput):
        await km.grant("carol", "openai")  # neither permission
    with pytest.raises(InvalidInput):
        await km.grant("carol", "Open AI", decrypt=True)


async def test_local_changes_apply_at_once(km: KeyManager) -> None:
    token = await km.encrypt("openai", OPENAI, actor="dave")
    await km.decrypt("openai", token, actor="dave")  # cached: allowed
    await km.revoke("*", "*")
    with pytest.raises(AccessDenied):
        await km.decrypt("openai", token, actor="dave")
    await km.grant("dave", "openai", decrypt=True)
    assert await km.decrypt("openai", token, actor="dave") == OPENAI


async def test_other_processes_changes_apply_after_the_ttl(settings: Settings, database_url: str) -> None:
    s = settings.model_copy(update={"grants_ttl_s": 0.3})
    async with KeyManager(s) as km:
        token = await km.encrypt("openai", OPENAI, actor="erin")
        # another process revokes everything (plain SQL: this process hears nothing of it)
        conn = await asyncpg.connect(database_url)
        try:
            await conn.execute("DELETE FROM encryption_grants")
        finally:
            await conn.close()
        assert await km.decrypt("openai", token, actor="erin") == OPENAI  # still cached
        await asyncio.sleep(0.35)
        with pytest.raises(AccessDenied):
            await km.decrypt("openai", token, actor="erin")


async def test_concurrent_reload_loads_once(settings: Settings) -> None:
    async with KeyManager(settings) as km:
        token = await km.encrypt("openai", OPENAI)
        km.grants.invalidate()
        loads = 0
        real = km.grants._reload

        async def counting() -> None:
            nonlocal loads
            loads += 1
            await real()

        km.grants._reload = counting  # type: ignore[method-assign]
        await asyncio.gather(*(km.decrypt("openai", token) for _ in range(50)))
        assert loads == 1
