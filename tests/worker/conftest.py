"""Fixtures of the worker tests that run real ``keyrotor worker`` processes."""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator

import pytest

from tests.rotation_helpers import WorkerProcess, cleanup_queue, worker_env


@pytest.fixture
async def wenv(env: dict[str, str]) -> AsyncIterator[dict[str, str]]:
    """The env of this test's workers and clients: its own queue and channel, short leases."""
    e = worker_env(env)
    yield e
    await cleanup_queue(e["KEYROTOR_QUEUE_NAME"])


@pytest.fixture
def workers() -> Iterator[list[WorkerProcess]]:
    """Worker processes started by the test; all killed at the end."""
    started: list[WorkerProcess] = []
    yield started
    for w in started:
        w.close()
