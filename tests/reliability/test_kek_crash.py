"""KEK crash suite: a ``keyrotor worker`` SIGKILLed at each step of a KEK run, while an
application process keeps decrypting and encrypting in every scope.

A random kill (``test_crash.py``) rarely lands in the milliseconds between a provider's answer
and the commit that records it. Here each worker is started with ``KEYROTOR_TEST_HANG_AT`` (see
``keyrotor/rotation/hang.py``): it waits at that step and is SIGKILLed there; the next worker
(arq re-runs the job once its 1 s lease runs out) hangs at the next step, and a last one without
a hang point finishes the run. The steps: before the provider's rotate request, after its
answer and before the target is committed, after a batch's rewrap and before its commit,
between two committed batches, before the cut-off of old KEK versions (Vault's
``min_decryption_version``), and after the cut-off, before its audit event commits.

Meanwhile ``kek_usage_child.py`` (its own process, its DEK cache 1 ms, so every read unwraps
through the KEK) opens a stored value of every scope, writes new ones, and makes new scopes
(new DEKs wrapped during the run). Checked: the child met no error; at every kill no DEK is
wrapped under a KEK version the provider no longer opens; the run completes; every DEK is on
the target; one ``rewrap`` event per DEK rewrapped (the run's count) and one ``config_change``
for the cut-off; every stored value opens in a fresh process.
"""

from __future__ import annotations

import asyncio
import json
import signal
import subprocess
import sys
import time
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from keyrotor import Settings
from keyrotor.queue.client import KeyrotorClient
from tests.reliability.harness import SLOW, Workers, seed_scopes, sized, wait_run
from tests.rotation_helpers import check_values, fetch, keyrotor, process_env, run_burst_worker
from tests.servers import ServerProcess, bao_root, bao_server, vault_env

SCOPES = sized(6, 40)
PER_SCOPE = 3
# The steps of a KEK run a worker is killed at, in the order a run reaches them.
ALL_ROTATION_STEPS = (
    "kek_rotate_request",
    "kek_rotated",
    "rewrap_before_commit",
    "rewrap_between_batches",
    "kek_cutoff_request",
    "kek_cutoff_done",
)
ALL_MIGRATION_STEPS = ("rewrap_before_commit", "rewrap_between_batches", "kek_migration_completing")
# Each kill costs a worker start and a lease (~5 s here): by default the steps between a
# provider's answer and its commit; every step under KEYROTOR_SLOW_TESTS=1.
ROTATION_STEPS = ALL_ROTATION_STEPS if SLOW else ("kek_rotated", "rewrap_before_commit", "kek_cutoff_done")
MIGRATION_STEPS = ALL_MIGRATION_STEPS if SLOW else ("rewrap_before_commit", "kek_migration_completing")
__all__ = ["bao_server"]  # the session's OpenBao dev server, a fixture
VAULT_VARS = ("VAULT_ADDR", "VAULT_TOKEN", "VAULT_TRANSIT_KEY", "KEYROTOR_KEK_READ_PROVIDERS")


def _use_env(monkeypatch: pytest.MonkeyPatch, env: dict[str, str]) -> None:
    # In-process KeyManagers read the remote provider's variables from os.environ.
    for name in VAULT_VARS:
        monkeypatch.delenv(name, raising=False)
        if name in env:
            monkeypatch.setenv(name, env[name])


