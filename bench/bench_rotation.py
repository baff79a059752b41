"""DEK rotation throughput on a 200,000-row scope, against ceilings measured in the same run.

Figures (rows re-encrypted per second):

- **rotation**: the real code path (``keyrotor.rotation.dek``: promote, plan id ranges, batched
  ``SELECT ... FOR UPDATE SKIP LOCKED`` + decrypt/encrypt/verify + ``UPDATE ... FROM unnest``
  compare-and-swap, progress counters), one stream in one process;
- **database ceiling**: exactly the same code and statements with the crypto stubbed out
  (values keep their length), so the ratio is what the crypto costs;
- **plain loop**: the second ceiling, :mod:`bench.plain_loop`: the same values in a table with
  only its primary key, rewritten by a plain keyset ``SELECT`` + ``UPDATE ... FROM unnest``
  batch loop (no crypto, no keyrotor); the first ceiling divided by it is what keyrotor's own
  statements cost;
- **CPU per row**: this process's CPU time (``time.process_time``) over a 1-stream rotation,
  per row: the Python a row costs, drivers and event loop included;
- **naive**: row by row, ``SELECT`` + decrypt + encrypt + ``UPDATE`` in autocommit, measured on
  a 5,000-row sample and taken as a rate;
- **over a network**: the same rotation, ceiling and naive loop once more with the database
  behind :mod:`bench.latency_proxy` (``--rtt-ms``, default 0.5 ms: two hosts in one availability
  zone). On loopback a round trip is nearly free, so the naive loop is as fast as it will ever
  be; across a network it pays the round trips batching saves;
- **rotate and wait**: a rotation of a 100,000-row scope through one ``keyrotor worker``,
  requested and waited for through the queue client as ``keyrotor rotate --wait`` does (its
  interpreter start aside), against one ``UPDATE`` rewriting the same rows' ciphertext and
  version column (timed, then rolled back); the median of three turns of each;
- **worker processes**: ``keyrotor worker`` subprocesses rotating through Redis, 1 and 2 at
  once, with the peak RSS (``VmHWM``) of each worker on a 50,000- and a 200,000-row scope:
  re-encryption streams in batches, so memory does not grow with the table.

Targets: rotation within 2x of the database ceiling, and >= 20x the naive loop.

    .venv/bin/python -m bench.bench_rotation [--rows 200000] [--rtt-ms 0.5] [--json]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import statistics
import subprocess
import sys
import time
import types
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import asyncpg
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from bench import plain_loop
from bench.common import bench_settings, fresh_database, machine
from keyrotor import KeyManager
from keyrotor.crypto import envelope
from keyrotor.kek.base import WrapContext, WrappedDek
from keyrotor.rotation import dek as rotation
from keyrotor.rotation import reencrypt
from keyrotor.rotation.context import RotationContext
from keyrotor.settings import Settings

BIN = Path(sys.executable).parent / "keyrotor"
REDIS = "redis://127.0.0.1:6379/14"
NAIVE_ROWS = 5_000
MID_ROWS = 50_000
NET_ROWS = 50_000
RTT_MS = 0.5
WAIT_ROWS = 100_000
WAIT_TURNS = 3
API_KEY = "sk-ant-api03-{:06d}-" + "x" * 87  # 108 characters, like an Anthropic key


async def seed(settings: Settings, scope: str, n: int) -> None:
    async with KeyManager(settings) as km:
        for lo in range(0, n, 10_000):
            await km.put_secrets(
                scope, [(f"k{i:07d}", API_KEY.format(i)) for i in range(lo, min(n, lo + 10_000))]
            )


async def rotate_in_process(settings: Settings, scope: str, streams: int) -> tuple[float, int]:
    """The driver, then the ranges, ``streams`` at a time (as a worker with that many job slots
    runs them). Returns (seconds, rows)."""
    async with KeyManager(settings) as km:
        rc = RotationContext(km.sessions, km.kek, settings)
        t0 = time.perf_counter()
        progress = await rotation.rotate_dek(rc, scope)
        slots = asyncio.Semaphore(streams)

        async def one(r: rotation.RangeJob) -> None:
            async with slots:
                await rotation.reencrypt_range(rc, r.run_id, r.lo, r.hi, target=r.target)

        await asyncio.gather(*(one(r) for r in progress.ranges))
        seconds = time.perf_counter() - t0
        async with km.sessions() as session:
            from keyrotor import runs

            run = await runs.require_run(session, progress.run.id)
    assert run.state == "completed", run
    return seconds, run.rows_done


class _StubResealer:
    """:class:`keyrotor.crypto.envelope.Resealer` without the crypto: the body is carried over,
    only the version changes (values keep their length)."""

    def __init__(self, *, new_version: int, **_: Any) -> None:
        self._prefix = f"kr1:{new_version}:"

    def reseal(self, value: str, context: str) -> str:
        return self._prefix + value.split(":", 2)[2]

    def reseal_all(self, values: list[str], contexts: list[str]) -> list[str]:
        prefix = self._prefix
        return [prefix + value.split(":", 2)[2] for value in values]


def _stub_envelope() -> types.SimpleNamespace:
    """The part of :mod:`keyrotor.crypto.envelope` re-encryption uses, with no crypto."""
    return types.SimpleNamespace(Resealer=_StubResealer)


async def ceiling_in_process(settings: Settings, scope: str, streams: int) -> tuple[float, int]:
    real = vars(reencrypt)["envelope"]
    setattr(reencrypt, "envelope", _stub_envelope())  # noqa: B010 - swapped for the run, then restored
    try:
        return await rotate_in_process(settings, scope, streams)
    finally:
        setattr(reencrypt, "envelope", real)  # noqa: B010


async def naive(settings: Settings, scope: str) -> float:
    """Row by row in autocommit: SELECT, decrypt, encrypt, UPDATE. Returns rows/s."""
    async with KeyManager(settings) as km:
        row = (
            await _fetch(
                settings.database_url, "SELECT id, active_version FROM key_scopes WHERE name = $1", scope
            )
        )[0]
        scope_id, version = row
        keyrow = (
            await _fetch(
                settings.database_url,
                "SELECT encrypted_dek, kek_id, kek_version FROM data_keys "
                "WHERE scope_id = $1 AND version = $2",
                scope_id,
                version,
            )
        )[0]
        dek = await km.kek.unwrap(
            WrappedDek(keyrow[1], keyrow[2], bytes(keyrow[0])), WrapContext(scope, version)
        )
    old = new = AESGCM(dek)  # re-encrypting under the same key costs the same crypto
    conn = await asyncpg.connect(settings.database_url)
    try:
        ids = [
            r[0] for r in await conn.fetch("SELECT id FROM secrets WHERE scope_id = $1 ORDER BY id", scope_id)
        ]
        t0 = time.perf_counter()
        for row_id in ids:
            name, value = await conn.fetchrow("SELECT name, ciphertext FROM secrets WHERE id = $1", row_id)
            context = f"secret:{name}"
            v, raw = envelope.split(value)
            plaintext = envelope.open_raw(raw, cipher=old, scope=scope, dek_version=v, context=context)
            sealed = envelope.seal(plaintext, cipher=new, scope=scope, dek_version=v, context=context)
            await conn.execute(
                "UPDATE secrets SET ciphertext = $2 WHERE id = $1 AND ciphertext = $3", row_id, sealed, value
            )
        return len(ids) / (time.perf_counter() - t0)
    finally:
        await conn.close()


async def _fetch(url: str, sql: str, *args: Any) -> list[asyncpg.Record]:
    conn = await asyncpg.connect(url)
    try:
        return list(await conn.fetch(sql, *args))
    finally:
        await conn.close()


def _peak_rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return float("nan")


async def one_update_seconds(url: str, scope: str) -> float:
    """Seconds of one ``UPDATE`` that rewrites every row of ``scope`` as a rotation does (its
    ciphertext and version column; the body is kept, so values keep their length), rolled back:
    what the database needs to rewrite those rows once, with no reading out and no crypto."""
    conn = await asyncpg.connect(url)
    tx = conn.transaction()
    await tx.start()
    try:
        t0 = time.perf_counter()
        await conn.execute(
            "UPDATE secrets SET ciphertext = 'kr1:' || (dek_version + 1) || ':' || "
            "split_part(ciphertext, ':', 3), dek_version = dek_version + 1 "
            "WHERE scope_id = (SELECT id FROM key_scopes WHERE name = $1)",
            scope,
        )
        return time.perf_counter() - t0
    finally:
        await tx.rollback()
        await conn.close()


async def with_workers(
    settings: Settings, scope: str, n_workers: int, *, settle_s: float = 3.0
) -> tuple[float, int, list[float]]:
    """Rotate through the queue with ``n_workers`` processes. Returns (seconds, rows, peak RSS MB each)."""
    queue = f"bench:{uuid.uuid4().hex[:8]}"
    env = {
        "PATH": os.environ.get("PATH", ""),
        "DATABASE_URL": settings.database_url,
        "REDIS_URL": REDIS,
        "ENCRYPTION_KEY": settings.encryption_key.get_secret_value() if settings.encryption_key else "",
        "KEYROTOR_QUEUE_NAME": queue,
        "KEYROTOR_NOTIFY_CHANNEL": queue + ":keys",
        "KEYROTOR_WORKER_MAX_JOBS": "2",
        "KEYROTOR_LOG_LEVEL": "WARNING",
        "KEYROTOR_AUDIT": "false",
    }
    procs = [
        subprocess.Popen(  # noqa: ASYNC220 - started once, not awaited: they run beside the loop
            [str(BIN), "worker"], env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
        )
        for _ in range(n_workers)
    ]
    try:
        await asyncio.sleep(settle_s)  # let them start (imports, KEK check) before the clock runs
        from keyrotor.queue.client import KeyrotorClient

        async with KeyrotorClient(Settings.from_env(env)) as client:
            t0 = time.perf_counter()
            handle = await client.rotate(scope)
            run = await handle.result(timeout_s=600)
            seconds = time.perf_counter() - t0
        rss = [_peak_rss_mb(p.pid) for p in procs]
        return seconds, run.rows_done, rss
    finally:
        for p in procs:
            p.terminate()
        for p in procs:
            p.wait(30)


@contextlib.asynccontextmanager
async def behind_latency(url: str, rtt_ms: float) -> AsyncIterator[str]:
    """``url`` rewritten to reach the same database through a proxy adding ``rtt_ms`` a round trip."""
    parts = urlsplit(url)
    target = f"{parts.hostname or '127.0.0.1'}:{parts.port or 5432}"
    proc = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "bench.latency_proxy", "--delay-ms", str(rtt_ms / 2), "--target", target,
        stdout=asyncio.subprocess.PIPE,
    )  # fmt: skip
    try:
        assert proc.stdout is not None
        port = int(await asyncio.wait_for(proc.stdout.readline(), 30))
        userinfo, at, _ = parts.netloc.rpartition("@")
        yield urlunsplit(parts._replace(netloc=f"{userinfo}{at}127.0.0.1:{port}"))
    finally:
        proc.kill()
        await proc.wait()


async def round_trip_ms(url: str, n: int = 300) -> float:
    """Median ``SELECT 1`` round trip (ms): what the proxy really adds, thread hand-offs included."""
    conn = await asyncpg.connect(url)
    try:
        times = []
        for _ in range(n):
            t0 = time.perf_counter()
            await conn.fetchval("SELECT 1")
            times.append(time.perf_counter() - t0)
        return sorted(times)[n // 2] * 1000
    finally:
        await conn.close()


async def networked(url: str, rows: int, naive_rows: int, rtt_ms: float) -> dict[str, float]:
    """Rotation (1 and 2 streams), its ceiling and the naive loop with the database ``rtt_ms`` away."""
    direct = bench_settings(url, audit_mode="off", listen_key_changes=False, small_scope_rows=1_000)
    await seed(direct, "net", rows)
    await seed(direct, "net_naive", naive_rows)
    out: dict[str, float] = {"direct_rtt_ms": await round_trip_ms(url)}
    async with behind_latency(url, rtt_ms) as far_url:
        out["rtt_ms"] = await round_trip_ms(far_url)
        far = bench_settings(far_url, audit_mode="off", listen_key_changes=False, small_scope_rows=1_000)
        await _vacuum(url)
        out["naive"] = await naive(far, "net_naive")
        for fn, name in ((rotate_in_process, "rotation"), (ceiling_in_process, "ceiling")):
            for streams in (1, 2):  # the ceiling last: the stub leaves values no DEK opens
                await _vacuum(url)
                secs, done = await fn(far, "net", streams)
                out[f"{name}_{streams}"] = done / secs
    return out


async def _vacuum(url: str, table: str = "secrets") -> None:
    # Each rotation leaves a dead version of every row; autovacuum would clean them up between
    # rotations in real life. Here every measurement starts from the same clean state.
    conn = await asyncpg.connect(url)
    try:
        await conn.execute(f"VACUUM ANALYZE {table}")
    finally:
        await conn.close()


async def plain_rates(url: str, scope: str, batch: int) -> dict[str, float]:
    """The second ceiling (:mod:`bench.plain_loop`) over a copy of ``scope``'s values, 1 and 2 streams."""
    values = [
        r[0]
        for r in await _fetch(
            url,
            "SELECT ciphertext FROM secrets WHERE scope_id = (SELECT id FROM key_scopes WHERE name = $1) "
            "ORDER BY id",
            scope,
        )
    ]
    await plain_loop.load(url, values)
    out: dict[str, float] = {}
    for streams in (1, 2):
        await _vacuum(url, plain_loop.TABLE)
        out[f"plain_{streams}"] = await plain_loop.rate(url, len(values), streams=streams, batch=batch)
    return out


