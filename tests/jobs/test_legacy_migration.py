"""Legacy ciphertexts in application-owned columns: registration, migration, rotation, retirement.

Real Postgres (and Redis and `keyrotor worker` processes for the crash test). Legacy values are
made with keyrotor.crypto.legacy_format.encrypt in a process pool once per session; the Node vectors prove the
format itself.
"""

from __future__ import annotations

import asyncio
import base64
import itertools
import json
import os
import random
from pathlib import Path

import pytest

from keyrotor import KeyManager, Settings, runs
from keyrotor.census import columns
from keyrotor.crypto import legacy_format as legacy
from keyrotor.errors import ConfigurationError, Conflict, InvalidInput
from keyrotor.legacy import migration as legacy_migration
from keyrotor.legacy import ranges as legacy_ranges
from keyrotor.rotation import dek as rotation
from keyrotor.rotation import retire
from keyrotor.rotation.context import RotationContext
from keyrotor.rotation.retire import KeyStillInUse
from keyrotor.store import db
from tests.conftest import MASTER_KEY
from tests.jobs.conftest import settings_of
from tests.legacy_helpers import VECTOR_KEY, VECTORS, legacy_rows, vectors
from tests.rotation_helpers import WorkerProcess, fetch, keyrotor

CREATE = "CREATE TABLE settings (id bigserial PRIMARY KEY, provider text NOT NULL, api_key text)"


def _quiet(s: Settings) -> Settings:
    return s.model_copy(update={"listen_key_changes": False})


async def _app(s: Settings, rows: list[tuple[str, str, str]]) -> dict[int, tuple[str, str]]:
    """The application's table, filled with legacy values. Returns id -> (provider, plaintext)."""
    await fetch(s.database_url, CREATE)
    ids = await fetch(
        s.database_url,
        "INSERT INTO settings (provider, api_key) SELECT * FROM unnest($1::text[], $2::text[]) RETURNING id",
        [r[0] for r in rows],
        [r[2] for r in rows],
    )
    return {rec["id"]: (r[0], r[1]) for rec, r in zip(ids, rows, strict=True)}


async def _check_all(km: KeyManager, url: str, expected: dict[int, tuple[str, str]]) -> dict[str, int]:
    """Every row opens to what is expected. Returns counts by format ("legacy", "kr1:<v>")."""
    kinds: dict[str, int] = {}
    for row in await fetch(url, "SELECT id, provider, api_key FROM settings ORDER BY id"):
        provider, plain = expected[row["id"]]
        assert row["provider"] == provider
        value = row["api_key"]
        kind = "kr1:" + value.split(":")[1] if value.startswith("kr1:") else "legacy"
        kinds[kind] = kinds.get(kind, 0) + 1
        if kind != "legacy":  # legacy ones cost a scrypt each: checked by the migration itself
            assert await km.decrypt(provider, value, context=f"settings.api_key:{row['id']}") == plain
    return kinds


