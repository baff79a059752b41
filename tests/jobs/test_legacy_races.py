"""Legacy migration against what the application does meanwhile, and against odd rows.

Real Postgres, real scrypt. The race tests hold the migration's scrypt in a real thread pool
behind a gate, so the application's write lands exactly between the batch's read and its
compare-and-swap, where a real migration spends its 30-80 ms a value with no row lock held.
"""

from __future__ import annotations

import asyncio
import base64
import concurrent.futures
import json
import os
import threading
from collections.abc import Callable
from typing import Any

import pytest

from keyrotor import KeyManager, Settings, runs
from keyrotor.census import columns
from keyrotor.errors import ConfigurationError
from keyrotor.legacy import migration as legacy_migration
from keyrotor.legacy import ranges as legacy_ranges
from keyrotor.legacy import scope as legacy_scope
from keyrotor.rotation import dek as rotation
from keyrotor.rotation import retire
from keyrotor.rotation.context import RotationContext
from keyrotor.store import db
from tests.conftest import MASTER_KEY
from tests.jobs.conftest import settings_of
from tests.legacy_helpers import legacy_rows
from tests.rotation_helpers import fetch, keyrotor

CREATE = "CREATE TABLE settings (id bigserial PRIMARY KEY, provider text NOT NULL, api_key text)"


def _quiet(s: Settings) -> Settings:
    return s.model_copy(update={"listen_key_changes": False})


class GatedPool(concurrent.futures.ThreadPoolExecutor):
    """A real thread pool whose work waits, once started, until the test opens the gate."""

    def __init__(self) -> None:
        super().__init__(max_workers=2)
        self.started = threading.Event()
        self.gate = threading.Event()

    def submit(self, fn: Callable[..., Any], /, *args: Any, **kwargs: Any) -> concurrent.futures.Future[Any]:
        def gated() -> Any:
            self.started.set()
            if not self.gate.wait(30):
                raise TimeoutError("the test never opened the gate")
            return fn(*args, **kwargs)

        return super().submit(gated)


async def _insert(url: str, rows: list[tuple[str, str]]) -> list[int]:
    got = await fetch(
        url,
        "INSERT INTO settings (provider, api_key) SELECT * FROM unnest($1::text[], $2::text[]) RETURNING id",
        [r[0] for r in rows],
        [r[1] for r in rows],
    )
    return [r["id"] for r in got]


async def _while_scrypt_runs(km: KeyManager, write: Callable[[], Any]) -> legacy_migration.LegacyReport:
    """Migrate, making the application's ``write`` while the first batch's scrypt is under way."""
    pool = GatedPool()
    try:
        task = asyncio.create_task(legacy_migration.migrate_legacy(km, executor=pool, workers=1))
        assert await asyncio.to_thread(pool.started.wait, 30), "the migration never reached scrypt"
        await write()
        pool.gate.set()
        return await asyncio.wait_for(task, 60)
    finally:
        pool.gate.set()
        pool.shutdown(wait=True)


async def test_a_row_moved_to_another_scope_meanwhile_is_not_sealed_under_the_old_one(
    wenv: dict[str, str],
) -> None:
    """The application moves a row to another scope (same value) while scrypt runs: the value
    must not be written sealed under the scope the batch read, where the row's new scope can
    neither open it nor count it (a later retirement of that scope's DEK would lose it)."""
    s = settings_of(wenv)
    (provider, plain, value), *rest = legacy_rows()[:3]
    assert provider == "anthropic"
    await fetch(s.database_url, CREATE)
    ids = await _insert(s.database_url, [(provider, value), *((p, v) for p, _t, v in rest)])
    async with KeyManager(_quiet(s)) as km:
        await columns.register(km.sessions, "settings.api_key", pk="id", scope_column="provider")

        async def move() -> None:
            await fetch(s.database_url, "UPDATE settings SET provider = 'openai' WHERE id = $1", ids[0])

        report = await _while_scrypt_runs(km, move)
        rep = report.columns["settings.api_key"]
        assert rep.changed == [ids[0]] and rep.migrated == 2 and report.failed == 0
        (row,) = await fetch(s.database_url, "SELECT provider, api_key FROM settings WHERE id = $1", ids[0])
        assert row["provider"] == "openai" and row["api_key"] == value  # left to the application
        assert await km.decrypt("openai", row["api_key"], context=f"settings.api_key:{ids[0]}") == plain
        again = await legacy_migration.migrate_legacy(km, workers=1)  # the next run migrates it
        assert again.migrated == 1
        (row,) = await fetch(s.database_url, "SELECT api_key FROM settings WHERE id = $1", ids[0])
        assert await km.decrypt("openai", row["api_key"], context=f"settings.api_key:{ids[0]}") == plain


