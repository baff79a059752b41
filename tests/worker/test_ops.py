"""Operations: /metrics scraped while a real rotation runs shows its counters moving, /healthz
and /readyz answer, ``keyrotor health`` goes red without Redis and green with a worker and a
scheduler running (real outages: test_health_outage.py), and a rotation logged at DEBUG
carries scope, run id, job id and step on its events and leaves no plaintext, DEK or master
key in the worker's output."""

from __future__ import annotations

import asyncio
import base64
import contextlib
import hashlib
import json
import os
import re
import signal
import socket
import subprocess
import time
import urllib.error
import urllib.request
from collections.abc import AsyncIterator, Iterator
from pathlib import Path
from typing import Any

import pytest

from keyrotor import KeyManager, Settings
from keyrotor.kek.base import WrapContext, WrappedDek
from keyrotor.kek.factory import open_provider
from keyrotor.queue.client import KeyrotorClient
from tests.conftest import MASTER_KEY
from tests.rotation_helpers import (
    BIN,
    WorkerProcess,
    cleanup_queue,
    fetch,
    keyrotor,
    seed,
    worker_env,
)

SCOPE = "tenant-7/anthropic"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def get(port: int, path: str) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=5) as resp:
            return resp.status, resp.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode()


def sample(metrics: str, name: str, **labels: str) -> float:
    """The value of one sample in a Prometheus text exposition (0 if absent)."""
    want = ",".join(f'{k}="{v}"' for k, v in sorted(labels.items()))
    for line in metrics.splitlines():
        m = re.fullmatch(r"([a-zA-Z_:][\w:]*)(?:\{(.*)\})? (\S+)", line)
        if m and m.group(1) == name:
            got = ",".join(sorted((m.group(2) or "").split(","))) if m.group(2) else ""
            if got == want:
                return float(m.group(3))
    return 0.0


# `keyrotor health --json` with everything up and no secondary region configured (healthy: a
# warning is not a failure).
ALL_GREEN = {
    "postgres": "ok",
    "redis": "ok",
    "kek": "ok",
    "worker": "ok",
    "scheduler": "ok",
    "replicas": "not_configured",
    "census": "ok",
    "grants": "warn",  # a fresh install still has the open default grant '* *'
}


@pytest.fixture
async def wenv(env: dict[str, str]) -> AsyncIterator[dict[str, str]]:
    e = worker_env(env)
    e["KEYROTOR_SCHEDULER_LEADER_KEY"] = f"{e['KEYROTOR_QUEUE_NAME']}:scheduler:leader"
    yield e
    await cleanup_queue(e["KEYROTOR_QUEUE_NAME"])


@pytest.fixture
def procs() -> Iterator[list[Any]]:
    started: list[Any] = []
    yield started
    for p in started:
        if isinstance(p, WorkerProcess):
            p.close()
        elif p.poll() is None:
            p.kill()
            p.wait(10)


