"""Fixtures for the job tests: a queue and channel of this test's own, on real Redis and Postgres."""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest

from keyrotor import Settings
from tests.rotation_helpers import cleanup_queue, worker_env


@pytest.fixture
async def wenv(env: dict[str, str]) -> AsyncIterator[dict[str, str]]:
    """The env of this test's workers and clients (own queue, channel, short leases)."""
    e = worker_env(env)
    yield e
    await cleanup_queue(e["KEYROTOR_QUEUE_NAME"])


def settings_of(wenv: dict[str, str], **extra: str) -> Settings:
    return Settings.from_env({**wenv, **extra})
