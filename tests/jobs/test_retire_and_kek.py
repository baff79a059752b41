"""Retirement of old DEKs and KEK rotation (rewrap), through the real queue."""

from __future__ import annotations

import json
from datetime import timedelta

import pytest

from keyrotor import KeyManager, Settings
from keyrotor.queue.client import KeyrotorClient
from keyrotor.rotation.retire import GraceNotOver, KeyStillInUse, NotRetirable
from keyrotor.runs import RunFailed
from tests.conftest import MASTER_KEY
from tests.destruction_helpers import acknowledge
from tests.jobs.conftest import settings_of
from tests.rotation_helpers import check_values, fetch, run_burst_worker, seed

NEW_KEY = "second-master-key-4b8e2a6c0d9f1e3a5c7b9d0e2f4a6c8e"


async def _rotated(s: Settings, scope: str, n: int) -> tuple[dict[str, str], str]:
    """Seed, keep one v1 ciphertext aside (its location acknowledged), rotate. Returns (values,
    old ciphertext)."""
    await acknowledge(s.database_url, "user", "the test keeps this value itself")
    await acknowledge(s.database_url, "", "warm-up values, never stored")
    values = await seed(s, scope, n)
    async with KeyManager(s.model_copy(update={"listen_key_changes": False})) as km:
        old = await km.encrypt(scope, "sk-old-value", context="user:1")
    async with KeyrotorClient(s) as client:
        handle = await client.rotate(scope)
        await run_burst_worker(s)
        await handle.result(timeout_s=5)
    return values, old


async def test_grace_then_retirement_with_stragglers(wenv: dict[str, str]) -> None:
    s = settings_of(wenv, KEYROTOR_ACTIVE_VERSION_TTL_SECONDS="3600")
    quiet = s.model_copy(update={"listen_key_changes": False})
    async with KeyManager(quiet) as stale:
        await stale.encrypt("anthropic", "warm-up")  # caches v1 as active for an hour
        values, old = await _rotated(s, "anthropic", 20)
        # A process with a stale cache keeps writing under v1: stragglers.
        await stale.put_secrets("anthropic", [("straggler-1", "sk-s1"), ("straggler-2", "sk-s2")])
    values.update({"straggler-1": "sk-s1", "straggler-2": "sk-s2"})
    assert await check_values(s, "anthropic", values) == {2: 20, 1: 2}

    async with KeyManager(quiet) as km:  # grace: the old version still decrypts
        assert await km.decrypt("anthropic", old, context="user:1") == "sk-old-value"

    async with KeyrotorClient(s) as client:
        with pytest.raises(GraceNotOver, match="grace until"):
            await client.retire("anthropic", 1)
        with pytest.raises(NotRetirable, match="active"):
            await client.retire("anthropic", 2, force_now=True)
        handle = await client.retire("anthropic", 1, force_now=True)
        await run_burst_worker(s)
        run = await handle.result(timeout_s=5)
    assert run.kind == "retire" and run.rows_done == 2  # the two stragglers
    assert await check_values(s, "anthropic", values) == {2: 22}
    # Retired, not destroyed: the wrapped key is kept for the destruction window.
    key = (await fetch(s.database_url, "SELECT * FROM data_keys WHERE version = 1"))[0]
    assert key["state"] == "retired" and key["encrypted_dek"] is not None and key["destroyed_at"] is None
    assert key["destroy_after"] - key["retired_at"] == timedelta(days=s.destroy_after_days)
    async with KeyManager(
        quiet
    ) as km:  # a retired version still decrypts (audited, see test_destruction_window)
        assert await km.decrypt("anthropic", old, context="user:1") == "sk-old-value"
        assert (await km.encrypt("anthropic", "sk-new")).startswith("kr1:2:")  # never encrypts
    audit = await fetch(s.database_url, "SELECT * FROM encryption_audit_log WHERE event_type = 'retire'")
    assert len(audit) == 1 and audit[0]["key_version"] == 1 and audit[0]["success"]
    assert json.loads(audit[0]["metadata"])["state"] == "retired"


async def test_retirement_refused_while_a_row_still_needs_the_key(wenv: dict[str, str]) -> None:
    s = settings_of(wenv, KEYROTOR_ACTIVE_VERSION_TTL_SECONDS="3600")
    async with KeyManager(s.model_copy(update={"listen_key_changes": False})) as stale:
        await stale.encrypt("openai", "warm-up")
        await _rotated(s, "openai", 5)
        await stale.put_secret("openai", "straggler", "sk-straggler")
    row = (await fetch(s.database_url, "SELECT id, ciphertext FROM secrets WHERE name = 'straggler'"))[0]
    await fetch(
        s.database_url, "UPDATE secrets SET ciphertext = $2 WHERE id = $1", row["id"], row[1][:-2] + "AA"
    )
    async with KeyrotorClient(s) as client:
        handle = await client.retire("openai", 1, force_now=True)
        await run_burst_worker(s)
        with pytest.raises(RunFailed, match=f"KeyStillInUse: .*secrets row id={row['id']}"):
            await handle.result(timeout_s=5)
    key = (await fetch(s.database_url, "SELECT state, encrypted_dek FROM data_keys WHERE version = 1"))[0]
    assert key["state"] == "grace" and key["encrypted_dek"] is not None  # kept
    assert issubclass(KeyStillInUse, Exception)


async def test_rotate_kek_rewraps_every_dek_under_the_new_local_key(wenv: dict[str, str]) -> None:
    s = settings_of(wenv)
    a = await seed(s, "anthropic", 30)
    b = await seed(s, "tenant-1/openai", 30)
    async with KeyrotorClient(s) as client:
        handle = await client.rotate("anthropic")
        await run_burst_worker(s)
        await handle.result(timeout_s=5)
    # The operator moves to KEK version 2, keeping version 1 until the rewrap is done.
    moved = settings_of(
        wenv,
        ENCRYPTION_KEY=NEW_KEY,
        ENCRYPTION_KEY_VERSION="2",
        ENCRYPTION_KEYS_PREVIOUS=f'{{"1": "{MASTER_KEY}"}}',
    )
    async with KeyrotorClient(moved) as client:
        handle = await client.rotate_kek()
        await run_burst_worker(moved)
        run = await handle.result(timeout_s=5)
    assert run.kind == "kek" and run.to_version == 2 and run.rows_done == run.rows_total == 3
    keys = await fetch(s.database_url, "SELECT kek_version, kek_id FROM data_keys")
    assert {k["kek_version"] for k in keys} == {2} and len({k["kek_id"] for k in keys}) == 1
    # The audit chain's key is rewrapped with the DEKs (a KeyManager on the new key alone opens).
    audit_keys = await fetch(s.database_url, "SELECT kek_version FROM audit_keys")
    assert [k["kek_version"] for k in audit_keys] == [2]
    # Only the new key now: every value still decrypts (no secret was re-encrypted).
    only_new = settings_of(wenv, ENCRYPTION_KEY=NEW_KEY, ENCRYPTION_KEY_VERSION="2")
    assert await check_values(only_new, "anthropic", a) == {2: 30}
    assert await check_values(only_new, "tenant-1/openai", b) == {1: 30}
    audit = await fetch(s.database_url, "SELECT * FROM encryption_audit_log WHERE event_type = 'rewrap'")
    assert len(audit) == 3 and all(e["success"] for e in audit)
    # Running it again finds nothing to do.
    async with KeyrotorClient(moved) as client:
        again = await client.rotate_kek()
        await run_burst_worker(moved)
        assert (await again.result(timeout_s=5)).rows_done == 0
