"""Fixtures for the scheduler tests: a queue and leader key of this test's own (Redis db 12, like
the worker tests, because other suites flush db 13), a fresh database, and seeding by SQL.

The scheduler never touches keys, so most tests seed scopes with placeholder wrapped DEKs
straight into the tables; the end-to-end tests use real KeyManagers and workers.
"""

from __future__ import annotations

import os
import signal
import subprocess
from collections.abc import AsyncIterator, Iterator, Mapping
from datetime import datetime
from pathlib import Path
from typing import Any

import asyncpg
import pytest
import redis.asyncio as aioredis

from keyrotor import Settings
from keyrotor.worker.scheduler import Scheduler
from tests.rotation_helpers import BIN, WORKER_REDIS_URL, cleanup_queue, worker_env


def scheduler_env(env: Mapping[str, str], **extra: str) -> dict[str, str]:
    """``worker_env`` plus the scheduler's own leader key (cleaned up with the queue's keys)."""
    e = worker_env(env)
    return {
        **e,
        "KEYROTOR_SCHEDULER_LEADER_KEY": f"{e['KEYROTOR_QUEUE_NAME']}:scheduler:leader",
        "KEYROTOR_SCHEDULE_BACKOFF_SECONDS": "60",
        "KEYROTOR_SCHEDULE_BACKOFF_MAX_SECONDS": "600",
        "KEYROTOR_LISTEN_KEY_CHANGES": "false",
        **extra,
    }


@pytest.fixture
async def senv(env: dict[str, str]) -> AsyncIterator[dict[str, str]]:
    e = scheduler_env(env)
    yield e
    await cleanup_queue(e["KEYROTOR_QUEUE_NAME"])


@pytest.fixture
async def sched(senv: dict[str, str]) -> AsyncIterator[Scheduler]:
    async with Scheduler(Settings.from_env(senv), instance_id="test") as s:
        yield s


@pytest.fixture
async def rq() -> AsyncIterator[Any]:
    """A plain Redis client on the tests' queue database."""
    client: Any = aioredis.from_url(WORKER_REDIS_URL)
    try:
        yield client
    finally:
        await client.aclose()


async def sql(database_url: str, query: str, *args: Any) -> list[asyncpg.Record]:
    conn = await asyncpg.connect(database_url)
    try:
        return list(await conn.fetch(query, *args))
    finally:
        await conn.close()


async def seed_scopes(
    database_url: str,
    n: int,
    *,
    due_at: datetime | None,
    prefix: str = "s",
    interval_days: int = 30,
    start: int = 0,
) -> list[str]:
    """``n`` scopes with DEK v1 active (a placeholder wrapped key) and ``next_rotation_at = due_at``."""
    names = [f"{prefix}{i:06d}" for i in range(start, start + n)]
    conn = await asyncpg.connect(database_url)
    try:
        async with conn.transaction():
            ids = await conn.fetch(
                "INSERT INTO key_scopes (name, active_version, latest_version, interval_days, "
                "grace_period_days, next_rotation_at) "
                "SELECT unnest($1::text[]), 1, 1, $2, 7, $3 RETURNING id",
                names,
                interval_days,
                due_at,
            )
            await conn.execute(
                "INSERT INTO data_keys (scope_id, version, state, encrypted_dek, kek_id, kek_version, "
                "activated_at) SELECT unnest($1::bigint[]), 1, 'active', '\\x00'::bytea, 'test', 1, now()",
                [r["id"] for r in ids],
            )
    finally:
        await conn.close()
    return names


async def queued_jobs(rq: Any, queue: str) -> list[str]:
    """Job ids waiting in the arq queue."""
    return [j.decode() for j in await rq.zrange(queue, 0, -1)]


class Proc:
    """``keyrotor ARGS`` in a subprocess, its output in a file."""

    def __init__(self, env: Mapping[str, str], log_path: Path, *args: str) -> None:
        self.log_path = log_path
        full_env = {"PATH": os.environ.get("PATH", ""), "HOME": os.environ.get("HOME", "/root"), **env}
        self._log = log_path.open("ab")
        self.proc = subprocess.Popen(
            [str(BIN), *args], env=full_env, stdout=self._log, stderr=subprocess.STDOUT
        )

    @property
    def pid(self) -> int:
        return self.proc.pid

    def output(self) -> str:
        return self.log_path.read_text(errors="replace")

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


@pytest.fixture
def procs() -> Iterator[list[Proc]]:
    """Processes a test starts; killed (if still running) when it ends."""
    started: list[Proc] = []
    yield started
    for p in started:
        p.close()
