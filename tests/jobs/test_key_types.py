"""Registered columns keyed by any supported type: rotated, retired, verified and legacy-migrated.

Tables shaped like the old Node backend's and its ORMs': a ``settings`` table with a ``serial``
(int4) id and a text ``provider`` scope column (TypeORM's default), smallint ids, uuid ids, text
ids (Prisma cuids and slugs, some with ``:`` and non-ASCII) and varchar ids. Everything runs
through the CLI against a real ``keyrotor worker`` process, with range sizes set low so that a
rotation and a legacy migration fan out into several range jobs while a smaller scope rotates in
one transaction. The five shapes are registered side by side in one database and go through the
operations together (one worker, one run of each), each table checked as if it were alone: one
process start per operation instead of one per operation and shape.
"""

from __future__ import annotations

import json
import secrets
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pytest

from keyrotor import KeyManager, Settings
from keyrotor.census import columns
from keyrotor.legacy import migration as legacy_migration
from keyrotor.legacy.migration import column_source
from keyrotor.rotation import dek as rotation
from keyrotor.rotation.context import RotationContext
from keyrotor.store import db
from keyrotor.store.key_ranges import INTEGER_KEY, TEXT_KEY, UUID_KEY, ranges_from_buckets
from keyrotor.store.targets import raw_connection
from tests.jobs.conftest import settings_of
from tests.legacy_helpers import legacy_rows
from tests.rotation_helpers import WorkerProcess, check_values, fetch, keyrotor, seed

OPENAI_ROWS = 40  # fans out: more than KEYROTOR_SMALL_SCOPE_ROWS
ANTHROPIC_ROWS = 6  # one transaction
LEGACY_ROWS = 16


@dataclass(frozen=True)
class Shape:
    """One table shape: its name, DDL and how its keys are made (None: the table makes them)."""

    table: str
    ddl: str
    keys: Callable[[int], list[Any]] | None


def _cuids(n: int) -> list[str]:
    # cuid-like, slug-like, with ':' and non-ASCII: every one must order, bind and bound as text.
    kinds = [
        lambda i: f"c{i:04d}{secrets.token_hex(6)}",
        lambda i: f"team:{i}:ünïcødé",
        lambda i: f"東京/slug-{i}",
        lambda i: f"Z-{i}",
    ]
    return [kinds[i % len(kinds)](i) for i in range(n)]


SHAPES = {
    "serial": Shape(
        "settings",
        "CREATE TABLE settings (id serial PRIMARY KEY, provider text NOT NULL, api_key text)",
        None,
    ),
    "smallint": Shape(
        "small_keys",
        "CREATE TABLE small_keys (id smallint PRIMARY KEY, provider text NOT NULL, api_key text)",
        lambda n: [-3 + 7 * i for i in range(n)],  # negative keys too
    ),
    "uuid": Shape(
        "uuid_keys",
        "CREATE TABLE uuid_keys (id uuid PRIMARY KEY DEFAULT gen_random_uuid(), provider text NOT NULL, "
        "api_key text)",
        None,
    ),
    "text": Shape(
        "cuid_keys",
        "CREATE TABLE cuid_keys (id text PRIMARY KEY, provider text NOT NULL, api_key text)",
        _cuids,
    ),
    "varchar": Shape(
        "slug_keys",
        "CREATE TABLE slug_keys (id varchar(64) PRIMARY KEY, provider text NOT NULL, api_key text)",
        _cuids,
    ),
}


def _quiet(s: Settings) -> Settings:
    return s.model_copy(update={"listen_key_changes": False})


def _plain(provider: str, i: int) -> str:
    return f"sk-{'ant-api03' if provider == 'anthropic' else 'proj'}-{i:04d}-{secrets.token_urlsafe(24)}"


