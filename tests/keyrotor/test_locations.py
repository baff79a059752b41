"""Every encrypt records where its value lives: on real Postgres, seen from a second connection."""

from __future__ import annotations

import asyncio
import collections
import os
import random
import sys
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import asyncpg
import pytest

from keyrotor import KeyManager, Settings
from keyrotor.census.locations import location_of
from keyrotor.census.usage import UsageCounter
from keyrotor.queue.client import KeyrotorClient
from keyrotor.rotation import reencrypt
from tests.rotation_helpers import cleanup_queue, run_burst_worker, seed, worker_env

_ROWS = (
    "SELECT s.name AS scope, k.dek_version, k.location, k.encryptions, k.first_seen, k.last_seen "
    "FROM key_locations k JOIN key_scopes s ON s.id = k.scope_id ORDER BY 1, 2, 3"
)


async def _rows(url: str) -> dict[tuple[str, int, str], int]:
    """``(scope, version, location) -> encryptions`` read on a connection of its own."""
    conn = await asyncpg.connect(url)
    try:
        return {
            (r["scope"], r["dek_version"], r["location"]): r["encryptions"] for r in await conn.fetch(_ROWS)
        }
    finally:
        await conn.close()


def _quiet(env: dict[str, str], **extra: Any) -> Settings:
    # No background flush during the test: counts arrive only when the test flushes or closes.
    return Settings.from_env({**env, "KEYROTOR_USAGE_FLUSH_INTERVAL_SECONDS": "3600"}, **extra)


@pytest.mark.parametrize("context", ["users.api_key:42", "settings.api_key:a:b", "plain", "", ":x", "x:"])
def test_the_encrypt_path_finds_the_same_location(context: str) -> None:
    usage = UsageCounter(lambda: pytest.fail("no database"), default_max=10, interval_s=60)
    assert usage.count_context(1, 1, context) == location_of(context)  # new: to be recorded


