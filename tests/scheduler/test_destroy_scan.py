"""The scheduler's side of retirement: a refusal backs off and shows in ``status``; a retired
version is destroyed only after its window, by a real ``keyrotor worker`` process."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from structlog.testing import capture_logs

from keyrotor import KeyManager, Settings
from keyrotor.queue.client import KeyrotorClient
from keyrotor.worker.scheduler import Scheduler
from tests.destruction_helpers import acknowledge, expire_window, key_row, wait_run
from tests.rotation_helpers import WorkerProcess, keyrotor, seed
from tests.scheduler.conftest import sql

SCOPE = "anthropic"


@pytest.fixture
async def worker(senv: dict[str, str], tmp_path: Path) -> AsyncIterator[WorkerProcess]:
    proc = WorkerProcess(senv, tmp_path / "worker.log")
    try:
        await proc.wait_started()
        yield proc
    finally:
        proc.close()


async def _grace_over(s: Settings) -> str:
    """Secrets and one value in the application's ``users.api_key`` on v1, rotated to v2, and
    v1's grace period over. Returns the application's ciphertext."""
    await seed(s, SCOPE, 5)
    async with KeyManager(s) as km:
        kept = await km.encrypt(SCOPE, "sk-ant-app-value-0123456789", context="users.api_key:7")
    async with KeyrotorClient(s) as client:
        await (await client.rotate(SCOPE)).result(timeout_s=60)
    await sql(
        s.database_url, "UPDATE data_keys SET grace_until = now() - interval '1 minute' WHERE version = 1"
    )
    return kept


async def test_refused_retirement_backs_off_and_shows_in_status(
    sched: Scheduler, senv: dict[str, str], worker: WorkerProcess
) -> None:
    s = Settings.from_env(senv)
    kept = await _grace_over(s)
    report = await sched.scan()
    (run,) = report.retirements
    failed = await wait_run(s, run.id)
    assert failed.state == "failed" and failed.error is not None
    assert (
        failed.error.startswith("LocationNotCovered: anthropic: DEK v1 is kept")
        and "users.api_key" in failed.error
    )
    assert (await key_row(s.database_url, SCOPE, 1))["state"] == "grace"
    async with KeyManager(s) as km:  # the value in the unregistered table survives the scan
        assert await km.decrypt(SCOPE, kept, context="users.api_key:7") == "sk-ant-app-value-0123456789"

    with capture_logs() as logs:
        again = await sched.scan()
    assert again.retirements == [] and again.skipped == {"retire:backoff": 1}
    (waiting,) = [e for e in logs if e["event"] == "retirement_backing_off"]
    assert waiting["scope"] == SCOPE and waiting["version"] == 1 and waiting["failures"] == 1
    assert waiting["error"] == failed.error

    doc = json.loads(keyrotor("status", "--json", env=senv).stdout)
    (scope,) = doc["scopes"]
    assert scope["retirement_refused"]["run_id"] == run.id
    assert scope["retirement_refused"]["error"] == failed.error
    text = keyrotor("status", env={**senv, "COLUMNS": "400"}).stdout
    assert "retirement of v1 refused" in text and "users.api_key" in text


async def test_scheduler_destroys_a_retired_version_only_after_its_window(
    sched: Scheduler, senv: dict[str, str], worker: WorkerProcess
) -> None:
    s = Settings.from_env(senv)
    await _grace_over(s)
    await acknowledge(s.database_url, "users.api_key", "the table is migrated to secrets")
    (run,) = (await sched.scan()).retirements
    assert (await wait_run(s, run.id)).state == "completed"
    key = await key_row(s.database_url, SCOPE, 1)
    assert key["state"] == "retired" and key["encrypted_dek"] is not None
    assert key["destroy_after"] - key["retired_at"] == timedelta(days=s.destroy_after_days)
    assert (await sched.scan()).destructions == []

    # A scheduler whose clock runs ahead opens the run; the job checks the database's clock and
    # erases nothing before destroy_after.
    ahead = await sched.scan(datetime.now(UTC) + timedelta(days=s.destroy_after_days, hours=1))
    (early,) = ahead.destructions
    assert (await wait_run(s, early.id)).detail["outcome"] == "not_due"
    assert (await key_row(s.database_url, SCOPE, 1))["state"] == "retired"

    await expire_window(s.database_url, SCOPE, 1)
    plan = await sched.plan()  # the dry run shows it, and writes nothing
    assert [(r.scope, r.version, r.destroy) for r in plan.retirements] == [(SCOPE, 1, True)]
    dry = keyrotor("scheduler", "--dry-run", env={**senv, "COLUMNS": "200"})
    assert dry.returncode == 0 and "destroy_dek" in dry.stdout and "window ended" in dry.stdout, dry.stderr
    report = await sched.scan()
    (run,) = report.destructions
    assert any(":destroy_dek:" in j for j in report.enqueued)
    done = await wait_run(s, run.id)
    assert done.state == "completed" and done.detail["outcome"] == "destroyed"
    key = await key_row(s.database_url, SCOPE, 1)
    assert key["state"] == "destroyed" and key["encrypted_dek"] is None
    assert (await sched.scan()).destructions == []
    doc = json.loads(keyrotor("status", "--json", env=senv).stdout)
    assert [(k["version"], k["state"]) for k in doc["scopes"][0]["keys"]] == [(1, "destroyed"), (2, "active")]
    assert doc["scopes"][0]["retirement_refused"] is None