async def test_empty_and_null_values_are_no_values(wenv: dict[str, str]) -> None:
    """'' and NULL hold no key: not legacy, not failed, not counted as left to migrate."""
    s = settings_of(wenv)
    rows = legacy_rows()[:2]
    await fetch(s.database_url, CREATE)
    ids = await _insert(s.database_url, [(p, v) for p, _t, v in rows])
    await fetch(
        s.database_url, "INSERT INTO settings (provider, api_key) VALUES ('openai', ''), ('openai', NULL)"
    )
    async with KeyManager(_quiet(s)) as km:
        await columns.register(km.sessions, "settings.api_key", pk="id", scope_column="provider")
        dry = await legacy_migration.migrate_legacy(km, dry_run=True, workers=1)
        assert dry.failed == 0 and dry.migrated == 2
        report = await legacy_migration.migrate_legacy(km, workers=1)
        rep = report.columns["settings.api_key"]
        assert report.failed == 0 and rep.migrated == 2 and rep.legacy_found == 2
        async with db.transaction(km.sessions) as session:
            assert await legacy_scope.legacy_remaining(session) == 0
        for i, (provider, plain, _v) in zip(ids, rows, strict=True):
            (row,) = await fetch(s.database_url, "SELECT api_key FROM settings WHERE id = $1", i)
            assert await km.decrypt(provider, row["api_key"], context=f"settings.api_key:{i}") == plain
    left = await fetch(s.database_url, "SELECT api_key FROM settings WHERE api_key IS NULL OR api_key = ''")
    assert sorted(r["api_key"] is None for r in left) == [False, True]


async def test_a_dry_run_writes_nothing_at_all(wenv: dict[str, str]) -> None:
    """No scope, DEK, census location or encryption reservation comes out of a dry run."""
    s = settings_of(wenv)
    rows = legacy_rows()[:3]
    await fetch(s.database_url, CREATE)
    await _insert(s.database_url, [(p, v) for p, _t, v in rows])
    async with KeyManager(_quiet(s)) as km:
        await columns.register(km.sessions, "settings.api_key", pk="id", scope_column="provider")
        before = [
            await fetch(s.database_url, f"SELECT count(*) FROM {t}")
            for t in ("key_scopes", "data_keys", "key_locations")
        ]
        dry = await legacy_migration.migrate_legacy(km, dry_run=True, workers=1)
        assert dry.migrated == 3 and dry.failed == 0
        after = [
            await fetch(s.database_url, f"SELECT count(*) FROM {t}")
            for t in ("key_scopes", "data_keys", "key_locations")
        ]
    assert after == before


async def _keyed_table(url: str, kind: str, rows: list[tuple[str, str, str]]) -> dict[str, tuple[str, str]]:
    if kind == "uuid":
        await fetch(url, "CREATE TABLE keyed (id uuid PRIMARY KEY, provider text NOT NULL, api_key text)")
        keys = [
            str(r[0])
            for r in await fetch(url, "SELECT gen_random_uuid() FROM generate_series(1, $1)", len(rows))
        ]
    else:
        await fetch(url, "CREATE TABLE keyed (id text PRIMARY KEY, provider text NOT NULL, api_key text)")
        keys = [f"cus:{i:03d}:é" if i % 2 else f"Z-{i}" for i in range(len(rows))]
    await fetch(
        url,
        "INSERT INTO keyed (id, provider, api_key) "
        f"SELECT * FROM unnest($1::{kind}[], $2::text[], $3::text[])",
        keys,
        [r[0] for r in rows],
        [r[2] for r in rows],
    )
    return {k: (r[0], r[1]) for k, r in zip(keys, rows, strict=True)}


async def _check_keyed(km: KeyManager, url: str, expected: dict[str, tuple[str, str]]) -> None:
    got = await fetch(url, "SELECT id::text, api_key FROM keyed")
    assert len(got) == len(expected)
    for row in got:
        provider, plain = expected[row[0]]
        assert row[1].startswith("kr1:"), row[0]
        assert await km.decrypt(provider, row[1], context=f"keyed.api_key:{row[0]}") == plain