async def test_online_migration_keeps_app_reads_and_writes_intact(wenv: dict[str, str]) -> None:
    s = settings_of(wenv, KEYROTOR_LEGACY_BATCH_ROWS="16")
    rows = legacy_rows()
    expected = await _app(s, rows)
    async with KeyManager(_quiet(s)) as km:
        col = await columns.register(km.sessions, "settings.api_key", pk="id", scope_column="provider")
        assert col.context(42) == "settings.api_key:42"
        stop = asyncio.Event()
        stats = {"reads": 0, "writes": 0}
        ids = sorted(expected)

        async def app() -> None:
            rnd = random.Random(7)
            while not stop.is_set():
                i = rnd.choice(ids)
                provider, plain = expected[i]
                value = (await fetch(s.database_url, "SELECT api_key FROM settings WHERE id = $1", i))[0][0]
                # Legacy reads cost a scrypt each: a few are enough.
                if value.startswith("kr1:") or stats["reads"] < 5:
                    assert await km.decrypt(provider, value, context=f"settings.api_key:{i}") == plain
                stats["reads"] += 1
                if rnd.random() < 0.3:  # the application rotates its API key meanwhile
                    new = f"sk-{provider}-updated-{i}-{stats['writes']:04d}-abcdefghijklmnop"
                    token = await km.encrypt(provider, new, context=f"settings.api_key:{i}")
                    await fetch(s.database_url, "UPDATE settings SET api_key = $2 WHERE id = $1", i, token)
                    expected[i] = (provider, new)
                    stats["writes"] += 1
                await asyncio.sleep(0.01)

        task = asyncio.create_task(app())
        try:
            report = await legacy_migration.migrate_legacy(km, workers=2, batch_rows=16)
        finally:
            stop.set()
            await task
        assert report.failed == 0 and stats["writes"] > 5 and stats["reads"] > 20
        rep = report.columns["settings.api_key"]
        assert rep.legacy_found == len(rows)
        # What the app rewrote before the migration reached it was no longer legacy; what it
        # rewrote in between was left to the app (compare-and-swap), never overwritten.
        assert rep.migrated + len(rep.changed) <= len(rows)
        assert await _check_all(km, s.database_url, expected) == {"kr1:1": len(rows)}
        run = (await fetch(s.database_url, "SELECT * FROM rotations WHERE kind = 'legacy'"))[0]
        assert run["state"] == "completed" and run["rows_done"] == rep.migrated
        again = await legacy_migration.migrate_legacy(km, workers=2)  # idempotent
        assert again.migrated == 0 and again.columns["settings.api_key"].already_migrated == len(rows)


async def test_bad_input_is_named_and_left_alone(wenv: dict[str, str]) -> None:
    s = settings_of(wenv)
    rows = legacy_rows()[:12]
    expected = await _app(s, rows)
    ids = sorted(expected)
    tampered = rows[0][2][:-4] + ("AAAA" if not rows[0][2].endswith("AAAA") else "BBBB")
    await fetch(s.database_url, "UPDATE settings SET api_key = $2 WHERE id = $1", ids[0], tampered)
    not_utf8 = legacy._seal(
        b"\xff\xfe not text",
        legacy_key := "test-master-key-9f8e7d6c5b4a39281706f5e4d3c2b1a0",
        os.urandom(32),
        os.urandom(16),
    )
    await fetch(s.database_url, "UPDATE settings SET api_key = $2 WHERE id = $1", ids[1], not_utf8)
    await fetch(s.database_url, "UPDATE settings SET api_key = 'garbage!' WHERE id = $1", ids[2])
    before = await fetch(s.database_url, "SELECT id, api_key FROM settings ORDER BY id")
    async with KeyManager(_quiet(s)) as km:
        await columns.register(km.sessions, "settings.api_key", pk="id", scope_column="provider")
        dry = await legacy_migration.migrate_legacy(km, dry_run=True, workers=2)
        assert dry.migrated == len(rows) - 3 and dry.failed == 3
        assert await fetch(s.database_url, "SELECT id, api_key FROM settings ORDER BY id") == before
        assert await fetch(s.database_url, "SELECT * FROM rotations") == []  # dry run: no run

        report = await legacy_migration.migrate_legacy(km, workers=2)
    failed = {f["id"]: f["reason"] for f in report.columns["settings.api_key"].failed}
    assert "failed authentication" in failed[ids[0]]
    assert "not valid UTF-8" in failed[ids[1]]
    assert "malformed" in failed[ids[2]]
    doc = json.dumps(report.as_dict())
    assert legacy_key not in doc and all(r[1] not in doc for r in rows)  # never values
    after = {r["id"]: r["api_key"] for r in await fetch(s.database_url, "SELECT id, api_key FROM settings")}
    assert after[ids[0]] == tampered and after[ids[1]] == not_utf8 and after[ids[2]] == "garbage!"
    assert sum(v.startswith("kr1:") for v in after.values()) == len(rows) - 3


