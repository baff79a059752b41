"""Destruction only with proof, after a reversible window: retire, use, restore, destroy.

Every test drives a real ``keyrotor worker`` process (the jobs ``retire_dek`` and ``destroy_dek``)
against the real Postgres and Redis. A location the census cannot count refuses the retirement
(client, CLI and the worker's own proof); a retired version decrypts, and each use is audited,
logged, counted and cancels its erasure; the erasure happens only after the window, unused, and
after the proof holds once more; ``keyrotor keys restore`` brings a retired version back.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import time
from collections.abc import AsyncIterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
from prometheus_client import REGISTRY

from keyrotor import KeyManager, Settings, metrics
from keyrotor.errors import ConfigurationError, KeyVersionTooOld
from keyrotor.queue.client import KeyrotorClient
from keyrotor.rotation.retire import LocationNotCovered
from keyrotor.runs import RunFailed
from tests.destruction_helpers import (
    acknowledge,
    audit_events,
    expire_window,
    key_row,
    open_destructions,
    record_location,
    wait_run,
)
from tests.jobs.conftest import settings_of
from tests.rotation_helpers import WorkerProcess, check_values, fetch, keyrotor, seed

SCOPE = "openai"
APP_CONTEXT = "users.api_key:42"  # the README's example: a value in the application's own table
WINDOW_DAYS = 9


@pytest.fixture
async def worker(wenv: dict[str, str], tmp_path: Path) -> AsyncIterator[WorkerProcess]:
    proc = WorkerProcess({**wenv, "KEYROTOR_DESTROY_AFTER_DAYS": str(WINDOW_DAYS)}, tmp_path / "worker.log")
    try:
        await proc.wait_started()
        yield proc
    finally:
        proc.close()


def _settings(wenv: dict[str, str]) -> Settings:
    return settings_of(
        wenv, KEYROTOR_DESTROY_AFTER_DAYS=str(WINDOW_DAYS), KEYROTOR_LISTEN_KEY_CHANGES="false"
    )


async def _rotated_with_app_value(s: Settings) -> tuple[dict[str, str], str]:
    """Secrets on v1, one value in the application's table (location ``users.api_key``), then
    a rotation to v2. Returns (secrets, the application's v1 ciphertext)."""
    values = await seed(s, SCOPE, 10)
    async with KeyManager(s) as km:
        kept = await km.encrypt(SCOPE, "sk-app-value-0123456789", context=APP_CONTEXT)
    recorded = await fetch(s.database_url, "SELECT location FROM key_locations WHERE dek_version = 1")
    assert {r[0] for r in recorded} == {"secret", "users.api_key"}  # the encrypt recorded where it went
    async with KeyrotorClient(s) as client:
        await (await client.rotate(SCOPE)).result(timeout_s=60)
    return values, kept


async def _retired(s: Settings) -> datetime:
    """Retire v1 with --force-now; returns its destroy_after."""
    async with KeyrotorClient(s) as client:
        run = await (await client.retire(SCOPE, 1, force_now=True)).result(timeout_s=60)
    assert run.state == "completed"
    key = await key_row(s.database_url, SCOPE, 1)
    assert key["state"] == "retired" and key["encrypted_dek"] is not None
    return key["destroy_after"]


async def test_retirement_refuses_a_location_the_census_cannot_count(
    wenv: dict[str, str], worker: WorkerProcess
) -> None:
    s = _settings(wenv)
    values, kept = await _rotated_with_app_value(s)
    # The client: a typed refusal naming the location and what to run; the run is failed with it.
    async with KeyrotorClient(s) as client:
        with pytest.raises(LocationNotCovered) as refused:
            await client.retire(SCOPE, 1, force_now=True)
        message = str(refused.value)
        assert "users.api_key" in message and "\n" not in message
        assert "keyrotor columns register users.api_key --pk" in message
        assert "keyrotor columns ignore users.api_key --reason" in message
        (run,) = [r for r in await client.runs(scope=SCOPE) if r.kind == "retire"]
        assert run.state == "failed" and run.error == f"LocationNotCovered: {message}"
    # The CLI: exit 1 and that one line.
    cli = keyrotor("retire", SCOPE, "1", "--force-now", env={**wenv, "KEYROTOR_DESTROY_AFTER_DAYS": "9"})
    assert cli.returncode == 1, cli.stderr
    assert cli.stderr.strip().splitlines() == [f"keyrotor: error: {message}"]
    key = await key_row(s.database_url, SCOPE, 1)
    assert key["state"] == "grace" and key["encrypted_dek"] is not None
    async with KeyManager(s) as km:
        assert await km.decrypt(SCOPE, kept, context=APP_CONTEXT) == "sk-app-value-0123456789"

    # A location recorded after the request: the worker's proof refuses in its transaction.
    await acknowledge(s.database_url, "users.api_key", "its table is dropped next release")
    async with KeyrotorClient(s) as client:
        worker.proc.send_signal(19)  # SIGSTOP: the job waits while the location appears
        try:
            handle = await client.retire(SCOPE, 1, force_now=True)
            await record_location(s.database_url, SCOPE, 1, "billing.token")
        finally:
            worker.proc.send_signal(18)  # SIGCONT
        with pytest.raises(RunFailed, match=r"LocationNotCovered: openai: DEK v1 is kept: .*billing\.token"):
            await handle.result(timeout_s=60)
    assert (await key_row(s.database_url, SCOPE, 1))["state"] == "grace"
    # Acknowledged by name: the proof passes.
    await acknowledge(s.database_url, "billing.token", "test: nothing is stored there")
    await _retired(s)
    assert await check_values(s, SCOPE, values) == {2: 10}


@pytest.mark.parametrize(
    ("key_ddl", "template"),
    [
        ("id bigserial PRIMARY KEY", "{pk}@settings"),
        ("id uuid PRIMARY KEY", "u{pk}"),
        ("id int PRIMARY KEY", "{pk}"),
    ],
)
async def test_a_column_whose_keys_cannot_spell_a_location_does_not_cover_it(
    wenv: dict[str, str], worker: WorkerProcess, key_ddl: str, template: str
) -> None:
    """A registered column covers only the locations its own keys can produce: an integer or
    uuid key never spells ``users.api_key``, so a template that does not start with a fixed
    location (``{pk}@settings``) must not make another table's values look counted -- the
    retirement would pass, and after the window the values there would be lost."""
    s = _settings(wenv)
    await fetch(s.database_url, f"CREATE TABLE settings ({key_ddl}, api_key text)")
    env = {**wenv, "KEYROTOR_DESTROY_AFTER_DAYS": str(WINDOW_DAYS)}
    cli = keyrotor(
        "columns", "register", "settings.api_key", "--pk", "id", "--scope", SCOPE,
        "--context-template", template, env=env,
    )  # fmt: skip
    assert cli.returncode == 0, cli.stderr
    _, kept = await _rotated_with_app_value(s)
    async with KeyrotorClient(s) as client:
        with pytest.raises(LocationNotCovered, match=r"users\.api_key"):
            await client.retire(SCOPE, 1, force_now=True)
    assert (await key_row(s.database_url, SCOPE, 1))["state"] == "grace"
    listed = keyrotor("columns", "list", "--json", env=env)
    assert listed.returncode == 0, listed.stderr
    coverage = {v["location"]: v["coverage"] for v in json.loads(listed.stdout)["locations"]}
    assert coverage["users.api_key"] == "unregistered"
    async with KeyManager(s) as km:
        assert await km.decrypt(SCOPE, kept, context=APP_CONTEXT) == "sk-app-value-0123456789"


async def test_a_value_without_context_is_refused_with_the_command_that_acknowledges_it(
    wenv: dict[str, str], worker: WorkerProcess
) -> None:
    s = _settings(wenv)
    async with KeyManager(s) as km:
        await km.encrypt(SCOPE, "sk-no-context-0123456789")
    async with KeyrotorClient(s) as client:
        await (await client.rotate(SCOPE)).result(timeout_s=60)
        with pytest.raises(LocationNotCovered) as refused:
            await client.retire(SCOPE, 1, force_now=True)
    message = str(refused.value)
    assert "encrypted for (no context)" in message and "columns register" not in message
    assert "`keyrotor columns ignore '(no context)' --reason TEXT`" in message
    env = {**wenv, "KEYROTOR_DESTROY_AFTER_DAYS": str(WINDOW_DAYS)}
    ignored = keyrotor("columns", "ignore", "(no context)", "--reason", "a test value, never stored", env=env)
    assert ignored.returncode == 0, ignored.stderr
    await _retired(s)


async def test_a_retired_version_decrypts_and_each_use_is_audited_logged_counted_and_recorded(
    wenv: dict[str, str], worker: WorkerProcess, caplog: pytest.LogCaptureFixture
) -> None:
    s = _settings(wenv)
    _, kept = await _rotated_with_app_value(s)
    await acknowledge(s.database_url, "users.api_key", "test")
    before = datetime.now(UTC)
    destroy_after = await _retired(s)
    key = await key_row(s.database_url, SCOPE, 1)
    assert before - timedelta(seconds=5) < key["retired_at"] <= datetime.now(UTC)
    assert destroy_after - key["retired_at"] == timedelta(days=WINDOW_DAYS)
    (event,) = await audit_events(s.database_url, "retire")
    assert json.loads(event["metadata"])["state"] == "retired" and event["success"]

    def uses() -> float:
        return (
            REGISTRY.get_sample_value("keyrotor_retired_key_uses_total", {"scope": SCOPE, "version": "1"})
            or 0
        )

    counted = uses()
    caplog.set_level(logging.WARNING, logger="keyrotor.keys")
    async with KeyManager(s) as km:
        for _ in range(5):
            assert (
                await km.decrypt(SCOPE, kept, context=APP_CONTEXT, actor="svc-billing")
                == "sk-app-value-0123456789"
            )
        assert (await km.encrypt(SCOPE, "sk-new-value")).startswith("kr1:2:")  # never encrypts
        await km.flush_audit()
    assert uses() == counted + 5
    events = await audit_events(s.database_url, "retired_key_use")
    assert len(events) == 5  # every call
    assert all(e["scope"] == SCOPE and e["key_version"] == 1 and e["actor"] == "svc-billing" for e in events)
    assert json.loads(events[0]["metadata"]) == {"location": "users.api_key"}
    warnings = [r.getMessage() for r in caplog.records if "retired DEK used" in r.getMessage()]
    assert len(warnings) == 1  # once per location and interval, not per call
    assert "scope=openai version=1 location='users.api_key'" in warnings[0]
    assert "sk-app-value" not in caplog.text
    # Recorded once (per process, location and interval), before the value was returned.
    recorded = await fetch(s.database_url, "SELECT dek_version, location, actor FROM retired_key_uses")
    assert [tuple(r) for r in recorded] == [(1, "users.api_key", "svc-billing")]
    # With KEYROTOR_METRICS_SCOPE_LABELS=hashed the counter names the scope by its hash too.
    hashed = "h:" + hashlib.sha256(SCOPE.encode()).hexdigest()[:12]
    labels = {"scope": hashed, "version": "1"}
    metrics.configure_scope_labels("hashed")
    try:
        async with KeyManager(s) as km:
            await km.decrypt(SCOPE, kept, context=APP_CONTEXT, actor="svc-billing")
    finally:
        metrics.configure_scope_labels("plain")
    assert REGISTRY.get_sample_value("keyrotor_retired_key_uses_total", labels) == 1
    assert uses() == counted + 5


async def test_destruction_waits_for_the_window_then_proves_again_and_erases(
    wenv: dict[str, str], worker: WorkerProcess
) -> None:
    s = _settings(wenv)
    values, kept = await _rotated_with_app_value(s)
    await acknowledge(s.database_url, "users.api_key", "test")
    destroy_after = await _retired(s)  # with --force-now: the grace is skipped, not the window
    assert await open_destructions(s) == []
    assert await open_destructions(s, destroy_after - timedelta(minutes=1)) == []

    await expire_window(s.database_url, SCOPE, 1)
    (run,) = await open_destructions(s)
    assert run.kind == "retire" and run.detail["destroy"] is True and run.from_version == 1
    done = await wait_run(s, run.id)
    assert done.state == "completed" and done.detail["outcome"] == "destroyed"
    key = await key_row(s.database_url, SCOPE, 1)
    assert key["state"] == "destroyed" and key["encrypted_dek"] is None and key["destroyed_at"] is not None
    retire_events = [json.loads(e["metadata"])["state"] for e in await audit_events(s.database_url, "retire")]
    assert retire_events == ["retired", "destroyed"]
    async with KeyManager(s) as km:
        with pytest.raises(KeyVersionTooOld):  # acknowledged: the operator said it may be lost
            await km.decrypt(SCOPE, kept, context=APP_CONTEXT)
    assert await check_values(s, SCOPE, values) == {2: 10}
    assert await open_destructions(s) == []  # nothing left to do: idempotent


async def test_a_use_during_the_window_cancels_the_destruction(
    wenv: dict[str, str], worker: WorkerProcess
) -> None:
    s = _settings(wenv)
    _, kept = await _rotated_with_app_value(s)
    await acknowledge(s.database_url, "users.api_key", "test")
    await _retired(s)
    async with KeyManager(s) as km:
        assert await km.decrypt(SCOPE, kept, context=APP_CONTEXT) == "sk-app-value-0123456789"
    await expire_window(s.database_url, SCOPE, 1)
    (run,) = await open_destructions(s)
    done = await wait_run(s, run.id)
    assert done.state == "completed" and done.detail["outcome"] == "cancelled"
    assert done.detail["used_from"] == ["users.api_key"]
    key = await key_row(s.database_url, SCOPE, 1)
    assert key["state"] == "retired" and key["destroy_after"] is None and key["encrypted_dek"] is not None
    assert await open_destructions(s) == []  # cancelled: no scan finds it again
    async with KeyManager(s) as km:
        assert await km.decrypt(SCOPE, kept, context=APP_CONTEXT) == "sk-app-value-0123456789"

    # Retiring again proves again and starts a new window, from which old uses do not count.
    await _retired(s)
    await expire_window(s.database_url, SCOPE, 1)
    (run,) = await open_destructions(s)
    assert (await wait_run(s, run.id)).detail["outcome"] == "destroyed"


async def test_destruction_refused_when_the_proof_no_longer_holds(
    wenv: dict[str, str], worker: WorkerProcess
) -> None:
    s = _settings(wenv)
    await _rotated_with_app_value(s)
    await acknowledge(s.database_url, "users.api_key", "test")
    await _retired(s)
    # Values of v1 turn up in a place nobody registered (recorded late, by a lagging process).
    await record_location(s.database_url, SCOPE, 1, "legacy.settings")
    await expire_window(s.database_url, SCOPE, 1)
    (run,) = await open_destructions(s)
    done = await wait_run(s, run.id)
    assert done.state == "failed"
    assert done.error is not None and done.error.startswith("LocationNotCovered: openai: DEK v1 is kept")
    assert "legacy.settings" in done.error and "destruction is cancelled" in done.error
    key = await key_row(s.database_url, SCOPE, 1)
    assert key["state"] == "retired" and key["encrypted_dek"] is not None and key["destroy_after"] is None


async def test_restore_brings_a_retired_version_back_to_grace(
    wenv: dict[str, str], worker: WorkerProcess
) -> None:
    s = _settings(wenv)
    _, kept = await _rotated_with_app_value(s)
    await acknowledge(s.database_url, "users.api_key", "test")
    await _retired(s)
    env = {**wenv, "KEYROTOR_DESTROY_AFTER_DAYS": str(WINDOW_DAYS)}
    done = keyrotor("keys", "restore", SCOPE, "1", "--as", "ops-alice", "--json", env=env)
    assert done.returncode == 0, done.stderr
    doc = json.loads(done.stdout)
    assert doc["state"] == "grace" and doc["version"] == 1
    key = await key_row(s.database_url, SCOPE, 1)
    assert key["state"] == "grace" and key["destroy_after"] is None and key["encrypted_dek"] is not None
    grace_days = (await fetch(s.database_url, "SELECT grace_period_days FROM key_scopes"))[0][0]
    expected = datetime.now(UTC) + timedelta(days=grace_days)
    assert abs(key["grace_until"] - expected) < timedelta(minutes=1)
    (change,) = [e for e in await audit_events(s.database_url, "config_change") if e["actor"] == "ops-alice"]
    meta = json.loads(change["metadata"])
    assert meta["what"] == "restore_key" and meta["before"]["state"] == "retired"
    assert meta["after"] == {"version": 1, "state": "grace", "grace_until": key["grace_until"].isoformat()}
    async with KeyManager(s) as km:
        assert await km.decrypt(SCOPE, kept, context=APP_CONTEXT) == "sk-app-value-0123456789"
    assert await audit_events(s.database_url, "retired_key_use") == []  # in grace: a normal decrypt

    # Refused, one line and exit 1: not retired (grace now, active), or destroyed.
    for version, why in (("1", "is grace"), ("2", "is active")):
        refused = keyrotor("keys", "restore", SCOPE, version, env=env)
        assert refused.returncode == 1 and why in refused.stderr, refused.stderr
        assert len(refused.stderr.strip().splitlines()) == 1
    await _retired(s)
    await expire_window(s.database_url, SCOPE, 1)
    (run,) = await open_destructions(s)
    await wait_run(s, run.id)
    refused = keyrotor("keys", "restore", SCOPE, "1", env=env)
    assert refused.returncode == 1 and "is destroyed: its key is erased" in refused.stderr, refused.stderr


@pytest.mark.parametrize("days", ["6", "0", "-1", "3651", "thirty"])
def test_a_window_shorter_than_a_week_is_a_configuration_error(days: str) -> None:
    with pytest.raises(ConfigurationError) as refused:
        Settings.from_env({"KEYROTOR_DESTROY_AFTER_DAYS": days})
    assert str(refused.value).startswith("invalid configuration: KEYROTOR_DESTROY_AFTER_DAYS: ")
    assert "\n" not in str(refused.value)
    assert Settings.from_env({}).destroy_after_days == 30
    assert Settings.from_env({"KEYROTOR_DESTROY_AFTER_DAYS": "7"}).destroy_after_days == 7
    cli = keyrotor("status", env={"KEYROTOR_DESTROY_AFTER_DAYS": days})
    assert cli.returncode == 2 and cli.stderr.startswith(
        "keyrotor: error: invalid configuration: KEYROTOR_DESTROY"
    )


async def test_a_running_process_notices_the_retirement_through_the_announcement(
    wenv: dict[str, str], worker: WorkerProcess
) -> None:
    s = _settings(wenv)
    _, kept = await _rotated_with_app_value(s)
    await acknowledge(s.database_url, "users.api_key", "test")
    async with KeyManager(s.model_copy(update={"listen_key_changes": True})) as km:
        assert (
            await km.decrypt(SCOPE, kept, context=APP_CONTEXT) == "sk-app-value-0123456789"
        )  # grace: cached
        await _retired(s)  # announces `retired`: the listener drops the scope's cached DEKs
        deadline = time.monotonic() + 15
        while not await fetch(s.database_url, "SELECT 1 FROM retired_key_uses"):
            assert time.monotonic() < deadline, "the retirement was never noticed"
            assert await km.decrypt(SCOPE, kept, context=APP_CONTEXT) == "sk-app-value-0123456789"
            await asyncio.sleep(0.05)
        await km.flush_audit()
    assert len(await audit_events(s.database_url, "retired_key_use")) >= 1