async def test_text_and_uuid_keys_migrate_in_batches_and_in_ranges(wenv: dict[str, str]) -> None:
    s = settings_of(wenv)
    for kind, fanned in (("uuid", False), ("text", False), ("uuid", True), ("text", True)):
        await fetch(s.database_url, "DROP TABLE IF EXISTS keyed")
        await fetch(s.database_url, "DELETE FROM managed_columns")
        expected = await _keyed_table(s.database_url, kind, legacy_rows()[:10])
        async with KeyManager(_quiet(s)) as km:
            await columns.register(km.sessions, "keyed.api_key", pk="id", scope_column="provider")
            if not fanned:
                report = await legacy_migration.migrate_legacy(km, workers=1, batch_rows=3)
                assert report.migrated == 10 and report.failed == 0, (kind, report.as_dict())
                assert report.columns["keyed.api_key"].changed == []
            else:
                run, _ = await legacy_migration.open_legacy_run(km, trigger="test")
                plan = await legacy_ranges.fan_out(km, run.id, range_rows=3)
                assert plan is not None and len(plan.ranges) >= 3
                for r in plan.ranges:
                    out = await legacy_ranges.migrate_range(
                        km, r.run_id, r.target, r.lo, r.hi, workers=1, batch_rows=2
                    )
                    assert out.failed == 0
                report = legacy_migration.report_of(await _run(km, run.id))
                assert report.state == "completed" and report.migrated == 10, (kind, report.as_dict())
                done = [json.loads(e["metadata"]) for e in await _legacy_events(s.database_url)]
                assert {"run_id": run.id, "rows": 10, "failed": 0} in [
                    {k: d[k] for k in ("run_id", "rows", "failed")} for d in done
                ]
            await _check_keyed(km, s.database_url, expected)


async def _run(km: KeyManager, run_id: int) -> runs.RunInfo:
    async with db.transaction(km.sessions) as session:
        return await runs.require_run(session, run_id)


async def _legacy_events(url: str) -> list[Any]:
    return await fetch(
        url,
        "SELECT event_type, scope, success, error_message, metadata::text AS metadata "
        "FROM encryption_audit_log WHERE metadata::jsonb ->> 'kind' = 'legacy' ORDER BY id",
    )


async def test_a_run_is_audited_with_counts_and_never_a_value(wenv: dict[str, str]) -> None:
    """A migration re-encrypts every legacy value: its completion (and its failure) is in the
    audit chain, as a rotation's is, with ids and counts only."""
    s = settings_of(wenv)
    rows = legacy_rows()[:4]
    await fetch(s.database_url, CREATE)
    await _insert(s.database_url, [(p, v) for p, _t, v in rows])
    async with KeyManager(_quiet(s)) as km:
        await columns.register(km.sessions, "settings.api_key", pk="id", scope_column="provider")
        report = await legacy_migration.migrate_legacy(km, workers=1)
    (event,) = await _legacy_events(s.database_url)
    meta = json.loads(event["metadata"])
    assert event["event_type"] == "rotate" and event["success"] and event["scope"] is None
    assert meta["run_id"] == report.run_id and meta["rows"] == 4 and meta["failed"] == 0
    for table in ("encryption_audit_log", "rotations"):  # neither plaintext, value nor key
        dump = json.dumps(
            [list(r) for r in await fetch(s.database_url, f"SELECT * FROM {table}")], default=str
        )
        assert all(plain not in dump and value not in dump for _p, plain, value in rows)
        assert MASTER_KEY not in dump

    wrong = settings_of(wenv, KEYROTOR_LEGACY_KEY="not-the-old-backends-master-key-at-all")
    await _insert(s.database_url, [(p, v) for p, _t, v in legacy_rows()[4:14]])
    async with KeyManager(_quiet(wrong)) as km:
        with pytest.raises(ConfigurationError):
            await legacy_migration.migrate_legacy(km, workers=1)
    failed = (await _legacy_events(s.database_url))[-1]
    assert failed["event_type"] == "rotate" and not failed["success"]
    assert "master key" in failed["error_message"] and "not-the-old" not in failed["error_message"]


