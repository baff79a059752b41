"""Shared by tests/jobs and tests/worker: per-test queues, seeding, checking, worker processes."""

from __future__ import annotations

import asyncio
import json
import os
import secrets
import signal
import subprocess
import sys
import time
import uuid
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import asyncpg
import redis.asyncio as aioredis

from keyrotor import KeyManager, Settings
from keyrotor.worker.main import LeasedWorker, worker_settings
from tests.conftest import redis_db_of_this_process

BIN = Path(sys.executable).parent / "keyrotor"
ROOT = Path(__file__).resolve().parents[1]  # PYTHONPATH of subprocesses: see tests/cli_helpers.py
# A Redis database of its own: other suites flush theirs (db 13) while these run.
WORKER_REDIS_URL = redis_db_of_this_process(
    os.environ.get("KEYROTOR_TEST_WORKER_REDIS", "redis://127.0.0.1:6379/12")
)


def process_env(env: Mapping[str, str]) -> dict[str, str]:
    """Exactly ``env`` for a ``keyrotor`` subprocess, plus PATH, HOME and the test's PYTHONPATH.

    PYTHONPATH is passed on so that the subprocess imports the keyrotor under test: the
    installed entry point may otherwise find another checkout's package (an editable install).
    """
    extra = {"PYTHONPATH": os.environ.get("PYTHONPATH") or str(ROOT)}
    return {"PATH": os.environ.get("PATH", ""), "HOME": os.environ.get("HOME", "/root"), **extra, **env}


def worker_env(env: Mapping[str, str], **extra: str) -> dict[str, str]:
    """The test env plus a queue and channel of its own, short leases and fast polling."""
    tag = uuid.uuid4().hex[:10]
    return {
        **env,
        "REDIS_URL": WORKER_REDIS_URL,
        "KEYROTOR_QUEUE_NAME": f"krtest:{tag}",
        "KEYROTOR_NOTIFY_CHANNEL": f"krtest:{tag}:keys",
        "KEYROTOR_JOB_LEASE_SECONDS": "3",
        "KEYROTOR_WORKER_POLL_DELAY_SECONDS": "0.05",
        "KEYROTOR_RETRY_BACKOFF_SECONDS": "0.2",
        "KEYROTOR_RETRY_BACKOFF_MAX_SECONDS": "1",
        "KEYROTOR_LOG_FORMAT": "json",
        **extra,
    }


async def cleanup_queue(queue: str) -> None:
    """Delete this test's arq keys (job ids start with the queue name)."""
    client: Any = aioredis.Redis.from_url(WORKER_REDIS_URL)
    try:
        keys = [k async for k in client.scan_iter(match=f"*{queue}*", count=1000)]
        if keys:
            await client.delete(*keys)
    finally:
        await client.aclose()


def value_for(scope: str, i: int) -> str:
    """A realistic, unique API key."""
    return f"sk-ant-api03-{scope.replace('/', '-')}-{i:06d}-{secrets.token_urlsafe(24)}"


async def seed(settings: Settings, scope: str, n: int, *, prefix: str = "k") -> dict[str, str]:
    """Store ``n`` values in ``scope``; returns name -> plaintext."""
    values = {f"{prefix}{i:06d}": value_for(scope, i) for i in range(n)}
    items = list(values.items())
    async with KeyManager(settings.model_copy(update={"listen_key_changes": False})) as km:
        for i in range(0, len(items), 5_000):
            await km.put_secrets(scope, items[i : i + 5_000])
    return values


async def check_values(settings: Settings, scope: str, expected: Mapping[str, str]) -> dict[int, int]:
    """Assert every value decrypts to what was stored. Returns rows per DEK version."""
    conn = await asyncpg.connect(settings.database_url)
    try:
        rows = await conn.fetch(
            "SELECT s.name, s.ciphertext, s.dek_version FROM secrets s "
            "JOIN key_scopes k ON k.id = s.scope_id WHERE k.name = $1",
            scope,
        )
    finally:
        await conn.close()
    assert len(rows) == len(expected)
    per_version: dict[int, int] = {}
    async with KeyManager(settings.model_copy(update={"listen_key_changes": False})) as km:
        for name, ciphertext, version in rows:
            assert ciphertext.startswith(f"kr1:{version}:"), name
            assert await km.decrypt(scope, ciphertext, context=f"secret:{name}") == expected[name], name
            per_version[version] = per_version.get(version, 0) + 1
    return per_version


async def fetch(database_url: str, sql: str, *args: Any) -> list[asyncpg.Record]:
    conn = await asyncpg.connect(database_url)
    try:
        return list(await conn.fetch(sql, *args))
    finally:
        await conn.close()


async def run_burst_worker(settings: Settings, *, max_jobs: int | None = None) -> LeasedWorker:
    """Run an in-process worker until the queue is empty."""
    kwargs = worker_settings(settings)
    kwargs["ctx"]["configure_logging"] = False
    if max_jobs is not None:
        kwargs["max_jobs"] = max_jobs
    worker = LeasedWorker(**kwargs, burst=True, handle_signals=False)
    try:
        await worker.main()
    finally:
        await worker.close()
    return worker


class WorkerProcess:
    """``keyrotor worker`` in a subprocess, its output in a file."""

    def __init__(self, env: Mapping[str, str], log_path: Path, *args: str) -> None:
        self.log_path = log_path
        full_env = process_env(env)
        self._log = log_path.open("ab")
        self.proc = subprocess.Popen(
            [str(BIN), "worker", *args], env=full_env, stdout=self._log, stderr=subprocess.STDOUT
        )

    def output(self) -> str:
        return self.log_path.read_text(errors="replace")

    def events(self) -> list[dict[str, Any]]:
        out = []
        for line in self.output().splitlines():
            try:
                out.append(json.loads(line))
            except ValueError:
                continue
        return out

    async def wait_started(self, timeout_s: float = 20) -> None:
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if '"worker_started"' in self.output():
                return
            if self.proc.poll() is not None:
                raise AssertionError(f"worker exited ({self.proc.returncode}):\n{self.output()[-3000:]}")
            await asyncio.sleep(0.05)
        raise AssertionError(f"worker did not start:\n{self.output()[-3000:]}")

    def kill(self) -> None:
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait(10)

    def terminate(self, timeout_s: float = 20) -> int:
        self.proc.send_signal(signal.SIGTERM)
        return self.proc.wait(timeout_s)

    def close(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)
        self._log.close()


def keyrotor(
    *args: str, env: Mapping[str, str], stdin: str | None = None, timeout: float = 120
) -> subprocess.CompletedProcess[str]:
    """Run ``keyrotor ARGS`` with exactly ``env`` (plus PATH/HOME)."""
    full_env = process_env(env)
    return subprocess.run(
        [str(BIN), *args],
        input=stdin,
        capture_output=True,
        text=True,
        env=full_env,
        timeout=timeout,
        check=False,
    )


def import_lines(values_by_scope: Mapping[str, Mapping[str, str]]) -> str:
    """JSON lines for ``keyrotor secrets import -``."""
    return "".join(
        json.dumps({"scope": scope, "name": name, "value": value}) + "\n"
        for scope, values in values_by_scope.items()
        for name, value in values.items()
    )