async def test_metrics_move_during_a_rotation_and_debug_logs_hold_no_secrets(
    wenv: dict[str, str], tmp_path: Path, procs: list[Any]
) -> None:
    settings = Settings.from_env(wenv)
    values = await seed(settings, SCOPE, 40)
    port = free_port()
    env = {
        **wenv,
        "KEYROTOR_METRICS_PORT": str(port),
        "KEYROTOR_METRICS_HOST": "127.0.0.1",
        "KEYROTOR_LOG_LEVEL": "DEBUG",
        # Fan out (two id ranges of 20 rows, batches of 10), so every step logs: prepare,
        # promote, reencrypt and complete, from the driver job and the range jobs.
        "KEYROTOR_SMALL_SCOPE_ROWS": "10",
        "KEYROTOR_REENCRYPT_RANGE_ROWS": "20",
        "KEYROTOR_REENCRYPT_BATCH_ROWS": "10",
        "KEYROTOR_TEST_BATCH_DELAY_S": "0.3",
    }
    worker = WorkerProcess(env, tmp_path / "worker.log")
    procs.append(worker)
    await worker.wait_started()

    status, body = get(port, "/healthz")
    assert status == 200 and json.loads(body)["status"] == "ok"
    status, body = get(port, "/readyz")
    ready = json.loads(body)
    assert status == 200, ready
    assert {k: v["ok"] for k, v in ready["checks"].items()} == {"postgres": True, "redis": True, "kek": True}
    _, before = get(port, "/metrics")
    assert sample(before, "keyrotor_rotations_completed_total", scope=SCOPE) == 0

    async with KeyrotorClient(settings) as client:
        handle = await client.rotate(SCOPE)
        # Scrape while the run is in progress (batches are slowed to 0.3 s each): the rows
        # counter is seen between 0 and 40 and never goes down.
        seen: list[float] = []
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            _, during = await asyncio.to_thread(get, port, "/metrics")
            seen.append(sample(during, "keyrotor_rows_reencrypted_total", scope=SCOPE))
            if sample(during, "keyrotor_rotations_completed_total", scope=SCOPE) == 1:
                break
            await asyncio.sleep(0.05)
        run = await handle.result(timeout_s=30)
    assert run.rows_done == 40
    assert seen == sorted(seen) and seen[-1] == 40, seen
    assert [v for v in seen if 0 < v < 40], seen

    _, after = get(port, "/metrics")
    assert sample(after, "keyrotor_rotations_started_total", scope=SCOPE) == 1
    assert sample(after, "keyrotor_rotations_completed_total", scope=SCOPE) == 1
    assert sample(after, "keyrotor_rows_reencrypted_total", scope=SCOPE) == 40
    assert sample(after, "keyrotor_rotation_duration_seconds_count", scope=SCOPE) == 1
    assert sample(after, "keyrotor_arq_jobs_total", function="rotate_dek", outcome="success") == 1
    assert sample(after, "keyrotor_arq_jobs_total", function="reencrypt_range", outcome="success") == 2
    assert sample(after, "keyrotor_arq_queue_depth", queue=wenv["KEYROTOR_QUEUE_NAME"]) == 0
    assert "keyrotor_dek_cache_hits_total" in after and "keyrotor_audit_queue_depth" in after
    assert "keyrotor_kek_calls_total" in after or "keyrotor_kek_calls" in after

    assert worker.terminate() == 0
    logs = worker.output()
    assert '"level": "debug"' in logs  # DEBUG really was on
    for line in logs.splitlines():  # one JSON event a line
        json.loads(line)
    # The run's events carry its scope, run id, the arq job id and the rotation step.
    of_run = [e for e in worker.events() if e.get("run_id") == run.id]
    jobs = {"rotate_dek", "reencrypt_range"}
    assert of_run, logs[-2000:]
    for event in of_run:
        assert event["scope"] == SCOPE and event["job_id"] and event["job"] in jobs, event
    steps = [e["step"] for e in of_run if "step" in e]
    assert {"prepare", "promote", "reencrypt"} <= set(steps), steps
    assert [e["event"] for e in of_run if e.get("step") == "reencrypt"].count("batch_reencrypted") == 4
    completed = [e for e in of_run if e["event"] == "rotation_completed"]
    assert [e["step"] for e in completed] == ["complete"], of_run
    # Everything secret this rotation touched: the values, the master key, every DEK (raw, in
    # base64, base64url and hex) and every wrapped DEK.
    forbidden = [*values.values(), MASTER_KEY]
    kek = await open_provider(settings)
    try:
        for scope, version, blob, kek_id, kek_version in await fetch(
            settings.database_url,
            "SELECT k.name, d.version, d.encrypted_dek, d.kek_id, d.kek_version "
            "FROM data_keys d JOIN key_scopes k ON k.id = d.scope_id",
        ):
            dek = await kek.unwrap(WrappedDek(kek_id, kek_version, bytes(blob)), WrapContext(scope, version))
            forbidden += [
                base64.b64encode(dek).decode(),
                base64.urlsafe_b64encode(dek).decode().rstrip("="),
                dek.hex(),
                base64.b64encode(bytes(blob)).decode()[:40],
            ]
    finally:
        await kek.aclose()
    leaks = [f[:12] for f in forbidden if f in logs]
    assert not leaks, leaks
    for ciphertext_row in await fetch(settings.database_url, "SELECT ciphertext FROM secrets"):
        assert ciphertext_row[0] not in logs


def _start_scheduler(env: dict[str, str], log_path: Path) -> subprocess.Popen[bytes]:
    full = {"PATH": os.environ.get("PATH", ""), "HOME": os.environ.get("HOME", "/root"), **env}
    with log_path.open("ab") as out:
        return subprocess.Popen([str(BIN), "scheduler"], env=full, stdout=out, stderr=subprocess.STDOUT)