class Child:
    """``kek_usage_child.py`` in a process of its own."""

    def __init__(self, env: dict[str, str], values: dict[str, dict[str, str]], tmp_path: Path) -> None:
        values_path = tmp_path / "child-values.json"
        values_path.write_text(json.dumps(values))
        self.stop_file = tmp_path / "child-stop"
        self.log = tmp_path / "child.log"
        full = process_env(
            {**env, "KEYROTOR_DEK_CACHE_TTL_SECONDS": "0.001", "KEYROTOR_LISTEN_KEY_CHANGES": "0"}
        )
        self.proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "tests.reliability.kek_usage_child",
                str(values_path),
                str(self.stop_file),
            ],
            env=full,
            stdout=self.log.open("wb"),
            stderr=subprocess.STDOUT,
        )

    async def wait_started(self, timeout_s: float = 30) -> None:
        deadline = time.monotonic() + timeout_s
        while '"started"' not in self.log.read_text(errors="replace"):
            assert self.proc.poll() is None and time.monotonic() < deadline, self.log.read_text()[-3000:]
            await asyncio.sleep(0.05)

    async def finish(self, timeout_s: float = 60) -> dict[str, Any]:
        self.stop_file.touch()
        deadline = time.monotonic() + timeout_s
        while self.proc.poll() is None:
            assert time.monotonic() < deadline, "the usage child did not stop"
            await asyncio.sleep(0.05)
        lines = self.log.read_text(errors="replace").splitlines()
        summary: dict[str, Any] = json.loads(lines[-1])
        return summary

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)


@pytest.fixture
def children() -> Iterator[list[Child]]:
    started: list[Child] = []
    yield started
    for child in started:
        child.close()


@pytest.fixture
async def vault_wenv(
    wenv: dict[str, str], bao_server: ServerProcess, monkeypatch: pytest.MonkeyPatch
) -> AsyncIterator[dict[str, str]]:
    env = {
        **wenv,
        **vault_env(bao_server),
        "KEYROTOR_JOB_LEASE_SECONDS": "1",
        "KEYROTOR_KEK_REWRAP_BATCH": "4",
    }
    yield env
    _use_env(monkeypatch, {})


async def _hang_and_kill(workers: Workers, env: dict[str, str], point: str, timeout_s: float = 60) -> None:
    """Start a worker that hangs at ``point``, wait until it is there, SIGKILL it."""
    worker = workers.start({**env, "KEYROTOR_TEST_HANG_AT": point})
    deadline = time.monotonic() + timeout_s
    while not any(e.get("event") == "test_hang" and e.get("at") == point for e in worker.events()):
        assert worker.proc.poll() is None, worker.output()[-3000:]
        assert time.monotonic() < deadline, f"worker never reached {point}:\n{worker.output()[-3000:]}"
        await asyncio.sleep(0.05)
    worker.kill()


def _transit(env: dict[str, str], bao: ServerProcess) -> dict[str, Any]:
    data: dict[str, Any] = bao_root(bao).secrets.transit.read_key(env["VAULT_TRANSIT_KEY"])["data"]
    return data


async def _assert_nothing_cut_off(s: Settings, env: dict[str, str], bao: ServerProcess) -> None:
    """No stored DEK or audit key of the transit key is below its min_decryption_version."""
    key = _transit(env, bao)
    kek_id = f"vault:transit/{env['VAULT_TRANSIT_KEY']}"
    low = await fetch(
        s.database_url,
        "SELECT (SELECT min(kek_version) FROM data_keys WHERE kek_id = $1 AND state <> 'destroyed'), "
        "(SELECT min(kek_version) FROM audit_keys WHERE kek_id = $1)",
        kek_id,
    )
    for lowest in low[0]:
        assert lowest is None or lowest >= key["min_decryption_version"], (dict(low[0]), key)


async def _audit_once(s: Settings, run_id: int) -> int:
    """Each DEK has at most one rewrap event of the run; returns how many there are."""
    rows = await fetch(
        s.database_url,
        "SELECT scope, key_version, count(*) FROM encryption_audit_log WHERE event_type = 'rewrap' "
        "AND success AND (metadata->>'run_id')::bigint = $1 GROUP BY 1, 2",
        run_id,
    )
    assert all(r[2] == 1 for r in rows), [tuple(r) for r in rows if r[2] != 1]
    return len(rows)


async def _seed(s: Settings) -> dict[str, dict[str, str]]:
    values = await seed_scopes(s, [f"tenant-{i:03d}/openai" for i in range(SCOPES)], PER_SCOPE)
    async with KeyrotorClient(s) as client:  # a second DEK version in some scopes
        handles = [await client.rotate(f"tenant-{i:03d}/openai") for i in range(0, SCOPES, 3)]
        await run_burst_worker(s)
        for handle in handles:
            await handle.result(timeout_s=30)
    return values


