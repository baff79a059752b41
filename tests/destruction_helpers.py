"""Helpers for the retirement and destruction-window tests: acknowledged and recorded locations,
moving a window into the past, and opening the scheduler's destruction runs."""

from __future__ import annotations

import asyncio
import time
from datetime import UTC, datetime
from typing import Any

import asyncpg

from keyrotor import Settings, runs
from keyrotor.queue.enqueue import connect_queue, enqueue_driver
from keyrotor.runs import RunInfo
from keyrotor.schedule import scan as schedule
from keyrotor.store import db
from tests.rotation_helpers import fetch


async def acknowledge(database_url: str, location: str, reason: str) -> None:
    """What ``keyrotor columns ignore LOCATION --reason`` records."""
    await fetch(
        database_url,
        "INSERT INTO location_acks (location, reason, actor) VALUES ($1, $2, 'test') ON CONFLICT DO NOTHING",
        location,
        reason,
    )


async def record_location(database_url: str, scope: str, version: int, location: str) -> None:
    """A location that received values of ``scope`` v``version`` (as an encrypt records it)."""
    await fetch(
        database_url,
        "INSERT INTO key_locations (scope_id, dek_version, location, encryptions) "
        "SELECT id, $2, $3, 1 FROM key_scopes WHERE name = $1 ON CONFLICT DO NOTHING",
        scope,
        version,
        location,
    )


async def key_row(database_url: str, scope: str, version: int) -> asyncpg.Record:
    rows = await fetch(
        database_url,
        "SELECT d.* FROM data_keys d JOIN key_scopes s ON s.id = d.scope_id "
        "WHERE s.name = $1 AND d.version = $2",
        scope,
        version,
    )
    return rows[0]


async def expire_window(database_url: str, scope: str, version: int) -> None:
    """Move the destruction window of a retired version into the past (as if its days had passed)."""
    await fetch(
        database_url,
        "UPDATE data_keys d SET destroy_after = now() - interval '1 second' FROM key_scopes s "
        "WHERE s.id = d.scope_id AND s.name = $1 AND d.version = $2 AND d.destroy_after IS NOT NULL",
        scope,
        version,
    )


async def open_destructions(settings: Settings, now: datetime | None = None) -> list[RunInfo]:
    """Open (and enqueue) the destruction runs a scheduler scan at ``now`` would."""
    engine = db.create_engine(settings.database_url, pool_size=1)
    redis = await connect_queue(settings)
    opened: list[RunInfo] = []
    try:
        sessions = db.sessionmaker(engine)
        cfg = schedule.ScanConfig()
        async for batch in schedule.open_due_destructions(sessions, now or datetime.now(UTC), cfg):
            opened += batch.opened
        for run in opened:
            await enqueue_driver(redis, settings, run)
    finally:
        await redis.aclose(close_connection_pool=True)
        await engine.dispose()
    return opened


async def wait_run(settings: Settings, run_id: int, timeout_s: float = 60) -> RunInfo:
    """Poll the run until it is completed or failed (fails the test after ``timeout_s``)."""
    engine = db.create_engine(settings.database_url, pool_size=1)
    try:
        sessions = db.sessionmaker(engine)
        deadline = time.monotonic() + timeout_s
        while True:
            async with db.transaction(sessions) as session:
                run = await runs.require_run(session, run_id)
            if run.terminal:
                return run
            if time.monotonic() > deadline:
                raise AssertionError(f"run {run_id} still {run.state} after {timeout_s}s")
            await asyncio.sleep(0.1)
    finally:
        await engine.dispose()


async def audit_events(database_url: str, event_type: str) -> list[dict[str, Any]]:
    rows = await fetch(
        database_url,
        "SELECT scope, key_version, success, actor, metadata FROM encryption_audit_log "
        "WHERE event_type = $1 ORDER BY id",
        event_type,
    )
    return [dict(r) for r in rows]
