"""Security (#19, findings 1 and 4): legacy values bound to their row's scope; the open default.

Finding 1, as the review reproduced it: with ``* *`` revoked and ``bob`` granted decrypt on
``public`` only, ``km.decrypt("public", <a legacy value of tenant-a>, actor="bob")`` returned
tenant-a's API key, audited as a successful decrypt in ``public``. Replayed here with no context,
with the context of tenant-a's row, with the context of a public row the value is not stored in,
and with the value swapped (from a backup) into tenant-a's row in place of its kr1 value.

Finding 4: the first migration grants ``* *``; nothing said so. ``health``, ``status`` and
``KeyManager.open`` now say so, and ``keyrotor lock-down`` replaces it in one transaction.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass

import pytest

from keyrotor import KeyManager, Settings
from keyrotor.audit.lockdown import OPEN_GRANT_WARNING
from keyrotor.census import columns
from keyrotor.crypto import legacy_format as legacy
from keyrotor.errors import AccessDenied, LegacyDecryptDisabled
from keyrotor.legacy import migration as legacy_migration
from tests.cli_helpers import keyrotor
from tests.conftest import MASTER_KEY
from tests.legacy_helpers import store_legacy_secret
from tests.rotation_helpers import fetch

CREATE = "CREATE TABLE settings (id bigserial PRIMARY KEY, provider text NOT NULL, api_key text)"
TENANT_KEY = "sk-ant-api03-tenant-a-0123456789"
PUBLIC_KEY = "sk-proj-public-0123456789"
OTHER_MASTER = "another-master-key-that-is-long-enough!!"


@dataclass
class World:
    km: KeyManager
    url: str
    tenant_row: int
    public_row: int
    legacy_a: str  # tenant-a's API key, legacy, stored in tenant_row


def ctx(row: int) -> str:
    return f"settings.api_key:{row}"


@pytest.fixture
async def world(settings: Settings) -> AsyncIterator[World]:
    """A registered column with a scope column: tenant-a's row holds a legacy value, public's a
    kr1 value; ``* *`` revoked, ``bob`` may decrypt in ``public`` only, ``alice`` in tenant-a."""
    url = settings.database_url
    legacy_a = legacy.encrypt(TENANT_KEY, MASTER_KEY)
    await fetch(url, CREATE)
    async with KeyManager(settings.model_copy(update={"listen_key_changes": False})) as km:
        await columns.register(km.sessions, "settings.api_key", pk="id", scope_column="provider")
        (a,) = await fetch(
            url, "INSERT INTO settings (provider, api_key) VALUES ('tenant-a', $1) RETURNING id", legacy_a
        )
        (p,) = await fetch(url, "INSERT INTO settings (provider) VALUES ('public') RETURNING id")
        token = await km.encrypt("public", PUBLIC_KEY, context=ctx(p["id"]))
        await km.encrypt("tenant-a", "warm-up", context="warm-up")
        await fetch(url, "UPDATE settings SET api_key = $1 WHERE id = $2", token, p["id"])
        await km.revoke("*", "*")
        await km.grant("bob", "public", decrypt=True)
        await km.grant("alice", "tenant-a", decrypt=True)
        await km.grant(km.settings.default_actor, "*", encrypt=True)  # the test's own writes
        yield World(km, url, a["id"], p["id"], legacy_a)


async def _events(url: str, actor: str) -> list[tuple[str, str | None, bool]]:
    rows = await fetch(
        url,
        "SELECT event_type, scope, success FROM encryption_audit_log WHERE actor = $1 ORDER BY id",
        actor,
    )
    return [(r["event_type"], r["scope"], r["success"]) for r in rows]


async def test_legacy_value_of_another_tenant_is_refused(world: World, record: Callable[..., None]) -> None:
    km, tries = world.km, 0
    # A legacy value under another master key: had scrypt run, this would be DecryptionFailed.
    unopenable = legacy.encrypt(TENANT_KEY, OTHER_MASTER)
    attempts = [
        (world.legacy_a, ""),  # the review's reproduction: no context at all
        (world.legacy_a, ctx(world.tenant_row)),  # tenant-a's own row, named as public
        (world.legacy_a, ctx(world.public_row)),  # a public row it is not stored in
        (world.legacy_a, "users.api_key:7"),  # an unregistered location
        (world.legacy_a, "secret:anything"),  # no such secret in public
        (unopenable, ""),
        (unopenable, ctx(world.tenant_row)),
    ]
    for value, context in attempts:
        tries += 1
        with pytest.raises(AccessDenied) as caught:
            await km.decrypt("public", value, context=context, actor="bob")
        assert TENANT_KEY not in str(caught.value) and value not in str(caught.value)
    await km.flush_audit()
    events = await _events(world.url, "bob")
    assert events == [("unauthorized", "public", False)] * len(attempts)
    # bob still reads what is public.
    token = (await fetch(world.url, "SELECT api_key FROM settings WHERE id = $1", world.public_row))[0][0]
    assert await km.decrypt("public", token, context=ctx(world.public_row), actor="bob") == PUBLIC_KEY
    record(
        "security",
        finding=1,
        what="bob (decrypt on public only) opens tenant-a's legacy value: no context, tenant-a's row, "
        "a public row, an unregistered location, a missing secret",
        tries=tries,
        held=tries,
        scrypt_runs=0,
    )


async def test_swapped_in_legacy_value_is_refused_outside_its_scope(
    world: World, record: Callable[..., None]
) -> None:
    km = world.km
    # tenant-a's row is migrated to kr1; a column writer puts the old legacy value back from a backup.
    kr1 = await km.encrypt("tenant-a", TENANT_KEY, context=ctx(world.tenant_row))
    await fetch(world.url, "UPDATE settings SET api_key = $1 WHERE id = $2", kr1, world.tenant_row)
    await fetch(world.url, "UPDATE settings SET api_key = $1 WHERE id = $2", world.legacy_a, world.tenant_row)
    with pytest.raises(AccessDenied, match="belongs to another scope"):
        await km.decrypt("public", world.legacy_a, context=ctx(world.tenant_row), actor="bob")
    # Swapped into the public row instead, it is not the value that row's scope column names...
    # the row is public, so the swap is a write into public: that is the column writer's power,
    # and it ends with KEYROTOR_LEGACY_DECRYPT=off (tested below). Named as tenant-a it is refused.
    await fetch(world.url, "UPDATE settings SET api_key = $1 WHERE id = $2", world.legacy_a, world.public_row)
    with pytest.raises(AccessDenied, match="belongs to another scope"):
        await km.decrypt("tenant-a", world.legacy_a, context=ctx(world.public_row), actor="alice")
    record(
        "security",
        finding=1,
        what="a legacy value swapped into another scope's row (from a backup), opened in the wrong scope",
        tries=2,
        held=2,
    )


async def test_the_right_scope_context_and_grant_open_a_legacy_value(world: World) -> None:
    km = world.km
    value = await km.decrypt("tenant-a", world.legacy_a, context=ctx(world.tenant_row), actor="alice")
    assert value == TENANT_KEY
    # ...but not without the grant: bob may not decrypt in tenant-a at all.
    with pytest.raises(AccessDenied):
        await km.decrypt("tenant-a", world.legacy_a, context=ctx(world.tenant_row), actor="bob")
    # keyrotor's own secrets: the secret of that name in that scope, holding that value.
    await store_legacy_secret(world.url, "tenant-a", "prod", world.legacy_a)
    assert await km.get_secret("tenant-a", "prod", actor="alice") == TENANT_KEY
    assert await km.decrypt("tenant-a", world.legacy_a, context="secret:prod", actor="alice") == TENANT_KEY
    with pytest.raises(AccessDenied):
        await km.decrypt("tenant-a", world.legacy_a, context="secret:other", actor="alice")
    # A fixed-scope column: its scope is the only one.
    await fetch(world.url, "CREATE TABLE pub (id integer PRIMARY KEY, k text)")
    await fetch(world.url, "INSERT INTO pub VALUES (5, $1)", world.legacy_a)
    await columns.register(km.sessions, "pub.k", pk="id", scope="tenant-a")
    assert await km.decrypt("tenant-a", world.legacy_a, context="pub.k:5", actor="alice") == TENANT_KEY
    with pytest.raises(AccessDenied):
        await km.decrypt("public", world.legacy_a, context="pub.k:5", actor="bob")
    await km.flush_audit()
    assert ("decrypt", "tenant-a", True) in await _events(world.url, "alice")


async def test_text_and_uuid_keys_bind_too(world: World) -> None:
    km, url = world.km, world.url
    await fetch(url, "CREATE TABLE tk (k text PRIMARY KEY, scope text NOT NULL, v text)")
    await fetch(url, "INSERT INTO tk VALUES ('cus:é1', 'tenant-a', $1)", world.legacy_a)
    await columns.register(km.sessions, "tk.v", pk="k", scope_column="scope")
    assert await km.decrypt("tenant-a", world.legacy_a, context="tk.v:cus:é1", actor="alice") == TENANT_KEY
    with pytest.raises(AccessDenied):
        await km.decrypt("public", world.legacy_a, context="tk.v:cus:é1", actor="bob")
    await fetch(url, "CREATE TABLE uk (id uuid PRIMARY KEY, v text)")
    (row,) = await fetch(
        url, "INSERT INTO uk VALUES (gen_random_uuid(), $1) RETURNING id::text", world.legacy_a
    )
    await columns.register(km.sessions, "uk.v", pk="id", scope="tenant-a")
    good = f"uk.v:{row[0]}"
    assert await km.decrypt("tenant-a", world.legacy_a, context=good, actor="alice") == TENANT_KEY
    for bad in (f"uk.v:{row[0].upper()}", "uk.v:not-a-uuid", "uk.v:"):  # no row, and no SQL error
        with pytest.raises(AccessDenied):
            await km.decrypt("tenant-a", world.legacy_a, context=bad, actor="alice")


async def test_legacy_decrypt_off_refuses(world: World, settings: Settings) -> None:
    s = settings.model_copy(update={"legacy_decrypt": "off", "listen_key_changes": False})
    assert (
        Settings.from_env({"ENCRYPTION_KEY": MASTER_KEY, "KEYROTOR_LEGACY_DECRYPT": "off"}).legacy_decrypt
        == "off"
    )
    async with KeyManager(s) as km:
        with pytest.raises(LegacyDecryptDisabled, match="keyrotor legacy migrate"):
            await km.decrypt("tenant-a", world.legacy_a, context=ctx(world.tenant_row), actor="alice")


async def test_status_counts_and_migrate_says_when_off_is_safe(world: World, env: dict[str, str]) -> None:
    await store_legacy_secret(world.url, "tenant-a", "prod", world.legacy_a)
    status = keyrotor("status", "--json", env=env)
    assert status.returncode == 0, status.stderr
    assert json.loads(status.stdout)["legacy"] == {"remaining": 2}  # the column's row and the secret
    text_status = keyrotor("status", env=env)
    assert "legacy values remaining: 2" in " ".join(text_status.stderr.split())
    dry = keyrotor("legacy", "migrate", "--dry-run", env={**env, "KEYROTOR_LEGACY_WORKERS": "1"})
    assert dry.returncode == 0, dry.stderr
    assert "2 legacy values remain" in " ".join(dry.stderr.split()) and "safe" not in dry.stderr
    report = await legacy_migration.migrate_legacy(world.km, workers=1)
    assert report.migrated == 2 and report.failed == 0
    after = keyrotor("legacy", "migrate", "--dry-run", "--json", env={**env, "KEYROTOR_LEGACY_WORKERS": "1"})
    assert after.returncode == 0, after.stderr
    doc = json.loads(after.stdout)
    assert doc["legacy_remaining"] == 0 and doc["safe_to_disable_legacy_decrypt"] is True
    plain = keyrotor("legacy", "migrate", "--dry-run", env={**env, "KEYROTOR_LEGACY_WORKERS": "1"})
    assert "it is now safe to set KEYROTOR_LEGACY_DECRYPT=off" in " ".join(plain.stderr.split())
    assert json.loads(keyrotor("status", "--json", env=env).stdout)["legacy"] == {"remaining": 0}


# --- finding 4 ---------------------------------------------------------------------------------


async def test_open_default_is_reported_and_lock_down_replaces_it(
    env: dict[str, str], settings: Settings, caplog: pytest.LogCaptureFixture, record: Callable[..., None]
) -> None:
    url = settings.database_url
    with caplog.at_level(logging.WARNING, logger="keyrotor.keys"):
        async with KeyManager(settings.model_copy(update={"listen_key_changes": False})) as km:
            await km.encrypt("tenant-a", TENANT_KEY, actor="anyone-at-all")
    assert [r.getMessage() for r in caplog.records if r.name == "keyrotor.keys"].count(
        OPEN_GRANT_WARNING
    ) == 1
    health = json.loads(keyrotor("health", "--json", env=env).stdout)
    assert (
        health["checks"]["grants"]["status"] == "warn" and "lock-down" in health["checks"]["grants"]["error"]
    )
    status = json.loads(keyrotor("status", "--json", env=env).stdout)
    assert status["grants"]["wildcard"] is True
    assert "'* *'" in keyrotor("status", env=env).stderr
    # Refused, and nothing changed, when nobody could decrypt afterwards.
    empty = keyrotor("lock-down", "--grant", "writer:tenant-a:encrypt", env=env)
    assert empty.returncode == 2 and empty.stderr.startswith("keyrotor: error: after lock-down nobody")
    assert len(await fetch(url, "SELECT 1 FROM encryption_grants WHERE actor = '*'")) == 1
    assert not await fetch(url, "SELECT 1 FROM encryption_grants WHERE actor = 'writer'")
    bad = keyrotor("lock-down", "--grant", "*:*:decrypt", env=env)
    assert bad.returncode == 2 and "Traceback" not in bad.stderr
    t0 = time.perf_counter()
    done = keyrotor(
        "lock-down",
        "--grant",
        "user:42:tenant-a:decrypt,encrypt",
        "--grant",
        "billing:tenant-b/*:decrypt",
        "--as",
        "ops",
        "--json",
        env=env,
    )
    elapsed = time.perf_counter() - t0
    assert done.returncode == 0, done.stderr
    doc = json.loads(done.stdout)
    assert doc["wildcard_removed"] is True and doc["decrypt_grants"] == 2
    grants = {
        (r["actor"], r["scope_pattern"], r["can_encrypt"], r["can_decrypt"])
        for r in await fetch(url, "SELECT * FROM encryption_grants")
    }
    assert grants == {("user:42", "tenant-a", True, True), ("billing", "tenant-b/*", False, True)}
    changes = await fetch(
        url,
        "SELECT metadata->>'what' AS what FROM encryption_audit_log "
        "WHERE event_type = 'config_change' AND actor = 'ops' ORDER BY id",
    )
    assert [r["what"] for r in changes] == ["grant", "grant", "revoke", "lock_down"]
    assert json.loads(keyrotor("health", "--json", env=env).stdout)["checks"]["grants"]["status"] == "ok"
    assert json.loads(keyrotor("status", "--json", env=env).stdout)["grants"] == {
        "wildcard": False,
        "warning": None,
    }
    caplog.clear()
    async with KeyManager(settings.model_copy(update={"listen_key_changes": False})) as km:
        with pytest.raises(AccessDenied):
            await km.decrypt("tenant-a", "kr1:1:AAAA", actor="anyone-at-all")
        assert (
            await km.decrypt("tenant-a", await km.encrypt("tenant-a", "v", actor="user:42"), actor="user:42")
            == "v"
        )
    assert OPEN_GRANT_WARNING not in [r.getMessage() for r in caplog.records]
    record(
        "security",
        finding=4,
        what="the open default '* *' reported (health warn, status, start-up log), then replaced "
        "by `keyrotor lock-down`; an unnamed actor refused afterwards",
        tries=1,
        held=1,
        lock_down_s=round(elapsed, 2),
    )


async def test_scheduler_start_up_warns_of_the_open_default(settings: Settings) -> None:
    from structlog.testing import capture_logs

    from keyrotor.worker.scheduler import Scheduler

    with capture_logs() as logs:
        async with Scheduler(settings):
            pass
    warned = [e for e in logs if e.get("event") == "open_default_grant"]
    assert len(warned) == 1 and warned[0]["log_level"] == "warning"
    assert warned[0]["detail"] == OPEN_GRANT_WARNING