async def test_wrong_master_key_writes_nothing(wenv: dict[str, str]) -> None:
    s = settings_of(wenv, KEYROTOR_LEGACY_KEY="not-the-old-backends-master-key-at-all")
    await _app(s, legacy_rows()[:10])
    before = await fetch(s.database_url, "SELECT id, api_key FROM settings ORDER BY id")
    async with KeyManager(_quiet(s)) as km:
        await columns.register(km.sessions, "settings.api_key", pk="id", scope_column="provider")
        with pytest.raises(ConfigurationError, match="not the old backend's master key"):
            await legacy_migration.migrate_legacy(km, workers=2)
    assert await fetch(s.database_url, "SELECT id, api_key FROM settings ORDER BY id") == before
    run = (await fetch(s.database_url, "SELECT state, error FROM rotations"))[0]
    assert run["state"] == "failed" and "master key" in run["error"]


async def test_wrong_master_key_fails_a_fanned_out_range_and_writes_nothing(wenv: dict[str, str]) -> None:
    s = settings_of(wenv, KEYROTOR_LEGACY_KEY="not-the-old-backends-master-key-at-all")
    await _app(s, legacy_rows()[:24])
    before = await fetch(s.database_url, "SELECT id, api_key FROM settings ORDER BY id")
    async with KeyManager(_quiet(s)) as km:
        await columns.register(km.sessions, "settings.api_key", pk="id", scope_column="provider")
        run, _ = await legacy_migration.open_legacy_run(km, trigger="test")
        plan = await legacy_ranges.fan_out(km, run.id, range_rows=12)
        assert plan is not None and len(plan.ranges) == 2
        first = plan.ranges[0]
        with pytest.raises(ConfigurationError, match="not the old backend's master key; nothing was written"):
            await legacy_ranges.migrate_range(km, first.run_id, first.target, first.lo, first.hi, workers=1)
        # The other range, run after (as arq would), finds the run failed and stops at once.
        second = plan.ranges[1]
        stopped = await legacy_ranges.migrate_range(
            km, second.run_id, second.target, second.lo, second.hi, workers=1
        )
        assert stopped.state == "stopped" and not stopped.completed_run
    assert await fetch(s.database_url, "SELECT id, api_key FROM settings ORDER BY id") == before
    got = (
        await fetch(s.database_url, "SELECT state, error, rows_done FROM rotations WHERE id = $1", run.id)
    )[0]
    assert got["state"] == "failed" and "master key" in got["error"] and got["rows_done"] == 0
    assert "not-the-old-backends" not in got["error"]


async def test_register_validates_and_refuses_clearly(wenv: dict[str, str]) -> None:
    s = settings_of(wenv)
    await fetch(s.database_url, CREATE)
    await fetch(s.database_url, "CREATE TABLE nokey (id bigint, provider text, api_key text)")
    await fetch(s.database_url, "CREATE SCHEMA app")
    await fetch(s.database_url, "CREATE TABLE app.tokens (id int PRIMARY KEY, token text)")
    async with KeyManager(_quiet(s)) as km:
        reg = km.sessions
        with pytest.raises(columns.ColumnNotFound, match="table 'missing'"):
            await columns.register(reg, "missing.api_key", pk="id", scope="openai")
        with pytest.raises(columns.ColumnNotFound, match=r"settings\.nope"):
            await columns.register(reg, "settings.nope", pk="id", scope="openai")
        with pytest.raises(InvalidInput, match="not unique"):
            await columns.register(reg, "nokey.api_key", pk="id", scope_column="provider")
        with pytest.raises(InvalidInput, match="identifier"):
            await columns.register(reg, 'settings.api_key"; DROP TABLE x; --', pk="id", scope="openai")
        with pytest.raises(InvalidInput, match="exactly one"):
            await columns.register(reg, "settings.api_key", pk="id")
        with pytest.raises(InvalidInput, match="not unique"):  # a text key is fine, a repeated one not
            await columns.register(reg, "settings.api_key", pk="provider", scope="openai")
        await fetch(s.database_url, "CREATE TABLE stamped (at timestamptz PRIMARY KEY, api_key text)")
        with pytest.raises(InvalidInput, match="smallint, integer, bigint, uuid, text or varchar"):
            await columns.register(reg, "stamped.api_key", pk="at", scope="openai")
        col = await columns.register(reg, "app.tokens.token", pk="id", scope="openai", create_index=True)
        assert col.name == "app.tokens.token" and col.context(7) == "app.tokens.token:7"
        with pytest.raises(Conflict, match="registered already"):
            await columns.register(reg, "app.tokens.token", pk="id", scope="openai")
    index = await fetch(s.database_url, "SELECT indexdef FROM pg_indexes WHERE schemaname = 'app'")
    assert any("split_part" in r[0] for r in index)
    # The CLI: one-line errors, list, unregister.
    out = keyrotor("columns", "register", "nokey.api_key", "--pk", "id", "--scope", "openai", env=s_env(s))
    assert out.returncode == 2 and out.stderr.count("\n") == 1 and "not unique" in out.stderr
    out = keyrotor(
        "columns", "register", "settings.api_key", "--pk", "id", "--scope-column", "provider", env=s_env(s)
    )
    assert out.returncode == 0, out.stderr
    assert "CREATE INDEX" in out.stderr and "split_part" in out.stderr
    listed = json.loads(keyrotor("columns", "list", "--json", env=s_env(s)).stdout)
    assert [c["column"] for c in listed["columns"]] == ["app.tokens.token", "settings.api_key"]
    assert keyrotor("columns", "unregister", "app.tokens.token", env=s_env(s)).returncode == 0
    gone = keyrotor("columns", "unregister", "app.tokens.token", env=s_env(s))
    assert gone.returncode == 2 and "not registered" in gone.stderr


