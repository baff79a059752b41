"""Durable vs async audit: decrypts with 1, 8 and 64 concurrent callers, and the COPY writer alone.

Measured in one run, on one database, in interleaved pairs of chunks (the ratio is the median
of the pairs' ratios; rates are the best chunk's):

1. audited decrypt ops/s through KeyManager, ``KEYROTOR_AUDIT=durable`` (each call returns once
   its event is committed; group commit) vs ``async`` (returns once queued; a chunk's time
   includes writing its events, ``flush_audit()``), with C callers (asyncio tasks) at once.
   Goal at 64 callers: durable >= 0.5x async.
2. the latency of a lone durable decrypt, p50 and p99. Goal: p50 <= 2 ms. Its floor is one
   commit's WAL flush (fsync), measured beside it as a bare one-row ``INSERT`` that commits.
3. durable decrypt with 64 callers vs the durable writer alone (64 tasks putting the same
   events, no KeyManager, no crypto): what a commit of such batches allows on this database.
4. async audited decrypt (one caller) vs the COPY writer alone writing the same events (no
   KeyManager, no crypto): what auditing through KeyManager keeps of the raw write rate.
   Goal: >= 0.7x.

    .venv/bin/python -m bench.bench_audit_modes [--json]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import time
from typing import Any

import asyncpg

from bench.common import bench_settings, fresh_database, machine
from keyrotor import KeyManager
from keyrotor.audit.durable import DurableAuditWriter
from keyrotor.audit.log import Row, now_us
from keyrotor.audit.writer import AuditWriter
from keyrotor.store import db

API_KEY = "sk-ant-api03-" + "x" * 95
CALLERS = (1, 8, 64)
# Calls per chunk, by the number of callers (a lone durable caller does one commit per call).
CHUNK = {1: 2_000, 8: 10_000, 64: 30_000}
PAIRS = 3
LATENCY_CALLS = 2_000
WRITER_CHUNK = 100_000  # async decrypts vs writer-alone rows, per chunk


async def _decrypts(km: KeyManager, token: str, callers: int, calls: int) -> float:
    """Ops/s of ``calls`` decrypts by ``callers`` tasks, their events written."""
    per = max(1, calls // callers)

    async def caller() -> None:
        for _ in range(per):
            await km.decrypt("anthropic", token, context="user:42", actor="svc-api")

    t = time.perf_counter()
    await asyncio.gather(*(caller() for _ in range(callers)))
    await km.flush_audit()
    return per * callers / (time.perf_counter() - t)


async def _latency(km: KeyManager, token: str) -> list[float]:
    out = []
    for _ in range(LATENCY_CALLS):
        t = time.perf_counter()
        await km.decrypt("anthropic", token, context="user:42", actor="svc-api")
        out.append(time.perf_counter() - t)
    return sorted(out)


async def _commit_floor(url: str, n: int) -> float:
    """p50 seconds of a one-row INSERT that commits: a round trip and a WAL flush (fsync)."""
    conn = await asyncpg.connect(url)
    try:
        await conn.execute("CREATE TABLE IF NOT EXISTS bench_commit_probe (a int)")
        times = []
        for _ in range(n):
            t = time.perf_counter()
            await conn.execute("INSERT INTO bench_commit_probe VALUES (1)")
            times.append(time.perf_counter() - t)
        await conn.execute("DROP TABLE bench_commit_probe")
    finally:
        await conn.close()
    return sorted(times)[n // 2]


async def _durable_writer_alone(url: str, callers: int, calls: int) -> float:
    """Events/s of the durable writer alone: ``callers`` tasks putting decrypt events, no crypto."""
    engine = db.create_engine(url)
    writer = DurableAuditWriter(engine, batch_size=1_000)
    row: Row = (
        "decrypt",
        "anthropic",
        1,
        True,
        "svc-api",
        None,
        None,
        None,
        '{"context":"user:42"}',
        now_us(),
    )
    per = max(1, calls // callers)

    async def caller() -> None:
        for _ in range(per):
            await writer.put(row)

    await writer.start()
    try:
        t = time.perf_counter()
        await asyncio.gather(*(caller() for _ in range(callers)))
        return per * callers / (time.perf_counter() - t)
    finally:
        await writer.close()
        await engine.dispose()


async def _writer_alone(url: str, n: int) -> float:
    """Rows/s of the async COPY writer writing ``n`` decrypt events (as KeyManager builds them)."""
    engine = db.create_engine(url)
    writer = AuditWriter(engine, queue_max=10_000, batch_size=1_000, flush_interval_s=0.5)
    now = now_us()
    row: Row = ("decrypt", "anthropic", 1, True, "svc-api", None, None, None, '{"context":"user:42"}', now)
    await writer.start()
    try:
        t = time.perf_counter()
        for _ in range(n):
            if not writer.offer(row):
                await writer.put(row)
        await writer.flush()
        return n / (time.perf_counter() - t)
    finally:
        await writer.close()
        await engine.dispose()


async def measure() -> dict[str, Any]:
    url = await fresh_database("keyrotor_bench_audit_modes")
    durable = KeyManager(bench_settings(url, listen_key_changes=False, audit_mode="durable"))
    queued = KeyManager(bench_settings(url, listen_key_changes=False, audit_mode="async"))
    out: dict[str, Any] = {}
    async with durable, queued:
        token = await durable.encrypt("anthropic", API_KEY, context="user:42")
        for km in (durable, queued):  # warm the DEK and grant caches, and the writers' connections
            await _decrypts(km, token, 8, 2_000)
        writer = durable.audit
        assert isinstance(writer, DurableAuditWriter)
        for callers in CALLERS:
            pairs = []
            commits, written = writer.commits, writer.written
            for _ in range(PAIRS):
                pairs.append(
                    (
                        await _decrypts(durable, token, callers, CHUNK[callers]),
                        await _decrypts(queued, token, callers, CHUNK[callers]),
                    )
                )
            out[f"durable_{callers}_ops_s"] = max(d for d, _ in pairs)
            out[f"async_{callers}_ops_s"] = max(a for _, a in pairs)
            out[f"ratio_{callers}"] = statistics.median(d / a for d, a in pairs)
            out[f"events_per_commit_{callers}"] = (writer.written - written) / max(
                1, writer.commits - commits
            )
        alone = []
        for _ in range(PAIRS):  # the same 64 callers' events, written durably with no crypto
            alone.append(
                (
                    await _decrypts(durable, token, 64, CHUNK[64]),
                    await _durable_writer_alone(url, 64, CHUNK[64]),
                )
            )
        out["durable_writer_alone_64_s"] = max(w for _, w in alone)
        out["durable_64_over_writer_alone"] = statistics.median(d / w for d, w in alone)
        floor = await _commit_floor(url, LATENCY_CALLS // 2)
        lat = await _latency(durable, token)
        out["p50_ms"] = lat[len(lat) // 2] * 1e3
        out["p99_ms"] = lat[int(len(lat) * 0.99)] * 1e3
        out["commit_floor_p50_ms"] = (floor + await _commit_floor(url, LATENCY_CALLS // 2)) / 2 * 1e3
        copy_pairs = []
        for _ in range(PAIRS):
            copy_pairs.append(
                (await _decrypts(queued, token, 1, WRITER_CHUNK), await _writer_alone(url, WRITER_CHUNK))
            )
        out["async_1_big_ops_s"] = max(a for a, _ in copy_pairs)
        out["writer_alone_rows_s"] = max(w for _, w in copy_pairs)
        out["async_over_writer"] = statistics.median(a / w for a, w in copy_pairs)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    r = asyncio.run(measure())
    if args.json:
        print(json.dumps({"machine": machine(), **r}, indent=2))
        return
    print(f"machine: {machine()}")
    for c in CALLERS:
        print(
            f"{c:>2} callers: durable {r[f'durable_{c}_ops_s']:>9,.0f}/s  "
            f"async {r[f'async_{c}_ops_s']:>9,.0f}/s  "
            f"durable/async {r[f'ratio_{c}']:.3f}x  ({r[f'events_per_commit_{c}']:.1f} events a commit)"
        )
    print(
        f"lone durable decrypt: p50 {r['p50_ms']:.3f} ms, p99 {r['p99_ms']:.3f} ms (goal p50 <= 2 ms); "
        f"a bare one-row INSERT + COMMIT (WAL flush) on the same database: "
        f"p50 {r['commit_floor_p50_ms']:.3f} ms"
    )
    print(
        f"durable writer alone, 64 callers: {r['durable_writer_alone_64_s']:,.0f} events/s; durable decrypt "
        f"reaches {r['durable_64_over_writer_alone']:.3f}x of it"
    )
    print(
        f"async decrypt {r['async_1_big_ops_s']:,.0f}/s vs COPY writer alone {r['writer_alone_rows_s']:,.0f} "
        f"rows/s: {r['async_over_writer']:.3f}x (goal >= 0.7x)"
    )


if __name__ == "__main__":
    main()
