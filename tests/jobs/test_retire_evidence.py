"""Retirement and destruction against what says a DEK is still needed, in process on the real
Postgres and Redis: a value whose row names another version than its ciphertext, a use of a
retired version recorded before someone retires it again, a process whose cache still names a
retired version as active, a destruction whose announcement was lost, a use of a retired
version while the database is out of reach, and two attempts of one destruction at once.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator
from dataclasses import replace
from datetime import UTC, datetime

import asyncpg
import pytest
import redis.asyncio as aioredis

from keyrotor import KeyManager, Settings
from keyrotor.census import usage
from keyrotor.errors import (
    ConfigurationError,
    KeyVersionTooOld,
    PermanentError,
    QueueUnavailable,
    StoreUnavailable,
)
from keyrotor.notify import KeyChange, Notifier
from keyrotor.rotation import dek as rotation
from keyrotor.rotation import destruction, retire
from keyrotor.rotation.context import RotationContext
from keyrotor.rotation.retire import KeyStillInUse
from keyrotor.schedule import scan as schedule
from tests.destruction_helpers import acknowledge, expire_window, key_row
from tests.jobs.conftest import settings_of
from tests.replication.proxy import PgProxy
from tests.rotation_helpers import fetch

SCOPE = "openai"


@pytest.fixture
async def app(wenv: dict[str, str]) -> AsyncIterator[tuple[Settings, KeyManager, RotationContext]]:
    s = settings_of(wenv, KEYROTOR_LISTEN_KEY_CHANGES="false")
    async with KeyManager(s) as km:
        yield s, km, RotationContext(km.sessions, km.kek, s)


async def _scan(km: KeyManager) -> AsyncIterator[schedule.Batch]:
    async for batch in schedule.open_due_destructions(km.sessions, datetime.now(UTC), schedule.ScanConfig()):
        yield batch


async def _destroy_due(km: KeyManager, rc: RotationContext, version: int) -> list[str]:
    """Run every destruction the scheduler's scan opens now; their outcomes (or refusals)."""
    outcomes: list[str] = []
    async for batch in _scan(km):
        for run in batch.opened:
            try:
                outcomes.append((await destruction.destroy_dek(rc, SCOPE, version, run_id=run.id)).outcome)
            except PermanentError as exc:
                outcomes.append(type(exc).__name__)
    return outcomes


async def test_a_secret_restored_from_a_backup_keeps_its_dek(
    app: tuple[Settings, KeyManager, RotationContext],
) -> None:
    s, km, rc = app
    await km.put_secret(SCOPE, "billing", "sk-billing-0123456789")
    (backup,) = await fetch(s.database_url, "SELECT ciphertext FROM secrets WHERE name = 'billing'")
    await rotation.rotate_dek(rc, SCOPE)
    # The operator restores the value column from last week's dump: the row's dek_version still
    # says 2, the ciphertext is v1's and decrypts (same scope, same name: the same AAD).
    await fetch(s.database_url, "UPDATE secrets SET ciphertext = $1 WHERE name = 'billing'", backup[0])
    km.invalidate()
    assert await km.get_secret(SCOPE, "billing") == "sk-billing-0123456789"

    try:
        done = await retire.retire_dek(rc, SCOPE, 1, force_now=True)
    except KeyStillInUse:
        pytest.fail("the restored value was neither counted nor moved to the active DEK")
    assert done.stragglers == 1  # moved like any straggler: ciphertext and version column
    rows = await fetch(s.database_url, "SELECT dek_version, ciphertext FROM secrets WHERE name = 'billing'")
    assert rows[0][0] == 2 and rows[0][1].startswith("kr1:2:")
    await expire_window(s.database_url, SCOPE, 1)
    await _destroy_due(km, rc, 1)
    km.invalidate()
    try:
        assert await km.get_secret(SCOPE, "billing") == "sk-billing-0123456789"
    except KeyVersionTooOld:
        pytest.fail("v1 was destroyed while a secret's ciphertext still needed it")