async def timed_rotation(fn: Any, settings: Settings, scope: str, streams: int) -> tuple[float, float]:
    """``fn`` (:func:`rotate_in_process` or :func:`ceiling_in_process`): ``(rows/s, this process's
    CPU per row in microseconds)``: the Python a row costs, drivers and event loop included."""
    cpu0 = time.process_time()
    secs, done = await fn(settings, scope, streams)
    return done / secs, (time.process_time() - cpu0) / done * 1e6


async def measure(
    rows: int = 200_000,
    *,
    naive_rows: int = NAIVE_ROWS,
    rss_rows: tuple[int, int] = (MID_ROWS, 200_000),
    two_workers: bool = True,
    settle_s: float = 3.0,
    net_rows: int = NET_ROWS,
    rtt_ms: float = RTT_MS,
    wait_rows: int = WAIT_ROWS,
    wait_turns: int = WAIT_TURNS,
) -> dict[str, Any]:
    """Rotate a ``rows``-row scope in process (rotation, ceiling), a naive sample, and through
    ``keyrotor worker`` subprocesses on scopes of ``rss_rows`` rows (peak RSS of each); then, with
    ``rtt_ms`` > 0, rotation, ceiling and naive loop on a ``net_rows``-row scope across a network.
    ``wait_rows`` > 0: a rotation of a scope that size through one worker, waited for as
    ``keyrotor rotate --wait`` does, against one ``UPDATE`` of the same rows."""
    url = await fresh_database("keyrotor_bench_rotation")
    settings = bench_settings(url, audit_mode="off", listen_key_changes=False, small_scope_rows=1_000)
    t0 = time.perf_counter()
    await seed(settings, "big", rows)
    rss_scopes = {n: "big" if n == rows else f"rss{n}" for n in rss_rows}
    for n, scope in rss_scopes.items():
        if scope != "big":
            await seed(settings, scope, n)
    await seed(settings, "naive", naive_rows)
    if wait_rows:
        await seed(settings, "wait", wait_rows)
    seeded = time.perf_counter() - t0
    await _vacuum(url)

    naive_rate = await naive(settings, "naive")
    rate: dict[str, float] = {}
    cpu_us: dict[str, float] = {}
    for streams in (1, 2):
        await _vacuum(url)
        rate[f"rotation_{streams}"], cpu_us[f"rotation_{streams}"] = await timed_rotation(
            rotate_in_process, settings, "big", streams
        )
    rss: dict[int, float] = {}
    one_worker: dict[int, float] = {}
    for n, scope in rss_scopes.items():
        await _vacuum(url)
        secs, done, peaks = await with_workers(settings, scope, 1, settle_s=settle_s)
        rss[n] = peaks[0]
        one_worker[n] = done / secs
    wait: dict[str, float] = {}
    if wait_rows:
        # Each a single figure of a second or less, so one sample swings with the machine: the
        # median of ``wait_turns`` turns, the UPDATE and the rotation taking turns.
        updates, waits = [], []
        for _ in range(wait_turns):
            await _vacuum(url)
            updates.append(await one_update_seconds(url, "wait"))
            await _vacuum(url)
            waits.append((await with_workers(settings, "wait", 1, settle_s=settle_s))[0])
        wait["update_s"], wait["rotate_wait_s"] = statistics.median(updates), statistics.median(waits)
    w2_big: tuple[float, int, list[float]] | None = None
    if two_workers:
        await _vacuum(url)
        w2_big = await with_workers(settings, "big", 2, settle_s=settle_s)
    rate.update(await plain_rates(url, "big", settings.reencrypt_batch_rows))
    for streams in (1, 2):  # last: the stub leaves values no DEK opens
        await _vacuum(url)
        rate[f"ceiling_{streams}"], cpu_us[f"ceiling_{streams}"] = await timed_rotation(
            ceiling_in_process, settings, "big", streams
        )
    small, large = rss_rows
    out: dict[str, Any] = {
        "machine": machine(),
        "load_average": os.getloadavg()[0],
        "rows": rows,
        "seed_seconds": round(seeded, 1),
        "naive_rows_per_s": round(naive_rate),
        **{f"{k}_rows_per_s": round(v) for k, v in rate.items()},
        "rotation_vs_ceiling_1": round(rate["rotation_1"] / rate["ceiling_1"], 2),
        "rotation_vs_ceiling_2": round(rate["rotation_2"] / rate["ceiling_2"], 2),
        "ceiling_vs_plain_1": round(rate["ceiling_1"] / rate["plain_1"], 2),
        "ceiling_vs_plain_2": round(rate["ceiling_2"] / rate["plain_2"], 2),
        **{f"{k}_cpu_us_per_row": round(v, 1) for k, v in cpu_us.items()},
        "rotation_vs_naive_1": round(rate["rotation_1"] / naive_rate, 1),
        "rotation_vs_naive_2": round(rate["rotation_2"] / naive_rate, 1),
        "rss_rows": [small, large],
        "one_worker_rows_per_s": round(one_worker[large]),
        "worker_peak_rss_mb_small": round(rss[small], 1),
        "worker_peak_rss_mb_large": round(rss[large], 1),
    }
    if wait:
        out["wait_rows"] = wait_rows
        out["rotate_wait_seconds"] = round(wait["rotate_wait_s"], 3)
        out["one_update_seconds"] = round(wait["update_s"], 3)
    if w2_big is not None:
        out["two_workers_rows_per_s"] = round(w2_big[1] / w2_big[0])
        out["two_workers_peak_rss_mb"] = [round(x, 1) for x in w2_big[2]]
    if rtt_ms > 0:
        net = await networked(url, net_rows, naive_rows, rtt_ms)
        best, ceiling = max(net["rotation_1"], net["rotation_2"]), max(net["ceiling_1"], net["ceiling_2"])
        out["net"] = {
            "rtt_ms_asked": rtt_ms,
            "rtt_ms": round(net.pop("rtt_ms"), 2),
            "direct_rtt_ms": round(net.pop("direct_rtt_ms"), 3),
            "rows": net_rows,
            **{f"{k}_rows_per_s": round(v) for k, v in net.items()},
            "rotation_vs_ceiling": round(best / ceiling, 2),
            "rotation_vs_naive": round(best / net["naive"], 1),
        }
    return out