async def test_two_drivers_of_one_run_write_each_value_once_and_audit_once(wenv: dict[str, str]) -> None:
    """arq may run a job twice at once (a lease lost, a re-enqueue): both drivers of the run
    work, the compare-and-swap lets one write each value, and the run ends once."""
    s = settings_of(wenv)
    rows = legacy_rows()[:12]
    await fetch(s.database_url, CREATE)
    ids = await _insert(s.database_url, [(p, v) for p, _t, v in rows])
    async with KeyManager(_quiet(s)) as km:
        await columns.register(km.sessions, "settings.api_key", pk="id", scope_column="provider")
        run, _ = await legacy_migration.open_legacy_run(km, trigger="test")
        both = await asyncio.wait_for(
            asyncio.gather(
                *(legacy_migration.migrate_legacy(km, run_id=run.id, workers=1, batch_rows=4) for _ in "ab")
            ),
            120,
        )
        assert sum(r.migrated for r in both) == 12 and all(r.failed == 0 for r in both)
        for i, (provider, plain, _v) in zip(ids, rows, strict=True):
            (row,) = await fetch(s.database_url, "SELECT api_key FROM settings WHERE id = $1", i)
            assert await km.decrypt(provider, row["api_key"], context=f"settings.api_key:{i}") == plain
    (got,) = await fetch(s.database_url, "SELECT state, rows_done FROM rotations WHERE id = $1", run.id)
    assert got["state"] == "completed" and got["rows_done"] == 12
    assert [json.loads(e["metadata"])["run_id"] for e in await _legacy_events(s.database_url)] == [run.id]


async def test_values_that_failed_before_do_not_pass_for_a_wrong_master_key(wenv: dict[str, str]) -> None:
    """Almost-legacy values (canonical base64 of the right length, not sealed by the old backend)
    fail authentication in every run. Once a run has migrated values with the key, the next run,
    which finds only those left, reports them failed again; it does not stop saying the master key
    is wrong (it is not), and a wrong key is still caught on values that never failed."""
    s = settings_of(wenv)
    good = legacy_rows()[:4]
    almost = [base64.b64encode(os.urandom(100 + i)).decode() for i in range(9)]
    await fetch(s.database_url, CREATE)
    await _insert(s.database_url, [*((p, v) for p, _t, v in good), *(("openai", a) for a in almost)])
    async with KeyManager(_quiet(s)) as km:
        await columns.register(km.sessions, "settings.api_key", pk="id", scope_column="provider")
        first = await legacy_migration.migrate_legacy(km, workers=1)
        assert first.migrated == 4 and first.failed == 9
        second = await legacy_migration.migrate_legacy(km, workers=1)
        assert second.state == "completed" and second.migrated == 0 and second.failed == 9
        reasons = {f["reason"] for f in second.columns["settings.api_key"].failed}
        assert all("failed authentication" in r for r in reasons)
    left = [
        r[0]
        for r in await fetch(s.database_url, "SELECT api_key FROM settings WHERE api_key NOT LIKE 'kr1:%'")
    ]
    assert sorted(left) == sorted(almost)  # left as they were

    await _insert(s.database_url, [(p, v) for p, _t, v in legacy_rows()[4:14]])
    wrong = settings_of(wenv, KEYROTOR_LEGACY_KEY="not-the-old-backends-master-key-at-all")
    async with KeyManager(_quiet(wrong)) as km:
        with pytest.raises(ConfigurationError, match="not the old backend's master key"):
            await legacy_migration.migrate_legacy(km, workers=1)


async def test_cli_dry_run_json_and_its_errors(wenv: dict[str, str]) -> None:
    """--json prints one JSON document on stdout, with no value in it; a bad master key or a
    bad row is one line on stderr and a non-zero exit, never a traceback."""
    s = settings_of(wenv)
    rows = legacy_rows()[:3]
    await fetch(s.database_url, CREATE)
    await _insert(s.database_url, [*((p, v) for p, _t, v in rows), ("openai", "")])
    # The code under test, not whatever the keyrotor script would import by default.
    here = {"PYTHONPATH": os.environ["PYTHONPATH"]} if "PYTHONPATH" in os.environ else {}
    env = {**wenv, **here, "ENCRYPTION_KEY": MASTER_KEY, "KEYROTOR_LEGACY_WORKERS": "1"}
    out = keyrotor(
        "columns", "register", "settings.api_key", "--pk", "id", "--scope-column", "provider", env=env
    )
    assert out.returncode == 0, out.stderr
    dry = keyrotor("legacy", "migrate", "--dry-run", "--json", env=env)
    assert dry.returncode == 0, dry.stderr
    doc = json.loads(dry.stdout)
    assert doc["migrated"] == 3 and doc["failed"] == 0 and doc["dry_run"] is True
    assert doc["legacy_remaining"] == 3 and doc["safe_to_disable_legacy_decrypt"] is False
    for text in (dry.stdout, dry.stderr):
        assert all(plain not in text and value not in text for _p, plain, value in rows)
        assert MASTER_KEY not in text
    out = keyrotor("legacy", "migrate", "--dry-run", env={**env, "KEYROTOR_LEGACY_KEY": "  "})
    assert out.returncode != 0 and "Traceback" not in out.stderr, out.stderr
    assert out.stderr.strip().count("\n") == 0, out.stderr