async def test_retiring_again_keeps_the_uses_of_the_pending_window(
    app: tuple[Settings, KeyManager, RotationContext],
) -> None:
    s, km, rc = app
    await km.put_secret(SCOPE, "billing", "sk-billing-0123456789")
    # A copy the proof cannot count: a v1 value kept outside the database (a cache, a message)
    # under a covered context; only its decrypts show that v1 is still needed.
    outside = await km.encrypt(SCOPE, "sk-copied-0123456789", context="secret:billing")
    await rotation.rotate_dek(rc, SCOPE)
    await retire.retire_dek(rc, SCOPE, 1, force_now=True)
    km.invalidate()
    assert await km.decrypt(SCOPE, outside, context="secret:billing") == "sk-copied-0123456789"
    assert await fetch(s.database_url, "SELECT 1 FROM retired_key_uses WHERE dek_version = 1")

    # Before the scheduler's destruction run sees that use, someone retires v1 again (a
    # script that retires idempotently): the proof holds, and the use must still count.
    await retire.retire_dek(rc, SCOPE, 1, force_now=True)
    await expire_window(s.database_url, SCOPE, 1)
    assert await _destroy_due(km, rc, 1) == [destruction.CANCELLED]
    key = await key_row(s.database_url, SCOPE, 1)
    assert key["state"] == "retired" and key["encrypted_dek"] is not None and key["destroy_after"] is None

    # Retiring after the cancellation is the operator's answer to it: a new window, from which
    # the old uses no longer count.
    await acknowledge(s.database_url, "secret", "test")  # unused: the location is covered
    await retire.retire_dek(rc, SCOPE, 1, force_now=True)
    await expire_window(s.database_url, SCOPE, 1)
    assert await _destroy_due(km, rc, 1) == [destruction.DESTROYED]


async def test_a_stale_process_reserves_no_new_encryptions_of_a_retired_version(
    app: tuple[Settings, KeyManager, RotationContext], wenv: dict[str, str]
) -> None:
    _, _, rc = app
    stale_s = settings_of(
        wenv, KEYROTOR_LISTEN_KEY_CHANGES="false", KEYROTOR_ACTIVE_VERSION_TTL_SECONDS="3600"
    )
    async with KeyManager(stale_s) as stale:
        # Caches v1 as the active version for an hour and reserves its first block of v1.
        first = await stale.encrypt(SCOPE, "warm-up", context="secret:warm-up")
        assert first.startswith("kr1:1:")
        await rotation.rotate_dek(rc, SCOPE)
        await retire.retire_dek(rc, SCOPE, 1, force_now=True)
        # It never heard of either. What it had reserved of v1 it may still use; no more.
        sealed = [await stale.encrypt(SCOPE, f"sk-late-{i}", context=f"secret:late{i}") for i in range(40)]
    on_v1 = sum(v.startswith("kr1:1:") for v in sealed)
    assert on_v1 <= usage.BLOCK_FIRST - 1, f"{on_v1} new values sealed with the retired v1"
    assert all(v.startswith("kr1:2:") for v in sealed[on_v1:])


def test_the_active_version_ttl_ends_well_before_a_destruction_window() -> None:
    # A process trusts its active version for this long without a notification: were it as
    # long as the shortest window, a process could still encrypt with a DEK that was destroyed.
    with pytest.raises(ConfigurationError, match="KEYROTOR_ACTIVE_VERSION_TTL_SECONDS"):
        Settings.from_env({"KEYROTOR_ACTIVE_VERSION_TTL_SECONDS": str(7 * 86_400)})


async def test_a_destruction_run_again_after_its_commit_announces_it(
    app: tuple[Settings, KeyManager, RotationContext],
) -> None:
    s, km, rc = app
    await km.put_secret(SCOPE, "billing", "sk-billing-0123456789")
    await rotation.rotate_dek(rc, SCOPE)
    await retire.retire_dek(rc, SCOPE, 1, force_now=True)
    await expire_window(s.database_url, SCOPE, 1)
    (run,) = [r async for b in _scan(km) for r in b.opened]

    # Redis goes away just after the erasure committed: the announcement is lost and the job
    # fails with a transient error, which arq retries.
    gone = aioredis.from_url("redis://127.0.0.1:1/0", socket_connect_timeout=1)
    down = replace(rc, notifier=Notifier(gone, s.notify_channel))
    with pytest.raises(QueueUnavailable):
        await destruction.destroy_dek(down, SCOPE, 1, run_id=run.id)
    await gone.aclose()
    assert (await key_row(s.database_url, SCOPE, 1))["state"] == "destroyed"

    redis = aioredis.from_url(s.redis_url)
    try:
        async with redis.pubsub() as sub:
            await sub.subscribe(s.notify_channel)
            up = replace(rc, notifier=Notifier(redis, s.notify_channel))
            retried = await destruction.destroy_dek(up, SCOPE, 1, run_id=run.id)
            assert retried.outcome == destruction.DESTROYED
            heard: list[KeyChange | None] = []
            deadline = time.monotonic() + 5
            while time.monotonic() < deadline and KeyChange("destroyed", SCOPE, 1) not in heard:
                msg = await sub.get_message(ignore_subscribe_messages=True, timeout=0.2)
                if msg is not None:
                    heard.append(KeyChange.decode(msg["data"]))
    finally:
        await redis.aclose()
    assert KeyChange("destroyed", SCOPE, 1) in heard, "processes caching v1 were never told it is gone"