async def _insert(s: Settings, shape: Shape, providers: list[str], values: list[str]) -> list[str]:
    """Insert rows (their api_key set later); returns their keys as text."""
    if shape.keys is None:
        rows = await fetch(
            s.database_url,
            f"INSERT INTO {shape.table} (provider, api_key) SELECT * FROM unnest($1::text[], $2::text[]) "
            "RETURNING id::text",
            providers,
            values,
        )
        return [r[0] for r in rows]
    keys = shape.keys(len(providers))
    rows = await fetch(
        s.database_url,
        f"INSERT INTO {shape.table} (id, provider, api_key) SELECT * FROM "
        f"unnest($1::{'smallint' if isinstance(keys[0], int) else 'text'}[], $2::text[], $3::text[]) "
        "RETURNING id::text",
        keys,
        providers,
        values,
    )
    return [r[0] for r in rows]


async def _set_values(s: Settings, shape: Shape, values: dict[str, str]) -> None:
    await fetch(
        s.database_url,
        f"UPDATE {shape.table} t SET api_key = u.v FROM unnest($1::text[], $2::text[]) AS u(k, v) "
        "WHERE t.id::text = u.k",
        list(values),
        list(values.values()),
    )


async def _check_table(s: Settings, shape: Shape, expected: dict[str, tuple[str, str]]) -> dict[str, int]:
    """Every kr1 value decrypts to what was stored. Returns rows by format (``kr1:<v>``, ``legacy``)."""
    kinds: dict[str, int] = {}
    rows = await fetch(s.database_url, f"SELECT id::text, provider, api_key FROM {shape.table}")
    assert len(rows) == len(expected)
    async with KeyManager(_quiet(s)) as km:
        for key, provider, value in rows:
            want_provider, plain = expected[key]
            assert provider == want_provider
            if value is None:  # a row whose value is not written yet
                kinds["none"] = kinds.get("none", 0) + 1
                continue
            kind = "kr1:" + value.split(":")[1] if value.startswith("kr1:") else "legacy"
            kinds[kind] = kinds.get(kind, 0) + 1
            if kind != "legacy":  # a scrypt each: the migration checks those itself
                got = await km.decrypt(provider, value, context=f"{shape.table}.api_key:{key}")
                assert got == plain, key
    return kinds


async def _fill(
    s: Settings, shape: Shape, legacy: list[tuple[str, str, str]]
) -> tuple[dict[str, tuple[str, str]], tuple[str, str, str]]:
    """kr1 rows of two scopes and the ``legacy`` rows. Returns key -> (provider, plaintext) and a
    straggler (key, plaintext, v1 value) kept back to be written after the rotation."""
    providers = (
        ["openai"] * OPENAI_ROWS + ["anthropic"] * ANTHROPIC_ROWS + [r[0] for r in legacy] + ["openai"]
    )
    placeholder = [""] * (OPENAI_ROWS + ANTHROPIC_ROWS) + [r[2] for r in legacy] + [""]
    keys = await _insert(s, shape, providers, placeholder)
    expected: dict[str, tuple[str, str]] = {}
    new_values: dict[str, str] = {}
    async with KeyManager(_quiet(s)) as km:
        for i, (key, provider) in enumerate(zip(keys, providers, strict=True)):
            if OPENAI_ROWS + ANTHROPIC_ROWS <= i < len(keys) - 1:
                expected[key] = (provider, legacy[i - OPENAI_ROWS - ANTHROPIC_ROWS][1])
                continue
            plain = _plain(provider, i)
            expected[key] = (provider, plain)
            new_values[key] = await km.encrypt(provider, plain, context=f"{shape.table}.api_key:{key}")
    straggler_key = keys[-1]
    straggler = (straggler_key, expected[straggler_key][1], new_values.pop(straggler_key))
    await _set_values(s, shape, new_values)
    await fetch(s.database_url, f"UPDATE {shape.table} SET api_key = NULL WHERE id::text = $1", straggler_key)
    return expected, straggler