def s_env(s: Settings) -> dict[str, str]:
    return {
        "DATABASE_URL": s.database_url,
        "REDIS_URL": s.redis_url,
        "ENCRYPTION_KEY": MASTER_KEY,
        "KEYROTOR_QUEUE_NAME": s.queue_name,
        "KEYROTOR_LOG_FORMAT": "json",
    }


@pytest.mark.parametrize("small", ["1000", "10"])  # one transaction, and fanned out in ranges
async def test_rotation_and_retirement_cover_the_app_column(wenv: dict[str, str], small: str) -> None:
    s = settings_of(wenv, KEYROTOR_SMALL_SCOPE_ROWS=small, KEYROTOR_REENCRYPT_RANGE_ROWS="15")
    await fetch(s.database_url, CREATE)
    expected: dict[int, tuple[str, str]] = {}
    async with KeyManager(_quiet(s)) as km:
        await columns.register(km.sessions, "settings.api_key", pk="id", scope_column="provider")
        for i in range(1, 41):
            provider = ("openai", "anthropic")[i % 2]
            plain = f"sk-{provider}-{i:04d}-abcdefghijklmnopqrstuvwxyz"
            await fetch(s.database_url, "INSERT INTO settings (id, provider) VALUES ($1, $2)", i, provider)
            token = await km.encrypt(provider, plain, context=f"settings.api_key:{i}")
            await fetch(s.database_url, "UPDATE settings SET api_key = $2 WHERE id = $1", i, token)
            expected[i] = (provider, plain)
        old_v1 = {
            i: (await fetch(s.database_url, "SELECT api_key FROM settings WHERE id = $1", i))[0][0]
            for i in (2, 4)
        }
        rc = RotationContext(km.sessions, km.kek, s)  # default targets: secrets + registered columns
        progress = await rotation.rotate_dek(rc, "openai")
        for r in progress.ranges:
            await rotation.reencrypt_range(rc, r.run_id, r.lo, r.hi, target=r.target)
        kinds = await _check_all(km, s.database_url, expected)
        assert kinds == {"kr1:2": 20, "kr1:1": 20}  # openai rotated; anthropic untouched
        status = json.loads(keyrotor("status", "--json", env=s_env(s)).stdout)
        assert status["columns"] == [
            {
                "column": "settings.api_key",
                "scope": None,
                "scope_column": "provider",
                "legacy": 0,
                "rows_by_version": {"1": 20, "2": 20},
            }
        ]
        # A stale writer puts a v1 value back; another v1 value is tampered with: retirement refuses.
        await fetch(s.database_url, "UPDATE settings SET api_key = $2 WHERE id = $1", 2, old_v1[2])
        await fetch(
            s.database_url, "UPDATE settings SET api_key = $2 WHERE id = $1", 4, old_v1[4][:-2] + "AA"
        )
        with pytest.raises(KeyStillInUse, match=r"settings\.api_key row id=4"):
            await retire.retire_dek(rc, "openai", 1, force_now=True)
        key = (
            await fetch(
                s.database_url,
                "SELECT d.state FROM data_keys d JOIN key_scopes k "
                "ON k.id = d.scope_id WHERE k.name = 'openai' AND d.version = 1",
            )
        )[0]
        assert key["state"] == "grace"
        await fetch(s.database_url, "UPDATE settings SET api_key = $2 WHERE id = $1", 4, old_v1[4])
        done = await retire.retire_dek(rc, "openai", 1, force_now=True)
        assert done.stragglers == 2
        assert await _check_all(km, s.database_url, expected) == {"kr1:2": 20, "kr1:1": 20}
    verified = keyrotor("verify", "--json", env=s_env(s))  # verify covers the app column too
    assert verified.returncode == 0, verified.stderr
    assert json.loads(verified.stdout)["checked"] == 40
    await fetch(
        s.database_url,
        "UPDATE settings SET api_key = $2 WHERE id = $1",
        3,
        "kr1:2:AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA",
    )
    broken = keyrotor("verify", "--json", env=s_env(s))
    assert broken.returncode == 1
    assert [(f["table"], f["row_id"]) for f in json.loads(broken.stdout)["failures"]] == [
        ("settings.api_key", 3)
    ]