@pytest.mark.parametrize("seen_max", [1, 2, 3, 1000])
@pytest.mark.parametrize("seed", range(10))
def test_counts_per_location_match_a_plain_count(
    seen_max: int, seed: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The encrypt path's shortcut (the previous location again) counts exactly like a Counter,
    across prefixes of one another, contexts without ':', scopes, versions and evictions."""
    monkeypatch.setattr("keyrotor.census.usage.SEEN_MAX", seen_max)
    usage = UsageCounter(lambda: pytest.fail("no database"), default_max=10, interval_s=60)
    rnd = random.Random(seed)
    contexts = ["ab", "abc", "ab:1", "ab:2", "abc:1", "ab:c:1", "ab:c", "", ":", "x:", "users.api_key:7"]
    expected: collections.Counter[tuple[int, int, str]] = collections.Counter()
    for _ in range(5_000):
        sid, ver, context = rnd.choice([1, 2]), rnd.choice([1, 2]), rnd.choice(contexts)
        expected[(sid, ver, location_of(context))] += 1
        new = usage.count_context(sid, ver, context)
        if new is not None:  # what record() does once its row is written
            assert new == location_of(context)
            usage._remember((sid, ver, new), 1)
        if rnd.random() < 0.01:
            usage._split()  # a flush moves the counts on, any time
    assert usage.pending_locations == dict(expected)


async def test_first_sighting_is_committed_before_encrypt_returns(env: dict[str, str]) -> None:
    url = env["DATABASE_URL"]
    async with KeyManager(_quiet(env)) as km:
        await km.encrypt("anthropic", "sk-ant-warm", context="warm:1")  # creates the scope and v1
        # A second connection holds the table: the first encrypt to a new location must wait
        # for its row to commit, so it cannot return while the row cannot be written.
        blocker = await asyncpg.connect(url)
        try:
            tx = blocker.transaction()
            await tx.start()
            await blocker.execute("LOCK TABLE key_locations IN EXCLUSIVE MODE")
            pending = asyncio.ensure_future(km.encrypt("anthropic", "sk-ant-1", context="users.api_key:42"))
            done, _ = await asyncio.wait({pending}, timeout=1.0)
            assert not done, "encrypt returned before its location was written"
            await tx.rollback()
        finally:
            await blocker.close()
        token = await asyncio.wait_for(pending, timeout=10)
        assert token.startswith("kr1:1:")
        # Returned: the row is there for anyone to see, before any flush.
        assert ("anthropic", 1, "users.api_key") in await _rows(url)
        assert await km.decrypt("anthropic", token, context="users.api_key:42") == "sk-ant-1"


async def test_repeats_write_nothing_and_counts_arrive_with_the_flush(env: dict[str, str]) -> None:
    url = env["DATABASE_URL"]
    async with KeyManager(_quiet(env)) as km:
        for i in range(5):
            await km.encrypt("anthropic", f"sk-ant-{i}", context=f"users.api_key:{i}")
        await km.encrypt("anthropic", "sk-ant-plain")  # no context
        await km.encrypt("openai", "sk-oa", context="plain")
        conn = await asyncpg.connect(url)
        try:
            first = {r["location"]: r["first_seen"] for r in await conn.fetch(_ROWS)}
            # Repeats write nothing: the table stays as the first sightings left it, each with
            # the encryption that wrote it.
            for i in range(5, 50):
                await km.encrypt("anthropic", f"sk-ant-{i}", context=f"users.api_key:{i}")
            assert await _rows(url) == {
                ("anthropic", 1, ""): 1,
                ("anthropic", 1, "users.api_key"): 1,
                ("openai", 1, "plain"): 1,
            }
            assert km.usage.pending_locations[(_sid(km, "anthropic"), 1, "users.api_key")] == 49
            await km.usage.flush()
            assert await _rows(url) == {
                ("anthropic", 1, ""): 1,
                ("anthropic", 1, "users.api_key"): 50,
                ("openai", 1, "plain"): 1,
            }
            await km.encrypt("anthropic", "sk-ant-late", context="users.api_key:99")
            seen = {r["location"]: r for r in await conn.fetch(_ROWS)}
            assert {loc: r["first_seen"] for loc, r in seen.items()} == first
            used = await conn.fetchval(
                "SELECT d.encryptions FROM data_keys d JOIN key_scopes s ON s.id = d.scope_id "
                "WHERE s.name = 'anthropic' AND d.version = 1"
            )
            # The per-DEK count is reserved before use, in blocks of 16, 32, 64 (keyrotor.census.usage):
            # never below what was made.
            assert used == 16 + 32 + 64 >= 51
        finally:
            await conn.close()
    # close() flushed the last one.
    assert (await _rows(url))[("anthropic", 1, "users.api_key")] == 51


def _sid(km: KeyManager, scope: str) -> int:
    return km._active[scope][0]


async def test_put_secrets_record_the_secret_location(env: dict[str, str]) -> None:
    url = env["DATABASE_URL"]
    async with KeyManager(_quiet(env)) as km:
        await km.put_secret("anthropic", "prod", "sk-ant-prod")
        assert await _rows(url) == {("anthropic", 1, "secret"): 1}  # committed with no flush yet
        await km.put_secrets("anthropic", [("a", "sk-a"), ("b", "sk-b")])
    assert await _rows(url) == {("anthropic", 1, "secret"): 3}


async def _count_writes(conn: asyncpg.Connection) -> None:
    """Log every row written to key_locations (insert or upsert) into ``location_writes``."""
    await conn.execute("CREATE TABLE location_writes (location text)")
    await conn.execute(
        "CREATE FUNCTION log_location_write() RETURNS trigger LANGUAGE plpgsql AS "
        "$$ BEGIN INSERT INTO location_writes VALUES (NEW.location); RETURN NEW; END $$"
    )
    await conn.execute(
        "CREATE TRIGGER log_write AFTER INSERT OR UPDATE ON key_locations "
        "FOR EACH ROW EXECUTE FUNCTION log_location_write()"
    )


async def test_concurrent_first_sightings_share_one_write(env: dict[str, str]) -> None:
    url = env["DATABASE_URL"]
    conn = await asyncpg.connect(url)
    try:
        await _count_writes(conn)
        async with KeyManager(_quiet(env)) as km:
            await asyncio.gather(
                *(km.encrypt("anthropic", f"sk-{i}", context=f"orgs.key:{i}") for i in range(20))
            )
            for i in range(20, 40):
                await km.encrypt("anthropic", f"sk-{i}", context=f"orgs.key:{i}")
            writes = await conn.fetchval("SELECT count(*) FROM location_writes")
            assert writes == 1  # one insert for forty encrypts, twenty of them concurrent first ones
        # close() adds the count: one more write, for all forty.
        assert await conn.fetchval("SELECT count(*) FROM location_writes") == 2
    finally:
        await conn.close()
    assert (await _rows(url))[("anthropic", 1, "orgs.key")] == 40


async def test_a_forgotten_location_costs_a_repeat_write_and_no_count(
    env: dict[str, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr("keyrotor.census.usage.SEEN_MAX", 2)
    url = env["DATABASE_URL"]
    async with KeyManager(_quiet(env)) as km:
        for loc in ("a", "b", "c", "a", "b", "c"):  # each one evicts the oldest
            await km.encrypt("anthropic", "sk-x", context=f"{loc}:1")
        assert len(km.usage._located) == 2
    assert await _rows(url) == {("anthropic", 1, "a"): 2, ("anthropic", 1, "b"): 2, ("anthropic", 1, "c"): 2}


async def test_a_failed_first_write_fails_the_encrypt(env: dict[str, str]) -> None:
    """No ciphertext leaves whose location could not be recorded."""
    async with KeyManager(_quiet(env)) as km:
        await km.encrypt("anthropic", "sk-warm")
        conn = await asyncpg.connect(env["DATABASE_URL"])
        try:
            # The table refuses writes: the encrypt must fail, not return an unrecorded value.
            await conn.execute(
                "CREATE FUNCTION refuse() RETURNS trigger LANGUAGE plpgsql AS "
                "$$ BEGIN RAISE EXCEPTION 'refused'; END $$"
            )
            await conn.execute(
                "CREATE TRIGGER refuse BEFORE INSERT ON key_locations FOR EACH ROW EXECUTE FUNCTION refuse()"
            )
            with pytest.raises(Exception, match="refused"):
                await km.encrypt("anthropic", "sk-lost", context="users.api_key:1")
            assert (_sid(km, "anthropic"), 1, "users.api_key") not in km.usage.pending_locations
            await conn.execute("DROP TRIGGER refuse ON key_locations")
        finally:
            await conn.close()
        await km.encrypt("anthropic", "sk-ok", context="users.api_key:1")
    assert (await _rows(env["DATABASE_URL"]))[("anthropic", 1, "users.api_key")] == 1


@pytest.fixture
async def wenv(env: dict[str, str]) -> AsyncIterator[dict[str, str]]:
    e = worker_env(env)
    yield e
    await cleanup_queue(e["KEYROTOR_QUEUE_NAME"])


async def test_rotation_records_where_it_wrote_the_new_version(wenv: dict[str, str]) -> None:
    s = Settings.from_env(wenv)
    await seed(s, "anthropic", 12)
    async with KeyrotorClient(s) as client:
        handle = await client.rotate("anthropic")
        await run_burst_worker(s)
        run = await handle.result(timeout_s=10)
    assert run.state == "completed"
    rows = await _rows(s.database_url)
    assert rows[("anthropic", 1, "secret")] == 12
    assert rows[("anthropic", 2, "secret")] == 12  # committed with the re-encrypted batch


@pytest.mark.parametrize("small", ["1000", "5"])  # one transaction, and fanned out into ranges
async def test_a_batch_written_in_slices_counts_each_row_once(
    wenv: dict[str, str], small: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Batches of 10 rows in slices of 4 (a first read of 4, the rest of 6 read behind it; the
    # UPDATEs of 4, 4 and 2 rows each sent while the next slice is re-sealed), and a short last one.
    monkeypatch.setattr(reencrypt, "PIPELINE_ROWS", 4)
    s = Settings.from_env(
        {
            **wenv,
            "KEYROTOR_SMALL_SCOPE_ROWS": small,
            "KEYROTOR_REENCRYPT_RANGE_ROWS": "12",
            "KEYROTOR_REENCRYPT_BATCH_ROWS": "10",
        }
    )
    values = await seed(s, "anthropic", 23)
    async with KeyrotorClient(s) as client:
        handle = await client.rotate("anthropic")
        await run_burst_worker(s)
        run = await handle.result(timeout_s=30)
    assert run.state == "completed" and run.rows_done == 23
    assert (await _rows(s.database_url))[("anthropic", 2, "secret")] == 23
    async with KeyManager(s.model_copy(update={"listen_key_changes": False})) as km:
        for name, plain in values.items():
            assert await km.get_secret("anthropic", name) == plain


async def test_legacy_migration_records_the_column_it_seals_into(wenv: dict[str, str]) -> None:
    from keyrotor.census import columns
    from keyrotor.legacy import migration as legacy_migration
    from tests.jobs.test_legacy_migration import _app
    from tests.legacy_helpers import legacy_rows

    s = _quiet(wenv, listen_key_changes=False)
    await _app(s, legacy_rows(6))
    async with KeyManager(s) as km:
        await columns.register(km.sessions, "settings.api_key", pk="id", scope_column="provider")
        report = await legacy_migration.migrate_legacy(km, workers=1, batch_rows=16)
        assert report.failed == 0 and report.columns["settings.api_key"].migrated == 6
        # Recorded (committed, with the value that wrote each) before the values were written;
        # the other counts follow with the flush.
        assert await _rows(s.database_url) == {
            ("anthropic", 1, "settings.api_key"): 1,
            ("openai", 1, "settings.api_key"): 1,
        }
    assert await _rows(s.database_url) == {
        ("anthropic", 1, "settings.api_key"): 3,
        ("openai", 1, "settings.api_key"): 3,
    }


async def test_counts_of_many_processes_at_once_add_up(env: dict[str, str]) -> None:
    """Several processes (a KeyManager each: its own counter, pool and flushes) encrypting to
    the same and to their own locations at once: every encryption is counted once."""
    settings = Settings.from_env({**env, "KEYROTOR_USAGE_FLUSH_INTERVAL_SECONDS": "0.05"})
    managers = [KeyManager(settings) for _ in range(4)]
    for m in managers:
        await m.__aenter__()
    try:
        await managers[0].encrypt("openai", "sk-first", context="seed:0")  # one scope, one DEK

        async def work(i: int, m: KeyManager) -> None:
            for j in range(60):
                await m.encrypt("openai", "sk-census", context=f"users.api_key:{j}")
                await m.encrypt("openai", "sk-census", context=f"own{i}.key:{j}")
                if j % 10 == 0:
                    await asyncio.sleep(0.01)  # let the flushes interleave with encrypts

        await asyncio.wait_for(asyncio.gather(*(work(i, m) for i, m in enumerate(managers))), 60)
    finally:
        for m in managers:
            await m.__aexit__(None, None, None)
    rows = await _rows(env["DATABASE_URL"])
    assert rows[("openai", 1, "users.api_key")] == 240
    assert [rows[("openai", 1, f"own{i}.key")] for i in range(4)] == [60] * 4
    assert rows[("openai", 1, "seed")] == 1


_CRASH = """
import asyncio, os, sys
from keyrotor import KeyManager, Settings

async def main() -> None:
    km = KeyManager(Settings.from_env({**os.environ, "KEYROTOR_USAGE_FLUSH_INTERVAL_SECONDS": "3600"}))
    await km.__aenter__()
    token = await km.encrypt("anthropic", "sk-ant-crash", context="users.api_key:7")
    sys.stdout.write(token)
    sys.stdout.flush()
    os._exit(0)  # dies before any flush or close

asyncio.run(main())
"""


async def test_a_process_that_dies_before_its_flush_leaves_its_value_counted(env: dict[str, str]) -> None:
    """The location's row is committed before the ciphertext is returned; so is the count of
    the encryption that wrote it: `columns list` never shows a location holding a value as 0."""
    root = str(Path(__file__).resolve().parents[2])
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-c", _CRASH, env={**os.environ, **env, "PYTHONPATH": root},
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    out, err = await asyncio.wait_for(proc.communicate(), 60)
    assert proc.returncode == 0 and out.startswith(b"kr1:"), err
    assert await _rows(env["DATABASE_URL"]) == {("anthropic", 1, "users.api_key"): 1}