async def _ranges_of(s: Settings, run_id: int, column: str) -> list[Any]:
    return await fetch(
        s.database_url,
        "SELECT lo, hi, after_key, hi_key, state, rows_done FROM rotation_ranges "
        "WHERE run_id = $1 AND target = $2 ORDER BY lo",
        run_id,
        column,
    )


async def test_a_registered_column_of_each_key_type_goes_through_every_operation(
    wenv: dict[str, str], tmp_path: Path
) -> None:
    """One table of each key type, all five registered in the same two scopes beside keyrotor's
    own rows, so that one worker and one run of each operation take every type at once; the
    checks are made table by table, as if each were alone."""
    env = {
        **wenv,
        # anthropic (6 rows a table, 30 in all) rotates in one transaction, openai (205) in ranges.
        "KEYROTOR_SMALL_SCOPE_ROWS": str(len(SHAPES) * ANTHROPIC_ROWS + 10),
        "KEYROTOR_REENCRYPT_RANGE_ROWS": "12",
        "KEYROTOR_REENCRYPT_BATCH_ROWS": "5",
        "KEYROTOR_LEGACY_RANGE_ROWS": "5",
        "KEYROTOR_LEGACY_BATCH_ROWS": "3",
        "KEYROTOR_LEGACY_WORKERS": "1",
    }
    s = settings_of(env)
    own = await seed(s, "openai", 5)  # keyrotor's own rows share the scope (and its rotation)
    tables = len(SHAPES)
    legacy = legacy_rows()
    expected: dict[str, dict[str, tuple[str, str]]] = {}
    stragglers: dict[str, tuple[str, str, str]] = {}
    for n, (kind, shape) in enumerate(SHAPES.items()):
        await fetch(s.database_url, shape.ddl)
        # Legacy values of each table's own: no two rows anywhere hold the same one.
        mine = legacy[n * LEGACY_ROWS : (n + 1) * LEGACY_ROWS]
        expected[kind], stragglers[kind] = await _fill(s, shape, mine)
        column = f"{shape.table}.api_key"
        reg = keyrotor("columns", "register", column, "--pk", "id", "--scope-column", "provider", env=env)
        assert reg.returncode == 0, reg.stderr

    worker = WorkerProcess(env, tmp_path / "worker.log")
    try:
        await worker.wait_started()
        # anthropic: one transaction; openai: fanned out into range jobs.
        run_ids: dict[str, int] = {}
        for scope, mode in (("anthropic", "single_transaction"), ("openai", "ranges")):
            out = keyrotor("rotate", scope, "--wait", "--json", "--timeout", "90", env=env)
            assert out.returncode == 0, out.stderr + worker.output()[-3000:]
            doc = json.loads(out.stdout)
            assert doc["state"] == "completed" and doc["to_version"] == 2
            detail = (await fetch(s.database_url, "SELECT detail FROM rotations WHERE id = $1", doc["id"]))[0]
            assert json.loads(detail[0])["mode"] == mode
            run_ids[scope] = doc["id"]
        for kind, shape in SHAPES.items():
            ranges = await _ranges_of(s, run_ids["openai"], f"{shape.table}.api_key")
            assert len(ranges) >= 3 and {r["state"] for r in ranges} == {"done"}, kind
            assert sum(r["rows_done"] for r in ranges) == OPENAI_ROWS, kind
            if kind in ("uuid", "text", "varchar"):  # bounds from the data, open at both ends
                assert ranges[0]["after_key"] is None and ranges[-1]["hi_key"] is None, kind
                assert all(r["after_key"] is not None for r in ranges[1:]), kind
            else:
                smallest = (await fetch(s.database_url, f"SELECT min(id) FROM {shape.table}"))[0][0]
                assert ranges[0]["lo"] == min(0, smallest) and ranges[-1]["hi"] == 2**63 - 1, kind
            assert await _check_table(s, shape, expected[kind]) == {
                "kr1:2": OPENAI_ROWS + ANTHROPIC_ROWS,
                "legacy": LEGACY_ROWS,
                "none": 1,
            }, kind
        assert await check_values(s, "openai", own) == {2: 5}

        # A process with a stale cache wrote a v1 value in each table: retirement re-encrypts
        # them, then proves (counts) that no row of any column still needs v1.
        for kind, shape in SHAPES.items():
            straggler_key, _plain_text, straggler_v1 = stragglers[kind]
            await fetch(
                s.database_url,
                f"UPDATE {shape.table} SET api_key = $2 WHERE id::text = $1",
                straggler_key,
                straggler_v1,
            )
        out = keyrotor("retire", "openai", "1", "--force-now", "--json", env=env, timeout=90)
        assert out.returncode == 0, out.stderr + worker.output()[-3000:]
        retired = json.loads(out.stdout)
        assert retired["state"] == "completed" and retired["rows_done"] == tables  # the stragglers
        for kind, shape in SHAPES.items():
            kinds = await _check_table(s, shape, expected[kind])
            assert kinds == {"kr1:2": OPENAI_ROWS + ANTHROPIC_ROWS + 1, "legacy": LEGACY_ROWS}, kind
            straggler_key, straggler_plain, _v1 = stragglers[kind]
            assert expected[kind][straggler_key][1] == straggler_plain

        out = keyrotor("verify", "--json", env=env, timeout=120)
        assert out.returncode == 0, out.stdout + out.stderr
        per_table = OPENAI_ROWS + ANTHROPIC_ROWS + 1 + LEGACY_ROWS
        assert json.loads(out.stdout)["checked"] == 5 + tables * per_table

        out = keyrotor("legacy", "migrate", "--wait", "--json", "--timeout", "120", env=env, timeout=150)
        assert out.returncode == 0, out.stderr + worker.output()[-3000:]
        migrated = json.loads(out.stdout)
        assert migrated["state"] == "completed" and migrated["migrated"] == tables * LEGACY_ROWS
        assert migrated["failed"] == 0
        detail = (
            await fetch(s.database_url, "SELECT detail FROM rotations WHERE id = $1", migrated["run_id"])
        )[0]
        assert json.loads(detail[0])["mode"] == "ranges" and json.loads(detail[0])["ranges"] >= 3 * tables
        for kind, shape in SHAPES.items():  # each table's 16 legacy values fanned out on their own
            assert len(await _ranges_of(s, migrated["run_id"], f"{shape.table}.api_key")) >= 3, kind
    finally:
        worker.close()
    for kind, shape in SHAPES.items():
        assert await _check_table(s, shape, expected[kind]) == {"kr1:2": len(expected[kind])}, kind