@pytest.mark.skipif(not VECTORS.exists(), reason="shared vectors not present")
async def test_node_vectors_and_an_imported_second_phase_dek(wenv: dict[str, str], tmp_path: Path) -> None:
    s = settings_of(wenv, KEYROTOR_LEGACY_KEY=VECTOR_KEY)
    vs = vectors()
    values = [v for v in vs if v.get("kind") != "encrypted_dek"]
    dek_line = next(v for v in vs if v.get("kind") == "encrypted_dek")
    # A second-phase value under the vector's DEK (layout assumed: iv(16) || tag(16) || data).
    second = legacy_migration.encrypt_second_phase(
        "sk-ant-api03-second-phase-value-0123456789abcdefgh", base64.b64decode(dek_line["dek_base64"])
    )
    rows = [(v["provider"], v["plaintext"], v["ciphertext"]) for v in values]
    rows.append(("anthropic", "sk-ant-api03-second-phase-value-0123456789abcdefgh", second))
    expected = await _app(s, rows)
    env = {**s_env(s), "KEYROTOR_LEGACY_KEY": VECTOR_KEY}
    (tmp_path / "dek.txt").write_text(dek_line["ciphertext"] + "\n")
    out = keyrotor(
        "legacy", "import-dek", "anthropic", "--file", str(tmp_path / "dek.txt"), "--json", env=env
    )
    assert out.returncode == 0, out.stderr
    imported = json.loads(out.stdout)
    assert imported["version"] == 2 and imported["state"] == "grace"
    again = keyrotor("legacy", "import-dek", "anthropic", env=env, stdin=dek_line["ciphertext"])
    assert again.returncode == 1 and "already v2" in again.stderr
    out = keyrotor(
        "columns", "register", "settings.api_key", "--pk", "id", "--scope-column", "provider", env=env
    )
    assert out.returncode == 0, out.stderr
    dry = keyrotor("legacy", "migrate", "--dry-run", "--json", env=env)
    assert dry.returncode == 0, dry.stderr
    assert json.loads(dry.stdout)["migrated"] == len(rows)
    async with KeyManager(_quiet(s)) as km:
        report = await legacy_migration.migrate_legacy(km, workers=2)
        assert report.migrated == len(rows) and report.failed == 0
        kinds = await _check_all(km, s.database_url, expected)
    assert kinds == {"kr1:1": len(rows)}
    status = json.loads(keyrotor("status", "--json", env=env).stdout)
    assert status["columns"][0]["legacy"] == 0