async def test_migrated_values_are_in_the_census_so_retirement_keeps_their_dek(wenv: dict[str, str]) -> None:
    """A worker that has not yet seen a rotation seals under the version it still holds as active
    (as the hot path does within its TTL). Those values are recorded in key_locations and counted
    by the retirement's proof, which moves them on before the version is retired."""
    s = settings_of(wenv, KEYROTOR_ACTIVE_VERSION_TTL_SECONDS="3600")
    rows = [r for r in legacy_rows()[:8] if r[0] == "openai"]
    await fetch(s.database_url, CREATE)
    ids = await _insert(s.database_url, [(p, v) for p, _t, v in rows])
    async with KeyManager(_quiet(s)) as stale, KeyManager(_quiet(s)) as other:
        await columns.register(stale.sessions, "settings.api_key", pk="id", scope_column="provider")
        await stale.encrypt("openai", "warm-up", context="settings.api_key:0")  # v1 cached as active
        rc = RotationContext(other.sessions, other.kek, s)
        await rotation.rotate_dek(rc, "openai")  # v2 active, v1 grace; nothing to re-encrypt yet
        report = await legacy_migration.migrate_legacy(stale, workers=1)
        assert report.migrated == len(rows)
        versions = {r[0].split(":")[1] for r in await fetch(s.database_url, "SELECT api_key FROM settings")}
        located = await fetch(
            s.database_url,
            "SELECT l.dek_version, l.location FROM key_locations l JOIN key_scopes k ON k.id = l.scope_id "
            "WHERE k.name = 'openai'",
        )
        assert versions == {"1"}  # the version this worker still held as active
        assert (1, "settings.api_key") in [tuple(r) for r in located]
        done = await retire.retire_dek(rc, "openai", 1, force_now=True)
        assert done.stragglers == len(rows)
        for i, (provider, plain, _v) in zip(ids, rows, strict=True):
            (row,) = await fetch(s.database_url, "SELECT api_key FROM settings WHERE id = $1", i)
            assert row["api_key"].startswith("kr1:2:")
            assert await other.decrypt(provider, row["api_key"], context=f"settings.api_key:{i}") == plain


async def test_scrypt_never_blocks_the_event_loop(wenv: dict[str, str]) -> None:
    """16 values in one batch are 0.5-1.3 s of scrypt: run on the loop, a ticker would stall that
    long. Offloaded to the pool (in chunks, one a process), the loop keeps ticking."""
    s = settings_of(wenv)
    rows = legacy_rows()[:16]
    await fetch(s.database_url, CREATE)
    await _insert(s.database_url, [(p, v) for p, _t, v in rows])
    async with KeyManager(_quiet(s)) as km:
        await columns.register(km.sessions, "settings.api_key", pk="id", scope_column="provider")
        with legacy_migration.make_executor(2) as pool:
            await legacy_migration.decrypt_batch([rows[0][2]], MASTER_KEY, pool, 1)  # processes started
            gaps: list[float] = []
            done = asyncio.Event()

            async def tick() -> None:
                loop = asyncio.get_running_loop()
                last = loop.time()
                while not done.is_set():
                    await asyncio.sleep(0.01)
                    now = loop.time()
                    gaps.append(now - last)
                    last = now

            ticker = asyncio.create_task(tick())
            try:
                report = await asyncio.wait_for(
                    legacy_migration.migrate_legacy(km, executor=pool, workers=2, batch_rows=16), 60
                )
            finally:
                done.set()
                await ticker
        assert report.migrated == 16
        assert max(gaps) < 0.3, max(gaps)
