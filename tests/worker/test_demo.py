"""``keyrotor demo`` end to end in a subprocess, twice (it must be idempotent), on a database
that does not exist yet and a queue, channel and leader key of its own."""

from __future__ import annotations

import time
import uuid
from collections.abc import AsyncIterator

import pytest

from tests.conftest import MASTER_KEY, PG_ADMIN, _admin
from tests.rotation_helpers import WORKER_REDIS_URL, cleanup_queue, keyrotor


@pytest.fixture
async def demo_env() -> AsyncIterator[dict[str, str]]:
    name = f"kr_demo_{uuid.uuid4().hex[:10]}"
    tag = uuid.uuid4().hex[:10]
    queue = f"krtest:{tag}"
    yield {
        "DATABASE_URL": PG_ADMIN.rsplit("/", 1)[0] + "/" + name,
        "REDIS_URL": WORKER_REDIS_URL,
        "ENCRYPTION_KEY": MASTER_KEY,
        "KEYROTOR_QUEUE_NAME": queue,
        "KEYROTOR_NOTIFY_CHANNEL": f"{queue}:keys",
        "KEYROTOR_SCHEDULER_LEADER_KEY": f"{queue}:scheduler:leader",
        "KEYROTOR_WORKER_POLL_DELAY_SECONDS": "0.05",
        "COLUMNS": "200",
    }
    await cleanup_queue(queue)
    await _admin(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")


def test_demo_runs_the_whole_system_and_is_idempotent(demo_env: dict[str, str]) -> None:
    started = time.monotonic()
    first = keyrotor("demo", env=demo_env, timeout=60)
    out = first.stdout + first.stderr
    assert first.returncode == 0, out[-4000:]
    assert "created the database" in out
    for provider in ("openai", "anthropic", "google"):
        assert f"stored and read back {provider}/demo" in out
        assert f"{provider} v1 -> v2: completed" in out
    assert "both reported in" in out
    assert "replicas: not configured" in out
    assert "keyrotor_rotations_completed_total" in out  # scraped from the worker's /metrics
    assert "audit log (last 10 events):" in out and " rotate " in out
    assert "stopped: scheduler exit 0, worker exit 0" in out

    second = keyrotor("demo", env=demo_env, timeout=60)
    out2 = second.stdout + second.stderr
    assert second.returncode == 0, out2[-4000:]
    assert "created the database" not in out2
    for provider in ("openai", "anthropic", "google"):
        assert f"{provider} v2 -> v3: completed" in out2
    assert "stopped: scheduler exit 0, worker exit 0" in out2
    assert MASTER_KEY not in out + out2
    assert time.monotonic() - started < 60