async def test_killed_worker_resumes_the_migration(wenv: dict[str, str], tmp_path: Path) -> None:
    env = {**wenv, "KEYROTOR_LEGACY_BATCH_ROWS": "6", "KEYROTOR_LEGACY_WORKERS": "2"}
    s = settings_of(env)
    rows = legacy_rows()[:72]
    expected = await _app(s, rows)
    async with KeyManager(_quiet(s)) as km:
        await columns.register(km.sessions, "settings.api_key", pk="id", scope_column="provider")
    first = WorkerProcess(env, tmp_path / "w1.log")
    try:
        await first.wait_started()
        out = keyrotor("legacy", "migrate", "--json", env=env)
        assert out.returncode == 0, out.stderr
        run_id = json.loads(out.stdout)["run_id"]
        for _ in range(600):
            done = (await fetch(s.database_url, "SELECT rows_done FROM rotations WHERE id = $1", run_id))[0][
                0
            ]
            if done >= 12:
                break
            await asyncio.sleep(0.05)
        first.kill()
    finally:
        first.close()
    async with KeyManager(_quiet(s)) as km:
        kinds = await _check_all(km, s.database_url, expected)
        assert kinds.get("kr1:1", 0) >= 12 and kinds.get("legacy", 0) > 0  # killed mid-way
        # A legacy value left behind still opens until it is migrated.
        row = (
            await fetch(
                s.database_url,
                "SELECT id, provider, api_key FROM settings WHERE api_key NOT LIKE 'kr1:%' LIMIT 1",
            )
        )[0]
        assert await km.decrypt(row[1], row[2], context=f"settings.api_key:{row[0]}") == expected[row[0]][1]
    second = WorkerProcess(env, tmp_path / "w2.log")
    try:
        await second.wait_started()
        waited = keyrotor("legacy", "migrate", "--wait", "--json", "--timeout", "90", env=env)
        assert waited.returncode == 0, waited.stderr + second.output()[-2000:]
        doc = json.loads(waited.stdout)
        assert doc["run_id"] == run_id and doc["state"] == "completed" and doc["failed"] == 0
    finally:
        second.close()
    run = (await fetch(s.database_url, "SELECT * FROM rotations WHERE id = $1", run_id))[0]
    assert run["attempts"] >= 2 and run["rows_done"] == len(rows)
    async with KeyManager(_quiet(s)) as km:
        assert await _check_all(km, s.database_url, expected) == {"kr1:1": len(rows)}
    status = json.loads(keyrotor("status", "--json", env=env).stdout)
    assert status["columns"][0]["legacy"] == 0


# --- fan-out across workers by id range ------------------------------------------------------