async def test_a_use_of_a_retired_version_is_recorded_before_its_value_is_returned(
    app: tuple[Settings, KeyManager, RotationContext], wenv: dict[str, str]
) -> None:
    s, km, rc = app
    first = await km.encrypt(SCOPE, "sk-first-0123456789", context="secret:first")
    # A v1 value kept outside the database (a cache, a message): only its decrypts say v1 is needed.
    kept = await km.encrypt(SCOPE, "sk-kept-0123456789", context="secret:kept:copy")
    await rotation.rotate_dek(rc, SCOPE)
    await retire.retire_dek(rc, SCOPE, 1, force_now=True)
    proxy = PgProxy()
    await proxy.start()
    app_s = settings_of(
        wenv,
        DATABASE_URL=proxy.url(s.database_url.rsplit("/", 1)[1]),
        KEYROTOR_AUDIT="async",
        KEYROTOR_LISTEN_KEY_CHANGES="false",
        KEYROTOR_ACTIVE_VERSION_TTL_SECONDS="3600",
    )
    try:
        async with KeyManager(app_s) as app_km:
            # The application loads v1 as retired; this use cancels the first window.
            assert await app_km.decrypt(SCOPE, first, context="secret:first") == "sk-first-0123456789"
            await expire_window(s.database_url, SCOPE, 1)
            assert await _destroy_due(km, rc, 1) == [destruction.CANCELLED]
            await acknowledge(s.database_url, "secret", "test")  # unused: the location is covered
            await retire.retire_dek(rc, SCOPE, 1, force_now=True)  # the operator's answer: a new window
            # The database is out of reach when the kept value is next needed.
            await proxy.cut()
            try:
                opened = await app_km.decrypt(SCOPE, kept, context="secret:kept:copy")
            except StoreUnavailable:
                opened = None  # refused for now; the caller retries once the database is back
            await proxy.heal()
            if opened is None:
                assert await app_km.decrypt(SCOPE, kept, context="secret:kept:copy") == "sk-kept-0123456789"
    finally:
        await proxy.close()
    await expire_window(s.database_url, SCOPE, 1)
    outcome = await _destroy_due(km, rc, 1)
    assert outcome == [destruction.CANCELLED], (
        "v1 was erased though a value of it was decrypted in its window"
    )


async def test_two_attempts_of_one_destruction_at_once_keep_its_outcome(
    app: tuple[Settings, KeyManager, RotationContext],
) -> None:
    s, km, rc = app
    await km.put_secret(SCOPE, "billing", "sk-billing-0123456789")
    await rotation.rotate_dek(rc, SCOPE)
    await retire.retire_dek(rc, SCOPE, 1, force_now=True)
    await expire_window(s.database_url, SCOPE, 1)
    (run,) = [r async for b in _scan(km) for r in b.opened]

    # arq runs the job again, in another worker, while the first attempt is still at work (its
    # lease ran out): both wait on the key's row, one erases the key, the other finds it erased.
    blocker = await asyncpg.connect(s.database_url)
    try:
        tx = blocker.transaction()
        await tx.start()
        await blocker.execute("SELECT 1 FROM data_keys WHERE version = 1 FOR UPDATE")
        async with KeyManager(s) as other:
            rc2 = RotationContext(other.sessions, other.kek, s)
            attempts = [
                asyncio.create_task(destruction.destroy_dek(c, SCOPE, 1, run_id=run.id)) for c in (rc, rc2)
            ]
            deadline = time.monotonic() + 4  # within the proof's lock timeout (5 s)
            waiting = (
                "SELECT count(*) FROM pg_stat_activity "
                "WHERE wait_event_type = 'Lock' AND datname = current_database()"
            )
            while await blocker.fetchval(waiting) < 2:
                assert time.monotonic() < deadline, "the attempts never reached the key's row"
                await asyncio.sleep(0.02)
            await tx.rollback()
            outcomes = [r.outcome for r in await asyncio.wait_for(asyncio.gather(*attempts), 30)]
    finally:
        await blocker.close()
    assert outcomes == [destruction.DESTROYED] * 2
    # What the run recorded is what a later retry answers (and acts on: the regions' copies
    # are dropped and the erasure announced only for a run that erased the key).
    again = await destruction.destroy_dek(rc, SCOPE, 1, run_id=run.id)
    assert again.outcome == destruction.DESTROYED and again.run.detail["outcome"] == "destroyed"
