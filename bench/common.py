"""Shared set-up for the benchmarks: a fresh database, settings, timing and reporting."""

from __future__ import annotations

import os
import platform
import time
from collections.abc import Callable

import asyncpg

from keyrotor import Settings
from keyrotor.store import db

PG = os.environ.get("KEYROTOR_BENCH_PG", "postgresql://postgres@127.0.0.1:5432")
BENCH_KEY = "bench-master-key-0f1e2d3c4b5a69788796a5b4c3d2e1f0"


async def fresh_database(name: str) -> str:
    """Drop and recreate ``name`` (plus ``KEYROTOR_BENCH_DB_SUFFIX``), migrate it, and return its URL."""
    # The suffix keeps a smoke run (the test of bench/run) from dropping the database of a
    # benchmark running beside it.
    name += os.environ.get("KEYROTOR_BENCH_DB_SUFFIX", "")
    conn = await asyncpg.connect(f"{PG}/postgres")
    try:
        await conn.execute(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")
        await conn.execute(f"CREATE DATABASE {name}")
    finally:
        await conn.close()
    url = f"{PG}/{name}"
    engine = db.create_engine(url)
    try:
        await db.upgrade(engine)
    finally:
        await engine.dispose()
    return url


def bench_settings(url: str, **overrides: object) -> Settings:
    env = {"DATABASE_URL": url, "ENCRYPTION_KEY": BENCH_KEY, "REDIS_URL": "redis://127.0.0.1:6379/14"}
    return Settings.from_env(env, **overrides)


def best_rate(fn: Callable[[], float], repeats: int = 5) -> float:
    """Run ``fn`` (which returns ops/s) several times; keep the best (least disturbed) figure."""
    return max(fn() for _ in range(repeats))


def machine() -> str:
    cpu = platform.processor() or platform.machine()
    return f"{cpu}, {os.cpu_count()} cores, Python {platform.python_version()}"


def timer() -> float:
    return time.perf_counter()