async def test_ranges_migrate_concurrently_and_merge_one_report(wenv: dict[str, str]) -> None:
    """Ranges run at once (as on several workers) while the application rewrites rows."""
    s = settings_of(wenv)
    rows = legacy_rows()[:48]
    expected = await _app(s, rows)
    ids = sorted(expected)
    tampered = rows[5][2][:-4] + ("AAAA" if not rows[5][2].endswith("AAAA") else "BBBB")
    await fetch(s.database_url, "UPDATE settings SET api_key = $2 WHERE id = $1", ids[5], tampered)
    async with KeyManager(_quiet(s)) as km:
        await columns.register(km.sessions, "settings.api_key", pk="id", scope_column="provider")
        run, _ = await legacy_migration.open_legacy_run(km, trigger="test")
        small = await legacy_ranges.fan_out(km, run.id, range_rows=100)
        assert small is None  # under two ranges' worth: one worker does it
        plan = await legacy_ranges.fan_out(km, run.id, range_rows=10)
        assert plan is not None and len(plan.ranges) == 5  # 48 legacy values, about 10 a range
        assert {r.target for r in plan.ranges} == {"settings.api_key"}
        assert plan.ranges[0].lo <= ids[0] and plan.ranges[-1].hi == 2**63 - 1
        assert all(a.hi + 1 == b.lo for a, b in itertools.pairwise(plan.ranges))  # no gap, no overlap
        again = await legacy_ranges.fan_out(km, run.id, range_rows=0)  # a re-driven job: same ranges
        assert again is not None and again.ranges == plan.ranges

        # The application replaces one row's value meanwhile: compare-and-swap leaves it alone.
        new_plain = "sk-proj-written-by-the-application-while-migrating"
        await fetch(s.database_url, "UPDATE settings SET api_key = $2 WHERE id = $1", ids[20], new_plain)
        expected[ids[20]] = (expected[ids[20]][0], new_plain)

        with legacy_migration.make_executor(2) as pool:
            outcomes = await asyncio.gather(
                *(
                    legacy_ranges.migrate_range(km, r.run_id, r.target, r.lo, r.hi, executor=pool, workers=2)
                    for r in plan.ranges
                )
            )
        assert sum(o.completed_run for o in outcomes) == 1  # exactly one range completes the run
        assert {o.state for o in outcomes} == {"done"}
        # Running a range again (arq may) is harmless.
        repeat = await legacy_ranges.migrate_range(
            km, plan.ranges[0].run_id, plan.ranges[0].target, plan.ranges[0].lo, plan.ranges[0].hi, workers=1
        )
        assert repeat.state == "stopped" and not repeat.completed_run

    got = (
        await fetch(s.database_url, "SELECT state, rows_done, detail FROM rotations WHERE id = $1", run.id)
    )[0]
    assert got["state"] == "completed"
    report = legacy_migration.report_of(await _run_info(s, run.id)).columns["settings.api_key"]
    assert report.legacy_found == 48 and report.failed_count == 2  # the tampered row, the app's plaintext
    assert {f["id"] for f in report.failed} == {ids[5], ids[20]}
    assert report.migrated == 46 == got["rows_done"]
    assert await fetch(s.database_url, "SELECT count(*) FROM rotation_ranges WHERE state <> 'done'") == [(0,)]
    values = {r["id"]: r["api_key"] for r in await fetch(s.database_url, "SELECT id, api_key FROM settings")}
    assert values[ids[5]] == tampered and values[ids[20]] == new_plain
    async with KeyManager(_quiet(s)) as km:
        for i in ids:
            if i not in (ids[5], ids[20]):
                provider, plain = expected[i]
                assert await km.decrypt(provider, values[i], context=f"settings.api_key:{i}") == plain


async def _run_info(s: Settings, run_id: int) -> runs.RunInfo:
    async with KeyManager(_quiet(s)) as km, db.transaction(km.sessions) as session:
        return await runs.require_run(session, run_id)


async def test_workers_share_a_fanned_out_migration(wenv: dict[str, str], tmp_path: Path) -> None:
    env = {
        **wenv,
        "KEYROTOR_LEGACY_BATCH_ROWS": "4",
        "KEYROTOR_LEGACY_WORKERS": "1",
        "KEYROTOR_LEGACY_RANGE_ROWS": "8",
    }
    s = settings_of(env)
    rows = legacy_rows()[:40]
    expected = await _app(s, rows)
    async with KeyManager(_quiet(s)) as km:
        await columns.register(km.sessions, "settings.api_key", pk="id", scope_column="provider")
    workers = [WorkerProcess(env, tmp_path / f"w{i}.log") for i in range(2)]
    try:
        for w in workers:
            await w.wait_started()
        out = keyrotor("legacy", "migrate", "--wait", "--json", "--timeout", "120", env=env)
        assert out.returncode == 0, out.stderr + "".join(w.output()[-1500:] for w in workers)
        doc = json.loads(out.stdout)
        assert doc["state"] == "completed" and doc["migrated"] == 40 and doc["failed"] == 0
        logs = [w.output() for w in workers]
    finally:
        for w in workers:
            w.close()
    run = (
        await fetch(s.database_url, "SELECT rows_done, detail FROM rotations WHERE id = $1", doc["run_id"])
    )[0]
    assert run["rows_done"] == 40 and json.loads(run["detail"])["mode"] == "ranges"
    assert sum(log.count("legacy_range_done") for log in logs) == json.loads(run["detail"])["ranges"] == 5
    async with KeyManager(_quiet(s)) as km:
        assert await _check_all(km, s.database_url, expected) == {"kr1:1": 40}