@pytest.mark.parametrize("kind", ["uuid", "text"])
async def test_rows_written_outside_the_planned_bounds_are_covered(wenv: dict[str, str], kind: str) -> None:
    """Rows inserted after the ranges were planned, below, between and above the planned keys,
    are re-encrypted by the open-ended first and last ranges and the ranges between."""
    shape = SHAPES[kind]
    s = settings_of(wenv, KEYROTOR_SMALL_SCOPE_ROWS="5", KEYROTOR_REENCRYPT_RANGE_ROWS="8")
    await fetch(s.database_url, shape.ddl)
    expected: dict[str, tuple[str, str]] = {}
    async with KeyManager(_quiet(s)) as km:
        keys = await _insert(s, shape, ["openai"] * 30, [""] * 30)
        ordered = [
            r[0] for r in await fetch(s.database_url, f"SELECT id::text FROM {shape.table} ORDER BY id")
        ]
        if kind == "uuid":
            late_keys = [
                "00000000-0000-4000-8000-000000000000",
                "7fffffff-ffff-4fff-bfff-ffffffffffff",
                "ffffffff-ffff-4fff-bfff-ffffffffffff",
            ]
        else:  # '' sorts first in every collation; a string sorts after its own prefix
            late_keys = ["", ordered[14] + ":between", ordered[-1] + "zz"]
        values = {}
        for i, key in enumerate(keys + late_keys):
            expected[key] = ("openai", _plain("openai", i))
            values[key] = await km.encrypt("openai", expected[key][1], context=f"{shape.table}.api_key:{key}")
        await _set_values(s, shape, {k: values[k] for k in keys})
    reg = keyrotor(
        "columns", "register", f"{shape.table}.api_key", "--pk", "id", "--scope", "openai", env=wenv
    )
    assert reg.returncode == 0, reg.stderr
    async with KeyManager(_quiet(s)) as km:
        rc = RotationContext(km.sessions, km.kek, s)
        progress = await rotation.rotate_dek(rc, "openai")
        assert len(progress.ranges) >= 3
        await fetch(
            s.database_url,
            f"INSERT INTO {shape.table} (id, provider, api_key) SELECT * FROM "
            f"unnest($1::{'uuid' if kind == 'uuid' else 'text'}[], $2::text[], $3::text[])",
            late_keys,
            ["openai"] * 3,
            [values[k] for k in late_keys],
        )
        for r in progress.ranges:
            done = await rotation.reencrypt_range(rc, r.run_id, r.lo, r.hi, target=r.target)
            assert done.state == "done"
        run = (await fetch(s.database_url, "SELECT state, rows_done FROM rotations"))[0]
        assert run["state"] == "completed"
        # Every row, the late ones included, was re-encrypted by a range (none left for the sweep).
        ranged = await fetch(s.database_url, "SELECT sum(rows_done) FROM rotation_ranges")
        assert ranged[0][0] == 33 == run["rows_done"]
    assert await _check_table(s, shape, expected) == {"kr1:2": 33}


