"""A legacy range job run twice at once (arq may: a lease lost by a worker that is still running)."""

from __future__ import annotations

import asyncio
import json

import pytest

from keyrotor import KeyManager
from keyrotor.census import columns
from keyrotor.legacy import migration as legacy_migration
from keyrotor.legacy import ranges as legacy_ranges
from tests.jobs.conftest import settings_of
from tests.legacy_helpers import legacy_rows
from tests.rotation_helpers import fetch


@pytest.mark.parametrize("pk_type", ["bigint", "text"])
async def test_two_runs_of_one_range_report_each_value_once(wenv: dict[str, str], pk_type: str) -> None:
    s = settings_of(wenv).model_copy(update={"listen_key_changes": False})
    rows = legacy_rows()[:16]
    plain = {}
    await fetch(s.database_url, f"CREATE TABLE t (id {pk_type} PRIMARY KEY, provider text, api_key text)")
    for i, (provider, text, value) in enumerate(rows, start=1):
        pk = i if pk_type == "bigint" else f"k:{i:02d}"
        plain[pk] = text
        await fetch(s.database_url, "INSERT INTO t VALUES ($1, $2, $3)", pk, provider, value)
    async with KeyManager(s) as km:
        await columns.register(km.sessions, "t.api_key", pk="id", scope_column="provider")
        run, _ = await legacy_migration.open_legacy_run(km, trigger="test")
        plan = await legacy_ranges.fan_out(km, run.id, range_rows=8)
        assert plan is not None and len(plan.ranges) == 2
        first, second = plan.ranges
        twins = await asyncio.gather(
            *(
                legacy_ranges.migrate_range(
                    km, first.run_id, first.target, first.lo, first.hi, workers=1, batch_rows=2
                )
                for _ in range(2)
            )
        )
        assert {o.state for o in twins} == {"done"}
        last = await legacy_ranges.migrate_range(
            km, second.run_id, second.target, second.lo, second.hi, workers=1, batch_rows=2
        )
        assert last.completed_run
        got = (
            await fetch(
                s.database_url, "SELECT state, rows_done, detail FROM rotations WHERE id = $1", run.id
            )
        )[0]
        assert got["state"] == "completed" and got["rows_done"] == 16
        (report,) = [c for c in json.loads(got["detail"])["columns"] if c["column"] == "t.api_key"]
        # Nothing changed the rows meanwhile, and each was migrated once.
        assert (report["migrated"], report["changed"], report["failed_count"]) == (16, [], 0), report
        for r in await fetch(s.database_url, "SELECT id, provider, api_key FROM t ORDER BY id"):
            opened = await km.decrypt(r["provider"], r["api_key"], context=f"t.api_key:{r['id']}")
            assert opened == plain[r["id"]]