class _Interrupted(Exception):
    """Stands for a worker killed after a batch committed."""


async def test_a_resumed_run_with_the_wrong_master_key_stops_and_writes_nothing(wenv: dict[str, str]) -> None:
    """A run resumed by a worker configured with another master key: the values the first attempt
    migrated say nothing about this attempt's key, so the wrong key still stops the run instead
    of recording every remaining value as failed (and the run as completed)."""
    s = settings_of(wenv)
    await _app(s, legacy_rows()[:24])

    def stop_after_first_batch(done: int, total: int) -> None:
        raise _Interrupted

    async with KeyManager(_quiet(s)) as km:
        await columns.register(km.sessions, "settings.api_key", pk="id", scope_column="provider")
        run, _ = await legacy_migration.open_legacy_run(km, trigger="test")
        with pytest.raises(_Interrupted):
            await legacy_migration.migrate_legacy(
                km, workers=1, run_id=run.id, batch_rows=8, on_progress=stop_after_first_batch
            )
    before = await fetch(s.database_url, "SELECT id, api_key FROM settings ORDER BY id")
    assert sum(v["api_key"].startswith("kr1:") for v in before) == 8
    wrong = settings_of(wenv, KEYROTOR_LEGACY_KEY="not-the-old-backends-master-key-at-all")
    async with KeyManager(_quiet(wrong)) as km:
        with pytest.raises(ConfigurationError, match="not the old backend's master key"):
            await legacy_migration.migrate_legacy(km, workers=1, run_id=run.id, batch_rows=8)
    assert await fetch(s.database_url, "SELECT id, api_key FROM settings ORDER BY id") == before
    got = (await fetch(s.database_url, "SELECT state, detail FROM rotations WHERE id = $1", run.id))[0]
    assert got["state"] == "failed"
    assert all(c["failed_count"] == 0 for c in json.loads(got["detail"])["columns"])


async def test_a_range_on_a_worker_with_the_wrong_master_key_stops_though_another_range_migrated(
    wenv: dict[str, str],
) -> None:
    """Workers set up with different master keys: the range on the wrong one stops the run (its
    values untouched, none reported failed) whatever the other ranges migrated."""
    s = settings_of(wenv)
    await _app(s, legacy_rows()[:24])
    async with KeyManager(_quiet(s)) as km:
        await columns.register(km.sessions, "settings.api_key", pk="id", scope_column="provider")
        run, _ = await legacy_migration.open_legacy_run(km, trigger="test")
        plan = await legacy_ranges.fan_out(km, run.id, range_rows=12)
        assert plan is not None and len(plan.ranges) == 2
        first, second = plan.ranges
        done = await legacy_ranges.migrate_range(
            km, first.run_id, first.target, first.lo, first.hi, workers=1
        )
        assert done.state == "done"
    before = await fetch(s.database_url, "SELECT id, api_key FROM settings ORDER BY id")
    wrong = settings_of(wenv, KEYROTOR_LEGACY_KEY="not-the-old-backends-master-key-at-all")
    async with KeyManager(_quiet(wrong)) as km:
        with pytest.raises(ConfigurationError, match="not the old backend's master key"):
            await legacy_ranges.migrate_range(
                km, second.run_id, second.target, second.lo, second.hi, workers=1
            )
    assert await fetch(s.database_url, "SELECT id, api_key FROM settings ORDER BY id") == before
    got = (await fetch(s.database_url, "SELECT state FROM rotations WHERE id = $1", run.id))[0]
    assert got["state"] == "failed"
