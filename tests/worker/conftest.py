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
    """Worker processes started by the test; all killed at the end.

    The end of each one's log is printed at teardown: pytest shows it only when the test
    failed, so a stall seen once on a busy machine can be read, not guessed at."""
    started: list[WorkerProcess] = []
    yield started
    for i, w in enumerate(started):
        w.close()
        tail = w.output().splitlines()[-40:]
        print(f"--- worker {i} (exit {w.proc.returncode}), last {len(tail)} lines ---", *tail, sep="\n")