async def test_vault_kek_rotation_killed_at_every_step(
    vault_wenv: dict[str, str],
    bao_server: ServerProcess,
    workers: Workers,
    children: list[Child],
    monkeypatch: pytest.MonkeyPatch,
    tmp_path: Path,
    record: Callable[..., None],
) -> None:
    env = {**vault_wenv, "SECRETS_PROVIDER": "vault"}
    _use_env(monkeypatch, env)
    s = Settings.from_env(env)
    values = await _seed(s)
    child = Child(env, values, tmp_path)
    children.append(child)
    await child.wait_started()
    async with KeyrotorClient(s) as client:
        run_id = (await client.rotate_kek()).run_id
    t0 = time.monotonic()
    for point in ROTATION_STEPS:
        await _hang_and_kill(workers, env, point)
        await _assert_nothing_cut_off(s, env, bao_server)
    workers.start(env)
    run = await wait_run(s.database_url, run_id, terminal=True, timeout_s=120)
    assert run["state"] == "completed", dict(run)
    await _assert_nothing_cut_off(s, env, bao_server)
    summary = await child.finish()
    assert summary["errors"] == [], summary
    key = _transit(env, bao_server)
    assert (key["latest_version"], key["min_decryption_version"], run["to_version"]) == (2, 2, 2)
    per_kek = await fetch(s.database_url, "SELECT kek_version, count(*) FROM data_keys GROUP BY 1")
    assert [r[0] for r in per_kek] == [2], [tuple(r) for r in per_kek]
    assert await _audit_once(s, run_id) == run["rows_done"] > 0
    cutoffs = await fetch(
        s.database_url,
        "SELECT count(*) FROM encryption_audit_log WHERE event_type = 'config_change' "
        "AND metadata->>'what' = 'kek_min_decryption_version'",
    )
    assert cutoffs[0][0] == 1
    for scope, vals in values.items():
        await check_values(s, scope, vals)
    record(
        "kek_crash",
        job="rotate_kek (vault)",
        kills=len(ROTATION_STEPS),
        steps=list(ROTATION_STEPS),
        attempts=run["attempts"],
        deks=run["rows_done"],
        app_rounds=summary["rounds"],
        app_ops=summary["ops"],
        seconds=round(time.monotonic() - t0, 2),
    )


async def test_kek_migration_local_to_vault_killed_at_every_step(
    vault_wenv: dict[str, str],
    bao_server: ServerProcess,
    workers: Workers,
    children: list[Child],
    monkeypatch: pytest.MonkeyPatch,
    tmp_path: Path,
    record: Callable[..., None],
) -> None:
    env = {**vault_wenv, "SECRETS_PROVIDER": "local", "KEYROTOR_KEK_READ_PROVIDERS": "vault"}
    _use_env(monkeypatch, env)
    s = Settings.from_env(env)
    values = await _seed(s)
    child = Child(env, values, tmp_path)
    children.append(child)
    await child.wait_started()
    out = keyrotor("kek", "migrate", "--to", "vault", "--json", env=env)
    assert out.returncode == 0, out.stderr
    run_id = int(json.loads(out.stdout)["id"])
    t0 = time.monotonic()
    for point in MIGRATION_STEPS:
        await _hang_and_kill(workers, env, point)
    workers.start(env)
    run = await wait_run(s.database_url, run_id, terminal=True, timeout_s=120)
    assert run["state"] == "completed", dict(run)
    summary = await child.finish()
    assert summary["errors"] == [], summary
    kek_id = f"vault:transit/{env['VAULT_TRANSIT_KEY']}"
    # DEKs left on local are the application's (still on local): made after the last pass, the
    # procedure's step 4. The run counted those made before it completed; the child went on
    # making scopes until it was stopped, after that, so the count is bounded both ways: every
    # DEK made well before the completion (its short transaction committed by then) is counted.
    left = await fetch(
        s.database_url,
        "SELECT sc.name, dk.created_at < $2::timestamptz - interval '5 seconds' AS long_before "
        "FROM data_keys dk JOIN key_scopes sc ON sc.id = dk.scope_id "
        "WHERE dk.kek_id <> $1 AND dk.state <> 'destroyed'",
        kek_id,
        run["finished_at"],
    )
    assert all(r["name"].startswith("child-") for r in left), [tuple(r) for r in left]
    remaining = json.loads(run["detail"])["remaining"]
    assert sum(r["long_before"] for r in left) <= remaining <= len(left), [tuple(r) for r in left]
    assert await _audit_once(s, run_id) == run["rows_done"] > 0
    on_vault = {**env, "SECRETS_PROVIDER": "vault", "KEYROTOR_KEK_READ_PROVIDERS": "local"}
    _use_env(monkeypatch, on_vault)
    for scope, vals in values.items():
        await check_values(Settings.from_env(on_vault), scope, vals)
    record(
        "kek_crash",
        job="migrate_kek (local -> vault)",
        kills=len(MIGRATION_STEPS),
        steps=list(MIGRATION_STEPS),
        attempts=run["attempts"],
        deks=run["rows_done"],
        app_rounds=summary["rounds"],
        app_ops=summary["ops"],
        seconds=round(time.monotonic() - t0, 2),
    )