async def test_health_is_red_without_redis_and_green_with_worker_and_scheduler(
    wenv: dict[str, str], tmp_path: Path, procs: list[Any]
) -> None:
    closed = free_port()  # nothing listens here: the shared Redis is never touched
    red = keyrotor("health", "--json", env={**wenv, "REDIS_URL": f"redis://127.0.0.1:{closed}/0"}, timeout=60)
    assert red.returncode == 1, red.stderr
    doc = json.loads(red.stdout)
    assert doc["healthy"] is False
    assert doc["checks"]["redis"]["status"] == "fail"
    assert doc["checks"]["postgres"]["status"] == "ok" and doc["checks"]["kek"]["status"] == "ok"
    assert doc["checks"]["replicas"]["status"] == "not_configured"
    assert MASTER_KEY not in red.stdout + red.stderr

    # The KEK provider out (a Vault nothing answers for): red on `kek`, and its token never shown.
    token = "hvs.health-test-token-" + "x" * 20
    no_kek = keyrotor(
        "health",
        "--json",
        env={
            **wenv,
            "SECRETS_PROVIDER": "vault",
            "VAULT_ADDR": f"http://127.0.0.1:{closed}",
            "VAULT_TOKEN": token,
        },
        timeout=60,
    )
    assert no_kek.returncode == 1, no_kek.stderr
    checks = json.loads(no_kek.stdout)["checks"]
    assert checks["kek"]["status"] == "fail" and "KekUnavailable" in checks["kek"]["error"]
    assert checks["postgres"]["status"] == "ok" and checks["redis"]["status"] == "ok"
    assert token not in no_kek.stdout + no_kek.stderr

    env = {**wenv, "KEYROTOR_METRICS_PORT": "0", "KEYROTOR_SCAN_INTERVAL_SECONDS": "1"}
    worker = WorkerProcess(env, tmp_path / "worker.log")
    procs.append(worker)
    sched_port = free_port()
    sched = _start_scheduler(
        {**env, "KEYROTOR_METRICS_PORT": str(sched_port), "KEYROTOR_METRICS_HOST": "127.0.0.1"},
        tmp_path / "scheduler.log",
    )
    procs.append(sched)
    await worker.wait_started()
    deadline = time.monotonic() + 30
    while True:
        green = keyrotor("health", "--json", env=wenv, timeout=60)
        if green.returncode == 0 or time.monotonic() > deadline:
            break
        await asyncio.sleep(0.5)
    assert green.returncode == 0, green.stdout + (tmp_path / "scheduler.log").read_text()[-2000:]
    checks = json.loads(green.stdout)["checks"]
    assert {k: v["status"] for k, v in checks.items()} == ALL_GREEN
    status, body = get(sched_port, "/readyz")
    assert status == 200 and json.loads(body)["scheduler_role"] == "leader"
    sched.send_signal(signal.SIGTERM)
    assert sched.wait(30) == 0
    assert worker.terminate() == 0


def _label_values(metrics: str) -> set[str]:
    return {
        v
        for labels in re.findall(r"^keyrotor_\w+\{(.*)\} ", metrics, re.M)
        for v in re.findall(r'="([^"]*)"', labels)
    }