def report(r: dict[str, Any]) -> None:
    print(f"machine: {r['machine']} (load average {r['load_average']:.2f})")
    print(f"scope of {r['rows']:,} rows (seeded in {r['seed_seconds']} s); rows re-encrypted per second:")
    print(f"  naive row by row (5k sample, autocommit) : {r['naive_rows_per_s']:>8,}")
    for streams in (1, 2):
        print(
            f"  rotation, {streams} range stream(s) in-process : {r[f'rotation_{streams}_rows_per_s']:>8,}"
            f"   database ceiling (no crypto): {r[f'ceiling_{streams}_rows_per_s']:>8,}"
            f"   -> {r[f'rotation_vs_ceiling_{streams}']:.2f} of ceiling, "
            f"{r[f'rotation_vs_naive_{streams}']:.1f}x naive"
        )
    for streams in (1, 2):
        print(
            f"  plain UPDATE ... FROM unnest loop, {streams} stream(s): "
            f"{r[f'plain_{streams}_rows_per_s']:>8,}"
            f"   -> ceiling at {r[f'ceiling_vs_plain_{streams}']:.2f} of it"
        )
    print(
        f"  CPU of this process per row, 1 stream: {r['rotation_1_cpu_us_per_row']} us "
        f"(crypto stubbed out: {r['ceiling_1_cpu_us_per_row']} us)"
    )
    best_c = max(r["rotation_vs_ceiling_1"], r["rotation_vs_ceiling_2"])
    best_n = max(r["rotation_vs_naive_1"], r["rotation_vs_naive_2"])
    print(f"  target: within 2x of the ceiling (>= 0.50): {'ok' if best_c >= 0.5 else 'MISSED'}; ", end="")
    print(f">= 20x naive: {'ok' if best_n >= 20 else 'MISSED'}")
    print(f"  1 `keyrotor worker` via Redis            : {r['one_worker_rows_per_s']:>8,}")
    if "wait_rows" in r:
        print(
            f"  rotate + wait of {r['wait_rows']:,} rows, 1 worker: {r['rotate_wait_seconds']} s; "
            f"one UPDATE of the same rows: {r['one_update_seconds']} s"
        )
    if "two_workers_rows_per_s" in r:
        print(f"  2 `keyrotor worker`s via Redis           : {r['two_workers_rows_per_s']:>8,}")
    small, large = r["rss_rows"]
    print(
        f"worker peak RSS: {r['worker_peak_rss_mb_small']} MB ({small:,}-row scope), "
        f"{r['worker_peak_rss_mb_large']} MB ({large:,}-row scope); "
        f"two workers: {r.get('two_workers_peak_rss_mb', '-')} MB"
    )
    if "net" in r:
        n = r["net"]
        print(
            f"database behind bench.latency_proxy: SELECT 1 takes {n['rtt_ms']} ms "
            f"(direct: {n['direct_rtt_ms']} ms); a {n['rows']:,}-row scope:"
        )
        print(
            f"  naive {n['naive_rows_per_s']:,}/s; rotation {n['rotation_1_rows_per_s']:,}/s (1 stream), "
            f"{n['rotation_2_rows_per_s']:,}/s (2); ceiling {n['ceiling_1_rows_per_s']:,}/s (1), "
            f"{n['ceiling_2_rows_per_s']:,}/s (2) -> {n['rotation_vs_ceiling']:.2f} of ceiling, "
            f"{n['rotation_vs_naive']:.1f}x naive"
        )


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=200_000)
    parser.add_argument(
        "--rss-rows",
        type=int,
        default=MID_ROWS,
        help="the smaller scope of the RSS pair (the larger: --rows)",
    )
    parser.add_argument(
        "--rtt-ms", type=float, default=RTT_MS, help="round trip of the networked run (0: skip it)"
    )
    parser.add_argument("--net-rows", type=int, default=NET_ROWS, help="rows of the networked run's scope")
    parser.add_argument(
        "--wait-rows", type=int, default=WAIT_ROWS, help="rows of the rotate-and-wait scope (0: skip it)"
    )
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    import logging

    import structlog

    structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(logging.WARNING))
    result = asyncio.run(
        measure(
            args.rows,
            rss_rows=(args.rss_rows, args.rows),
            net_rows=args.net_rows,
            rtt_ms=args.rtt_ms,
            wait_rows=args.wait_rows,
        )
    )
    if args.json:
        print(json.dumps(result, indent=2))
    else:
        report(result)