async def test_a_composite_primary_key_is_refused_in_one_line(wenv: dict[str, str]) -> None:
    s = settings_of(wenv)
    await fetch(
        s.database_url,
        "CREATE TABLE tenant_keys (tenant text, id int, api_key text, PRIMARY KEY (tenant, id))",
    )
    out = keyrotor("columns", "register", "tenant_keys.api_key", "--pk", "id", "--scope", "openai", env=wenv)
    assert out.returncode == 2 and out.stderr.count("\n") == 1 and "Traceback" not in out.stderr
    assert "composite primary key (tenant, id); composite keys are not supported" in out.stderr
    assert "--pk" in out.stderr
    # With a unique key of its own, the same table registers.
    await fetch(
        s.database_url,
        "ALTER TABLE tenant_keys ADD COLUMN uid uuid NOT NULL UNIQUE DEFAULT gen_random_uuid()",
    )
    out = keyrotor("columns", "register", "tenant_keys.api_key", "--pk", "uid", "--scope", "openai", env=wenv)
    assert out.returncode == 0, out.stderr


def test_ranges_cover_every_key_whatever_its_type() -> None:
    buckets = [("a", "f", 4), ("g", "m", 4), ("n", "z", 3)]
    text_ranges = ranges_from_buckets(TEXT_KEY, buckets)
    assert [(r.after_key, r.hi_key, r.rows) for r in text_ranges] == [
        (None, "f", 4),
        ("f", "m", 4),
        ("m", None, 3),
    ]
    assert [(r.lo, r.hi) for r in text_ranges] == [(0, 0), (1, 1), (2, 2)]  # ordinals: job ids stay ints
    u = ranges_from_buckets(UUID_KEY, [("0000", "4444", 2), ("5555", "9999", 2)])
    assert [(r.after_key, r.hi_key) for r in u] == [(None, "4444"), ("4444", None)]
    ints = ranges_from_buckets(INTEGER_KEY, [(5, 9, 3), (10, 20, 3), (30, 31, 2)])
    assert [(r.lo, r.hi, r.rows) for r in ints] == [(0, 9, 3), (10, 29, 3), (30, 2**63 - 1, 2)]
    assert ranges_from_buckets(TEXT_KEY, []) == []