async def test_stalled_attempt_wakes_after_the_run_completed(
    vault_wenv: dict[str, str],
    bao_server: ServerProcess,
    workers: Workers,
    monkeypatch: pytest.MonkeyPatch,
    tmp_path: Path,
    record: Callable[..., None],
) -> None:
    """arq runs the job twice: a worker stalls (SIGSTOP: a VM pause, a swap storm) just after
    Vault's cut-off, its lease runs out, another worker takes the job over and completes the run;
    then the first wakes up and finishes its attempt. The cut-off is recorded once."""
    env = {**vault_wenv, "SECRETS_PROVIDER": "vault"}
    _use_env(monkeypatch, env)
    s = Settings.from_env(env)
    values = await _seed(s)
    async with KeyrotorClient(s) as client:
        run_id = (await client.rotate_kek()).run_id
    release = tmp_path / "release"
    stalled = workers.start(
        {**env, "KEYROTOR_TEST_HANG_AT": "kek_cutoff_done", "KEYROTOR_TEST_HANG_RELEASE": str(release)}
    )
    deadline = time.monotonic() + 60
    while not any(e.get("event") == "test_hang" for e in stalled.events()):
        assert stalled.proc.poll() is None and time.monotonic() < deadline, stalled.output()[-3000:]
        await asyncio.sleep(0.05)
    stalled.proc.send_signal(signal.SIGSTOP)
    try:
        workers.start(env)
        run = await wait_run(s.database_url, run_id, terminal=True, timeout_s=60)
        assert run["state"] == "completed", dict(run)
        release.touch()
    finally:
        stalled.proc.send_signal(signal.SIGCONT)
    deadline = time.monotonic() + 30
    while not any(e.get("event") == "test_hang_released" for e in stalled.events()):
        assert time.monotonic() < deadline, stalled.output()[-3000:]
        await asyncio.sleep(0.05)
    await asyncio.sleep(1)  # its attempt's last transaction
    cutoffs = await fetch(
        s.database_url,
        "SELECT count(*) FROM encryption_audit_log WHERE event_type = 'config_change' "
        "AND metadata->>'what' = 'kek_min_decryption_version'",
    )
    assert cutoffs[0][0] == 1
    assert (
        await _audit_once(s, run_id) == (await wait_run(s.database_url, run_id, terminal=True))["rows_done"]
    )
    for scope, vals in values.items():
        await check_values(s, scope, vals)
    record("kek_crash", job="rotate_kek (vault), attempt stalled past its lease", kills=0, cutoff_events=1)