async def test_failure_metrics_rows_per_version_and_labels_hold_no_secrets(
    wenv: dict[str, str], tmp_path: Path, procs: list[Any]
) -> None:
    """A rotation that meets a tampered row fails: ``rotations_failed`` and ``decrypt_failures``
    move on the worker, ``arq_jobs{outcome="failed"}`` too; the leading scheduler's scrape shows
    rows per DEK version and the unregistered locations; no label anywhere carries a value, a
    ciphertext or a key."""
    settings = Settings.from_env(wenv)
    values = await seed(settings, SCOPE, 12)
    await fetch(
        settings.database_url,
        # One byte of one ciphertext flipped (the base64url character after the version prefix).
        "UPDATE secrets SET ciphertext = regexp_replace(ciphertext, '^(kr1:1:)(.)', "
        "'\\1' || CASE WHEN substr(ciphertext, 7, 1) = 'A' THEN 'B' ELSE 'A' END) "
        "WHERE id = (SELECT min(id) FROM secrets)",
    )
    # A value in a table nobody registered: the leader's census gauge counts its location.
    async with KeyManager(settings) as km:
        await km.encrypt(SCOPE, "sk-proj-unregistered-0123456789", context="orders.card_token:1")
    wport, sport = free_port(), free_port()
    worker = WorkerProcess(
        {**wenv, "KEYROTOR_METRICS_PORT": str(wport), "KEYROTOR_METRICS_HOST": "127.0.0.1"},
        tmp_path / "worker.log",
    )
    procs.append(worker)
    sched = _start_scheduler(
        {
            **wenv,
            "KEYROTOR_METRICS_PORT": str(sport),
            "KEYROTOR_METRICS_HOST": "127.0.0.1",
            "KEYROTOR_SCAN_INTERVAL_SECONDS": "1",
            "KEYROTOR_ROWS_METRIC_INTERVAL_SECONDS": "1",
        },
        tmp_path / "scheduler.log",
    )
    procs.append(sched)
    await worker.wait_started()

    async with KeyrotorClient(settings) as client:
        handle = await client.rotate(SCOPE)
        run = await handle.wait(30)
    assert run.state == "failed" and "RowFailed" in (run.error or ""), run

    _, body = get(wport, "/metrics")
    assert sample(body, "keyrotor_rotations_failed_total", scope=SCOPE, kind="dek") == 1
    assert sample(body, "keyrotor_decrypt_failures_total", reason="DecryptionFailed") == 1
    assert sample(body, "keyrotor_arq_jobs_total", function="rotate_dek", outcome="failed") == 1
    assert sample(body, "keyrotor_rotations_completed_total", scope=SCOPE) == 0

    # The failed run rolled back: all 12 rows are still on v1, which the leader recounts.
    deadline = time.monotonic() + 30
    sbody = ""
    while True:
        try:
            _, sbody = get(sport, "/metrics")
        except OSError:  # the scheduler's server is not listening yet (a loaded machine)
            assert sched.poll() is None, (tmp_path / "scheduler.log").read_text()[-3000:]
        if (
            sample(sbody, "keyrotor_rows_per_dek_version", scope=SCOPE, version="1") == 12
            and sample(sbody, "keyrotor_unregistered_locations") == 1
        ):
            break
        assert time.monotonic() < deadline, sbody[-3000:]
        await asyncio.sleep(0.5)

    ciphertexts = [r[0] for r in await fetch(settings.database_url, "SELECT ciphertext FROM secrets")]
    labels = _label_values(body) | _label_values(sbody)
    assert SCOPE in labels
    secrets_ = [*values.values(), MASTER_KEY, *ciphertexts]
    for label in labels:
        # Neither a whole secret nor a long piece of one (short labels such as "1" or "dek"
        # occur inside random text by chance).
        assert not any(s in label for s in secrets_), label
        assert len(label) < 16 or not any(label in s for s in secrets_), label
        assert not label.startswith(("kr1:", "sk-", "AIza")), label
    sched.send_signal(signal.SIGTERM)  # both shut down at once; each must still exit cleanly
    assert worker.terminate() == 0
    assert sched.wait(30) == 0


def _non_loopback_addresses() -> list[str]:
    """IPv4 addresses of this host other than 127.0.0.0/8 (where a 0.0.0.0 bind would answer)."""
    found = set()
    with contextlib.suppress(OSError):
        for info in socket.getaddrinfo(socket.gethostname(), None, socket.AF_INET):
            found.add(str(info[4][0]))
    with contextlib.suppress(OSError), socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.connect(("192.0.2.254", 9))  # no packet is sent: picks the outgoing interface's address
        found.add(s.getsockname()[0])
    return sorted(a for a in found if not a.startswith("127."))


async def test_metrics_bind_loopback_by_default_and_hash_scope_labels(
    wenv: dict[str, str], tmp_path: Path, procs: list[Any]
) -> None:
    """#19 finding 9: /metrics is unauthenticated, so it answers on loopback only unless told
    otherwise, and with KEYROTOR_METRICS_SCOPE_LABELS=hashed it never shows a scope's name."""
    others = _non_loopback_addresses()
    if not others:
        pytest.skip("this host has no non-loopback IPv4 address to probe")
    settings = Settings.from_env(wenv)
    await seed(settings, SCOPE, 5)
    port = free_port()
    env = {k: v for k, v in wenv.items() if k != "KEYROTOR_METRICS_HOST"}
    env |= {"KEYROTOR_METRICS_PORT": str(port), "KEYROTOR_METRICS_SCOPE_LABELS": "hashed"}
    worker = WorkerProcess(env, tmp_path / "worker.log")
    procs.append(worker)
    await worker.wait_started()
    async with KeyrotorClient(settings) as client:
        run = await (await client.rotate(SCOPE)).result(timeout_s=30)
    assert run.rows_done == 5
    status, text = get(port, "/metrics")
    assert status == 200
    hashed = "h:" + hashlib.sha256(SCOPE.encode()).hexdigest()[:12]
    assert sample(text, "keyrotor_rotations_completed_total", scope=hashed) == 1
    assert SCOPE not in text and "tenant-7" not in text
    for address in others:
        with pytest.raises(OSError), socket.create_connection((address, port), timeout=2):
            pass
