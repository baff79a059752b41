"""Test-only hang points: where the crash suite SIGKILLs a worker inside a KEK run.

A random kill rarely lands in the milliseconds between a provider's answer and the commit that
records it, and those are the moments a resumed run must get right. With
``KEYROTOR_TEST_HANG_AT=<point>[,<point>...]`` a process logs ``test_hang`` at the first
listed point it reaches and then waits there until it is killed; unset (always, outside the
test suite), :func:`hang_point` returns at once. With ``KEYROTOR_TEST_HANG_RELEASE=<file>`` it
goes on once that file exists: a stalled worker that wakes up after another took its job over.
"""

from __future__ import annotations

import asyncio
import os
from pathlib import Path

import structlog

log = structlog.get_logger("keyrotor.rotation.hang")

ENV = "KEYROTOR_TEST_HANG_AT"
RELEASE_ENV = "KEYROTOR_TEST_HANG_RELEASE"


async def hang_point(name: str) -> None:
    """Wait here forever if ``name`` is listed in ``KEYROTOR_TEST_HANG_AT`` (tests only)."""
    listed = os.environ.get(ENV)
    if not listed or name not in listed.split(","):
        return
    log.warning("test_hang", at=name)
    release = os.environ.get(RELEASE_ENV)
    if not release:
        await asyncio.Event().wait()
        return
    # Another process makes the file: nothing in this one could set an Event.
    while not await asyncio.to_thread(Path(release).exists):  # noqa: ASYNC110
        await asyncio.sleep(0.05)
    log.warning("test_hang_released", at=name)