@pytest.mark.parametrize("kind", list(SHAPES))
async def test_batch_statements_walk_the_key_index(wenv: dict[str, str], kind: str) -> None:
    """Every keyset statement over a registered column can be an ordered scan of its key's index
    (no sort): the WHERE and the ORDER BY use the same expression, whatever the key's type."""
    shape = SHAPES[kind]
    s = settings_of(wenv)
    await fetch(s.database_url, shape.ddl)
    await _insert(s, shape, ["openai"] * 50, ["kr1:1:x"] * 50)
    reg = keyrotor(
        "columns", "register", f"{shape.table}.api_key", "--pk", "id", "--scope", "openai", env=wenv
    )
    assert reg.returncode == 0, reg.stderr
    async with KeyManager(_quiet(s)) as km, db.transaction(km.sessions) as session:
        (col,) = await columns.list_columns(session)
        apg = await raw_connection(session)
        # Only the plans possible with the key's index: a statement that cannot use it fails here.
        await apg.execute("SET LOCAL enable_seqscan = off")
        await apg.execute("SET LOCAL enable_sort = off")
        await apg.execute("SET LOCAL plan_cache_mode = force_generic_plan")
        key: Any = {"bigint": 0, "uuid": "80000000-0000-4000-8000-000000000000", "text": "m"}[
            col.key_type.sql
        ]
        sql = col.target().sql
        statements: list[tuple[str, tuple[Any, ...]]] = [
            (sql.select(after=True, upper=True, skip_locked=True), (1, 1, key, key, 10)),
            (col.page_sql(), (key, 10)),
            (column_source(col).select_sql(after=True, upper=True), (key, key, 10, "openai")),
        ]
        if not col.key_type.integer:
            statements += [
                (sql.select(after=False, upper=True, skip_locked=False), (1, 1, key, 10)),
                (sql.select(after=True, upper=False, skip_locked=True), (1, 1, key, 10)),
                (col.page_sql(first=True), (10,)),
            ]
        for statement, args in statements:
            plan = "\n".join(r[0] for r in await apg.fetch("EXPLAIN " + statement, *args))
            assert f"Index Scan using {shape.table}_pkey" in plan and "Sort" not in plan, (statement, plan)


@pytest.mark.parametrize("kind", ["uuid", "text"])
async def test_a_single_worker_legacy_migration_pages_any_key(wenv: dict[str, str], kind: str) -> None:
    """Without fan-out, the migration's cursor (kept in the run's detail) is the key itself."""
    shape = SHAPES[kind]
    s = settings_of(wenv)
    await fetch(s.database_url, shape.ddl)
    legacy = legacy_rows(LEGACY_ROWS)[:7]
    keys = await _insert(s, shape, [r[0] for r in legacy], [r[2] for r in legacy])
    expected = {k: (r[0], r[1]) for k, r in zip(keys, legacy, strict=True)}
    reg = keyrotor(
        "columns", "register", f"{shape.table}.api_key", "--pk", "id", "--scope-column", "provider", env=wenv
    )
    assert reg.returncode == 0, reg.stderr
    async with KeyManager(_quiet(s)) as km:
        report = await legacy_migration.migrate_legacy(km, workers=1, batch_rows=3)  # three batches
    assert report.migrated == 7 and report.failed == 0
    detail = json.loads((await fetch(s.database_url, "SELECT detail FROM rotations"))[0][0])
    ordered = [r[0] for r in await fetch(s.database_url, f"SELECT id::text FROM {shape.table} ORDER BY id")]
    assert detail["cursors"][f"{shape.table}.api_key"] == ordered[-1]
    assert await _check_table(s, shape, expected) == {"kr1:1": 7}
