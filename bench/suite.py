"""All the benchmarks in one run: one table of ratios, written to BENCHMARKS.md.

Run it as ``bench/run`` (``bench/run --help``). Every figure is a ratio against a ceiling or a
peer measured in the same run, on the same machine: absolute times on a shared 2-core machine
are noise, ratios much less so. Each benchmark runs in a child process of its own (a fresh
interpreter, a time limit, its servers stopped with it); one that fails shows its error in its
row, the others still run, and the command exits 1.

Sizes: the default run stays under 10 minutes on 2 cores; ``--full`` runs the large sizes
(rotation RSS at 100,000 and 1,000,000 rows, the peer comparison on 100,000 values);
``--smoke`` runs tiny sizes, all benchmarks at once, in seconds (for tests/test_bench_run.py:
its figures mean nothing).
"""

from __future__ import annotations

import argparse
import asyncio
import concurrent.futures
import contextlib
import importlib
import importlib.util
import json
import logging
import os
import platform
import shlex
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
from collections.abc import Awaitable, Callable
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, Literal

ROOT = Path(__file__).resolve().parent.parent
Size = Literal["smoke", "default", "full"]
TIME_LIMIT_S: dict[Size, float] = {"smoke": 120.0, "default": 420.0, "full": 3600.0}


@dataclass
class Row:
    """One line of the table: keyrotor's figure, the reference it is compared with, the ratio."""

    bench: str
    figure: str
    value: float | None = None
    unit: str = ""
    reference: str = ""
    ref_value: float | None = None
    ratio: float | None = None  # value / ref_value unless the bench says otherwise
    target: str = ""  # ">= 0.5" or "<= 1.25", on the ratio
    error: str = ""

    def __post_init__(self) -> None:
        if self.ratio is None and self.value is not None and self.ref_value:
            self.ratio = self.value / self.ref_value

    @property
    def verdict(self) -> str:
        if self.error:
            return "FAILED"
        if not self.target or self.ratio is None:
            return ""
        op, threshold = self.target.split()
        ok = self.ratio >= float(threshold) if op == ">=" else self.ratio <= float(threshold)
        return "ok" if ok else "missed"


# --- the benchmarks, each an adapter from its module's results to rows ------------------------


async def keymanager(size: Size) -> list[Row]:
    from bench import bench_keymanager

    chunk, pairs, rows = {
        "smoke": (200, 2, 200),
        "default": (5_000, 40, 20_000),
        "full": (5_000, 40, 20_000),
    }[size]
    r = await bench_keymanager.measure(chunk, pairs, rows)
    b = "KeyManager vs raw AES-GCM"
    return [
        Row(b, "decrypt, warm cache, audit off (ops/s)", r["km_decrypt"], "/s", "raw AESGCM.decrypt",
            r["raw_decrypt"], 1 / r["decrypt_ratio"], ">= 0.2"),
        Row(b, "encrypt, warm cache, audit off (ops/s)", r["km_encrypt"], "/s", "raw AESGCM.encrypt",
            r["raw_encrypt"], 1 / r["encrypt_ratio"]),
        # Shares are fractions (the "%" unit prints them as percentages), against the 5% goal.
        Row(b, "location record, share of an encrypt to users.api_key:<i> (%)", r["location_cost"], "%",
            "the goal", 0.05, r["location_cost"] / 0.05, "<= 1"),
        Row(b, "usage reservation, share of an encrypt to users.api_key:<i> (%)", r["reservation_cost"],
            "%", "the goal", 0.05, r["reservation_cost"] / 0.05, "<= 1"),
    ]  # fmt: skip


async def audit(size: Size) -> list[Row]:
    from bench import bench_audit

    # bench_audit.py sizes itself with module constants; set them for this run.
    chunk, pairs, writer = {
        "smoke": (300, 2, 300),
        "default": (20_000, 5, 50_000),
        "full": (100_000, 5, 100_000),
    }[size]
    bench_audit.CHUNK, bench_audit.PAIRS, bench_audit.WRITER_ROWS = chunk, pairs, writer
    r = await bench_audit.measure()
    b = "audit log"
    return [
        Row(b, "decrypt, audited async (ops/s, events written)", r["audited_ops_s"], "/s",
            "decrypt, audit off", r["unaudited_ops_s"], r["ratio"], ">= 0.5"),
        Row(b, "audit writer, COPY (rows/s)", r["writer_copy_rows_s"], "/s", "INSERT ... unnest",
            r["writer_insert_rows_s"]),
        *await audit_modes(size),
    ]  # fmt: skip


async def audit_modes(size: Size) -> list[Row]:
    from bench import bench_audit_modes as m

    m.CHUNK, m.PAIRS, m.LATENCY_CALLS, m.WRITER_CHUNK = {
        "smoke": ({1: 20, 8: 80, 64: 256}, 1, 20, 300),
        "default": ({1: 1_000, 8: 4_000, 64: 20_000}, 3, 1_000, 50_000),
        "full": ({1: 2_000, 8: 10_000, 64: 30_000}, 3, 2_000, 100_000),
    }[size]
    r = await m.measure()
    b = "durable audit (default)"
    rows = [
        Row(b, f"decrypt, durable, {c} caller{'s' if c > 1 else ''} (ops/s)", r[f"durable_{c}_ops_s"], "/s",
            f"decrypt, async audit, {c} caller{'s' if c > 1 else ''}", r[f"async_{c}_ops_s"], r[f"ratio_{c}"],
            ">= 0.5" if c == 64 else "")
        for c in m.CALLERS
    ]  # fmt: skip
    rows += [
        Row(b, "decrypt, durable, 1 caller, p50 latency (ms)", r["p50_ms"], "ms", "the goal: 2 ms", 2.0,
            target="<= 1"),
        Row(b, "decrypt, durable, 1 caller, p50 latency (ms)", r["p50_ms"], "ms",
            "a bare one-row INSERT + COMMIT (its WAL flush), p50", r["commit_floor_p50_ms"]),
        # 64 closed-loop callers wait for a commit each: the writer alone, fed the same way,
        # is what the commits themselves allow on this database.
        Row(b, "decrypt, durable, 64 callers (ops/s)", r["durable_64_ops_s"], "/s",
            "the durable writer alone, 64 callers, same events (events/s)", r["durable_writer_alone_64_s"],
            r["durable_64_over_writer_alone"]),
        Row(b, "decrypt, async audit, 1 caller (ops/s)", r["async_1_big_ops_s"], "/s",
            "the COPY writer alone, same events (rows/s)", r["writer_alone_rows_s"], r["async_over_writer"],
            ">= 0.7"),
    ]  # fmt: skip
    return rows


async def rotation(size: Size) -> list[Row]:
    from bench import bench_rotation

    kwargs: dict[str, Any] = {
        "smoke": {
            "rows": 1_500,
            "naive_rows": 100,
            "rss_rows": (300, 1_500),
            "two_workers": False,
            "settle_s": 0,
            "net_rows": 500,
            "wait_rows": 1_500,
            "wait_turns": 1,
        },
        "default": {
            "rows": 50_000,
            "naive_rows": 2_000,
            "rss_rows": (10_000, 50_000),
            "net_rows": 20_000,
            "wait_rows": 100_000,
        },
        "full": {
            "rows": 200_000,
            "naive_rows": 5_000,
            "rss_rows": (100_000, 1_000_000),
            "net_rows": 200_000,
            "wait_rows": 100_000,
        },
    }[size]
    r = await bench_rotation.measure(**kwargs)
    b = f"DEK rotation, {r['rows']:,} rows"
    small, large = r["rss_rows"]
    best = max(r["rotation_1_rows_per_s"], r["rotation_2_rows_per_s"])
    rows = [
        Row(b, "rotation, 1 range stream (rows/s)", r["rotation_1_rows_per_s"], "/s",
            "same code, crypto stubbed out (DB ceiling)", r["ceiling_1_rows_per_s"], target=">= 0.5"),
        Row(b, "rotation, 2 range streams (rows/s)", r["rotation_2_rows_per_s"], "/s",
            "same code, crypto stubbed out (DB ceiling)", r["ceiling_2_rows_per_s"], target=">= 0.5"),
        Row(b, "rotation, best of 1-2 streams (rows/s)", best, "/s",
            "naive row-by-row SELECT + UPDATE, autocommit", r["naive_rows_per_s"], target=">= 20"),
        *(
            Row(b, f"same code, crypto stubbed out, {k} stream(s) (rows/s)", r[f"ceiling_{k}_rows_per_s"],
                "/s", "plain SELECT + UPDATE ... FROM unnest loop, primary key only",
                r[f"plain_{k}_rows_per_s"], target=">= 0.8")
            for k in (1, 2)
        ),
        Row(b, "CPU of the rotating process per row, 1 stream (µs)", r["rotation_1_cpu_us_per_row"], "µs",
            "goal of 5 µs", 5.0, target="<= 1"),
    ]  # fmt: skip
    if "two_workers_rows_per_s" in r:
        rows.append(
            Row(b, "2 `keyrotor worker`s via Redis (rows/s)", r["two_workers_rows_per_s"], "/s",
                "1 `keyrotor worker`", r["one_worker_rows_per_s"], target=">= 1.5")
        )  # fmt: skip
    if "wait_rows" in r:
        rows.append(
            Row(f"DEK rotation, {r['wait_rows']:,} rows", "rotate + wait, 1 `keyrotor worker` (s)",
                r["rotate_wait_seconds"], "s", "one UPDATE of the same rows (ciphertext and version)",
                r["one_update_seconds"], target="<= 2.5")
        )  # fmt: skip
    if "net" in r:
        n = r["net"]
        nb = f"DEK rotation, {n['rows']:,} rows, database {n['rtt_ms']} ms away"
        best_net = max(n["rotation_1_rows_per_s"], n["rotation_2_rows_per_s"])
        best_ceiling = max(n["ceiling_1_rows_per_s"], n["ceiling_2_rows_per_s"])
        rows += [
            Row(nb, "rotation, best of 1-2 streams (rows/s)", best_net, "/s",
                "same code, crypto stubbed out (DB ceiling)", best_ceiling, target=">= 0.5"),
            Row(nb, "rotation, best of 1-2 streams (rows/s)", best_net, "/s",
                "naive row-by-row SELECT + UPDATE, autocommit", n["naive_rows_per_s"], target=">= 20"),
        ]  # fmt: skip
    rows.append(
        Row("DEK rotation, worker memory", f"peak RSS of a worker rotating {large:,} rows (MB)",
            r["worker_peak_rss_mb_large"], "MB", f"rotating {small:,} rows", r["worker_peak_rss_mb_small"],
            target="<= 1.25")
    )  # fmt: skip
    return rows


async def kek(size: Size) -> list[Row]:
    from bench import bench_kek

    n = {"smoke": 20, "default": 1_000, "full": 2_000}[size]
    results = await bench_kek.measure(n)
    # Batching saves round trips only where each call is one (KMS, Vault); the local keyring and
    # Secrets Manager (its KEK material read once) rewrap in memory either way: no target there.
    return [
        Row(f"KEK rewrap: {name}", f"rewrap of {r['deks']:,} DEKs, batched (DEKs/s)", r["batched_deks_per_s"],
            "/s", "one call per DEK", r["one_call_per_dek_deks_per_s"],
            target=">= 1" if name in ("aws-kms", "vault") else "")
        for name, r in results.items()
    ]  # fmt: skip


async def peer(size: Size) -> list[Row]:
    from bench import bench_peer

    n = {"smoke": 1_000, "default": 20_000, "full": 100_000}[size]
    r = await bench_peer.measure(n)
    b = f"re-encryption vs OpenBao, {n:,} values"
    kr, streams = r["keyrotor_best_rows_per_s"], r["keyrotor_best_streams"]
    fig = f"keyrotor rotation, {streams} stream(s) (rows/s)"
    return [
        Row(b, fig, kr, "/s", f"transit rewrap, batch_input 249, {r['rewrap_best_in_flight']} in flight",
            r["rewrap_best_per_s"]),
        Row(b, fig, kr, "/s", f"transit encrypt, batch_input 249, {r['encrypt_best_in_flight']} in flight",
            r["encrypt_best_per_s"]),
        Row(b, fig, kr, "/s", "transit rewrap of a Postgres table (read, rewrap, write back)",
            r["bao_rewrap_through_table_rows_per_s"]),
    ]  # fmt: skip


async def legacy(size: Size) -> list[Row]:
    from bench import bench_legacy

    n = {"smoke": 4, "default": 60, "full": 120}[size]
    r = await bench_legacy.main(n)
    b = f"legacy migration, {n} values"
    scrypt = float(r["scrypt_floor_values_per_s"])  # type: ignore[arg-type]
    return [
        Row(b, "migration, process pool (values/s)", float(r["process_pool_values_per_s"]), "/s",  # type: ignore[arg-type]
            "scrypt alone, one core", scrypt, target=">= 0.9"),
        Row(b, "migration, one at a time (values/s)", float(r["one_at_a_time_values_per_s"]), "/s",  # type: ignore[arg-type]
            "scrypt alone, one core", scrypt, target=">= 0.7"),
    ]  # fmt: skip


async def scheduler(size: Size) -> list[Row]:
    from bench import bench_scheduler

    n = {"smoke": 1_000, "default": 100_000, "full": 100_000}[size]
    r = await bench_scheduler.measure(n, 1.0)
    rt_ms = await _postgres_round_trip_ms()
    b = f"scheduler scan, {n:,} scopes"
    c = r["catch_up"]
    per_run = c["seconds"] * 1e3 / max(1, c["enqueued"])
    return [
        Row(b, f"idle scan, nothing due ({r['idle']['statements']} statements, ms)",
            r["idle"]["seconds_median"] * 1e3, "ms", "one Postgres round trip (SELECT 1)", rt_ms),
        Row(b, f"busy scan, {r['due']:,} due, runs open (ms)", r["busy"]["seconds_median"] * 1e3, "ms",
            "one Postgres round trip (SELECT 1)", rt_ms),
        Row(b, f"catch-up scan, {c['enqueued']:,} runs opened + enqueued (ms a run)", per_run, "ms",
            "one Postgres round trip (SELECT 1)", rt_ms),
    ]  # fmt: skip


async def cache(size: Size) -> list[Row]:
    from bench import bench_cache

    w = {
        "smoke": bench_cache.Workload(tenants=20, requests=1_000, hours=1.0, rotations=2),
        "default": bench_cache.Workload(tenants=1_000, requests=100_000, hours=1.0, rotations=20),
        "full": bench_cache.Workload(tenants=5_000, requests=500_000, hours=2.0, rotations=100),
    }[size]
    r = await bench_cache.measure(w)
    b = "DEK cache, 30-min TTL, mixed workload"
    fig = (
        f"hit rate: {r['requests']:,} requests in {r['hours']:g} h, {r['scopes_used']:,} scopes of "
        f"{r['tenants']:,} tenants (Zipf {r['zipf_s']}), {r['rotations']} rotations"
    )
    hit = r["keyrotor_hit_rate"]
    return [
        Row(b, fig, hit, "%", "seed baseline (given)", r["seed_baseline"], target=">= 1"),
        Row(b, fig, hit, "%", "seed's per-provider cache, same trace",
            r["seed_cache_same_trace_hit_rate"]),
        Row(b, fig, hit, "%", "never-expiring cache, same trace (ceiling)",
            r["ceiling_hit_rate"]),
    ]  # fmt: skip


async def replicas(size: Size) -> list[Row]:
    """bench/bench_replicas.py (multi-region, another engineer's): included when it exists."""
    module: Any = importlib.import_module("bench.bench_replicas")
    if hasattr(module, "suite_rows"):  # an interface made for this table, if it grows one
        produced = module.suite_rows(size)
        produced = await produced if asyncio.iscoroutine(produced) else produced
        return [r if isinstance(r, Row) else Row(**r) for r in produced]
    scopes, misses = {"smoke": (100, 20), "default": (5_000, 500), "full": (10_000, 1_000)}[size]
    r = await module.run(scopes, misses)
    b = f"multi-region, {r['regions']} regions x {r['scopes']:,} scopes"
    p, f = r["decrypt_miss_primary"], r["decrypt_miss_failover"]
    return [
        Row(b, "replica check, all in sync, warm (ms)", r["check_warm_s"] * 1e3, "ms",
            "reading the same rows, nothing else", r["read_ceiling_s"] * 1e3),
        Row(b, "cache-miss decrypt on failover, median (ms)", f["median_us"] / 1e3, "ms",
            "through the primary, median", p["median_us"] / 1e3),
        Row(b, "cache-miss decrypt on failover, p95 (ms)", f["p95_us"] / 1e3, "ms",
            "through the primary, p95", p["p95_us"] / 1e3),
    ]  # fmt: skip


async def _postgres_round_trip_ms() -> float:
    import asyncpg

    from bench.common import PG

    conn = await asyncpg.connect(f"{PG}/postgres")
    try:
        samples = []
        for _ in range(200):
            t = time.perf_counter()
            await conn.fetchval("SELECT 1")
            samples.append(time.perf_counter() - t)
        return statistics.median(samples) * 1e3
    finally:
        await conn.close()


async def http(size: Size) -> list[Row]:
    from bench import bench_http

    r = await bench_http.measure({"smoke": 0.5, "default": 5.0, "full": 10.0}[size])
    # Which generator sent the requests moves every figure (it shares the cores with the
    # servers), so every row of the section names it.
    generator = {"node": "Node load generator", "python": "Python load generator"}[r["loadgen"]]
    kr, bao, b = r["keyrotor"], r["bao"], f"HTTP decrypt vs OpenBao transit ({generator})"
    batch = bench_http.BATCH
    rows = [
        Row(b, "single, 32 clients, durable audit (req/s)", kr["single_32"]["req_s"], "/s",
            "transit decrypt, 32 clients, no audit device", bao["single_32"]["req_s"], target=">= 1.5"),
        Row(b, f"batch of {batch}, 32 clients (values/s)", kr["batch_32"]["req_s"] * batch, "/s",
            f"transit batch_input {batch}, 32 clients, no audit device", bao["batch_32"]["req_s"] * batch,
            target=">= 3"),
        Row(b, "single, 1 client, p50 (ms)", kr["single_1"]["p50_ms"], "ms",
            "transit decrypt, 1 client, p50", bao["single_1"]["p50_ms"], target="<= 1"),
    ]  # fmt: skip
    # The same calls with audit events queued instead of committed before each answer, and with
    # no audit at all (not a configuration to run): which part of a call the goals are missed in.
    for name, how in (("keyrotor_async_audit", "async audit"), ("keyrotor_no_audit", "audit off")):
        if name in r:
            rows += [
                Row(b, f"single, 32 clients, {how} (req/s)", r[name]["single_32"]["req_s"], "/s",
                    "transit decrypt, 32 clients, no audit device", bao["single_32"]["req_s"]),
                Row(b, f"single, 1 client, {how}, p50 (ms)", r[name]["single_1"]["p50_ms"], "ms",
                    "transit decrypt, 1 client, p50", bao["single_1"]["p50_ms"]),
            ]  # fmt: skip
    bare, bare_durable = r["bare"], r["bare_durable"]
    ceiling = "bare aiohttp + one AES-GCM decrypt"
    bare_batch = bare["batch_32"]["req_s"] * batch
    rows += [
        Row(b, "single, 32 clients, durable audit (req/s)", kr["single_32"]["req_s"], "/s",
            f"{ceiling}, 32 clients (ceiling)", bare["single_32"]["req_s"]),
        Row(b, "single, 1 client, p50 (ms)", kr["single_1"]["p50_ms"], "ms",
            f"{ceiling}, 1 client, p50 (floor)", bare["single_1"]["p50_ms"]),
        Row(b, f"{ceiling}, 32 clients (req/s)", bare["single_32"]["req_s"], "/s",
            "transit decrypt, 32 clients, no audit device", bao["single_32"]["req_s"]),
        Row(b, f"{ceiling}, 1 client, p50 (ms)", bare["single_1"]["p50_ms"], "ms",
            "transit decrypt, 1 client, p50", bao["single_1"]["p50_ms"]),
        Row(b, f"batch of {batch}, 32 clients (values/s)", kr["batch_32"]["req_s"] * batch, "/s",
            f"{ceiling} per item, batch of {batch}, 32 clients (ceiling)", bare_batch),
        Row(b, f"{ceiling} per item, batch of {batch}, 32 clients (values/s)", bare_batch, "/s",
            f"transit batch_input {batch}, 32 clients, no audit device", bao["batch_32"]["req_s"] * batch),
        Row(b, f"{ceiling} + INSERT+COMMIT, 32 clients (req/s)", bare_durable["single_32"]["req_s"], "/s",
            f"{ceiling}, 32 clients", bare["single_32"]["req_s"]),
        Row(b, f"{ceiling} + INSERT+COMMIT, 1 client, p50 (ms)", bare_durable["single_1"]["p50_ms"], "ms",
            f"{ceiling}, 1 client, p50", bare["single_1"]["p50_ms"]),
    ]  # fmt: skip
    rows.append(
        Row(b, "the load generator's own CPU, keyrotor single, 32 clients (cores)",
            kr["single_32"]["cpu_cores"], "cores", "the machine's cores", os.cpu_count() or 1)
    )  # fmt: skip
    if "bao_audit" in r:
        audited = r["bao_audit"]
        rows.append(
            Row(b, "single, 32 clients, durable audit (req/s)", kr["single_32"]["req_s"], "/s",
                "transit decrypt, 32 clients, file audit device", audited["single_32"]["req_s"])
        )  # fmt: skip
    return rows


BENCHES: dict[str, Callable[[Size], Awaitable[list[Row]]]] = {
    "keymanager": keymanager,
    "audit": audit,
    "rotation": rotation,
    "kek": kek,
    "peer": peer,
    "legacy": legacy,
    "scheduler": scheduler,
    "cache": cache,
    "http": http,
}
if importlib.util.find_spec("bench.bench_replicas") is not None:
    BENCHES["replicas"] = replicas

SMOKE_ORDER = ["rotation", "legacy", "kek", "peer", "cache", "scheduler", "keymanager", "audit"]

DESCRIPTIONS = {
    "keymanager": "`bench/bench_keymanager.py`: `KeyManager.decrypt`/`encrypt` of a 108-character key with "
    "the DEK cached, in chunks interleaved with raw `AESGCM` calls on the same bytes; the ratio is the "
    "median of the paired chunks' ratios (rates: the best chunk). Target: within 5x of raw. The location "
    "record's share of an encrypt: what the encrypt path does per call once a location is known, minus "
    "the per-DEK count it replaced, over the encrypt's time, in paired chunks (target <= 5%).",
    "audit": "`bench/bench_audit.py`: the same decrypts audited in async mode (each chunk includes "
    "writing its events) vs `KEYROTOR_AUDIT=off`, median of paired chunks (target >= 0.5); the writer "
    "alone, COPY vs `INSERT ... unnest`. Then `bench/bench_audit_modes.py`: durable audited decrypt (the "
    "default: each call returns once its event is committed) vs async, with 1, 8 and 64 concurrent "
    "callers, median of paired chunks (goal at 64: >= 0.5); a lone durable decrypt's p50 latency (goal "
    "<= 2 ms; it is bounded below by the database's WAL flush, `fdatasync`); async audited decrypt vs "
    "the COPY writer alone writing the same events (goal >= 0.7).",
    "rotation": "`bench/bench_rotation.py`: `keyrotor.rotation.dek` in process vs the same code and "
    "statements "
    "with the crypto stubbed out (what the database alone allows; target: within 2x) and vs a naive "
    "row-by-row loop (target 20x); the ceiling vs a plain `SELECT` + `UPDATE ... FROM unnest` loop over a "
    "table with only its primary key (target >= 0.8); `keyrotor worker` subprocesses through Redis, 2 vs "
    "1 (target >= 1.5x); a 100,000-row scope rotated through one worker and waited for as "
    "`keyrotor rotate --wait` does (its interpreter start aside) vs one `UPDATE` rewriting the same rows' "
    "ciphertext and version column, rolled back (target <= 2.5x); peak RSS (`VmHWM`) of "
    "a worker rotating a small and a large scope (flat: target <= 1.25x; `--full`: 100,000 and "
    "1,000,000 rows). Then rotation, ceiling and "
    "naive loop again with the database behind `bench/latency_proxy.py` (0.25 ms added each way; the "
    "row names the measured `SELECT 1` round trip), as a worker on another host than its database "
    "sees it: on loopback a round trip costs ~0.07 ms, so the naive loop is as fast as it can ever be.",
    "kek": "`bench/bench_kek.py`: `provider.rewrap(all DEKs)` vs one `rewrap` call per DEK, per provider "
    "(moto for AWS KMS and Secrets Manager, an OpenBao dev server for Vault, the local keyring).",
    "peer": "`bench/bench_peer.py`: keyrotor's rotation of N rows vs a real OpenBao dev server's transit "
    "`rewrap` and `encrypt` of the same N values with `batch_input` of 249 (best of 1, 2, 4 requests in "
    "flight). Transit's figures touch no database: the caller would still read and store every value, "
    "which the third row does (read a batch from Postgres, rewrap, `UPDATE ... FROM unnest`).",
    "legacy": "`bench/bench_legacy.py`: migration of Node-format values (scrypt N=16384 each) through "
    "`keyrotor.legacy.migration`, process pool and one at a time, vs scrypt derivations alone on one core "
    "(a pool of 2 processes can exceed 1.0).",
    "scheduler": "`bench/bench_scheduler.py`: one scheduler scan over N scopes (1% due), idle, busy and "
    "catch-up, in units of one Postgres round trip measured in the same run.",
    "cache": "`bench/bench_cache.py`: a trace (Zipf-like tenant popularity, 85% decrypt / 15% encrypt, "
    "Poisson arrivals, rotations through the real rotation code and Redis notices) replayed through a "
    "real `KeyManager` whose DEK cache reads a virtual clock; vs the seed's 95% at a 30-minute TTL, the "
    "seed's per-provider cache replayed on the same trace, and a cache that never forgets.",
    "http": "`bench/bench_http.py`: `keyrotor serve` (its own process, durable audit, rate limit off) "
    "`/v1/decrypt` and `/v1/decrypt/batch` vs a real OpenBao dev server's `transit/decrypt` of the same "
    "values (single and `batch_input` of 100), without and with a file audit device, with one load "
    "generator of 1 and 32 closed-loop clients over keep-alive connections (`bench/loadgen.mjs` on Node "
    "when `node` is on PATH, else Python aiohttp; the rows name it, and one row gives its own CPU: on 2 "
    "cores it shares the CPUs with the servers it measures); the same with `KEYROTOR_AUDIT=async`. All "
    "servers run at once and take turns on each figure (3 turns, alternating order, the turn of median "
    "rate kept), so a machine whose load drifts moves every figure alike. The "
    "ceilings, `bench/bare_http.py` in its own process: a bare aiohttp endpoint that reads the same body "
    "and makes one AES-GCM decrypt (a batch: one an item; no token, grant, audit or log), and the same "
    "plus one `INSERT` and `COMMIT` a request (what one durable write costs on this database, without "
    "group commit).",
    "replicas": "`bench/bench_replicas.py`: multi-region replication (its own module's figures).",
}


# --- running -------------------------------------------------------------------------------


@dataclass
class Outcome:
    name: str
    rows: list[Row] = field(default_factory=list)
    seconds: float = 0.0
    error: str = ""


def _error_line(exc: BaseException) -> str:
    text = f"{type(exc).__name__}: {exc}".strip()
    return " ".join(text.split())[:300]


async def _run_one_inline(name: str, size: Size) -> list[Row]:
    return await asyncio.wait_for(BENCHES[name](size), TIME_LIMIT_S[size])


def run_in_process(name: str, size: Size) -> Outcome:
    t = time.perf_counter()
    try:
        rows = asyncio.run(_run_one_inline(name, size))
    except Exception as exc:
        traceback.print_exc()
        return Outcome(name, seconds=time.perf_counter() - t, error=_error_line(exc))
    return Outcome(name, rows, time.perf_counter() - t)


def run_in_child(name: str, size: Size, log_dir: Path) -> Outcome:
    """Run one benchmark in a fresh interpreter (own process group, killed whole on timeout)."""
    result = log_dir / f"{name}.json"
    log = log_dir / f"{name}.log"
    argv = [sys.executable, "-m", "bench.suite", "--child", name, "--size", size, "--result", str(result)]
    t = time.perf_counter()
    with open(log, "wb") as out:
        proc = subprocess.Popen(argv, cwd=ROOT, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
        try:
            code = proc.wait(TIME_LIMIT_S[size] + 60)
        except subprocess.TimeoutExpired:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(proc.pid, signal.SIGKILL)  # the child's group: its servers and workers too
            proc.wait()
            return Outcome(
                name, seconds=time.perf_counter() - t, error=f"timed out after {TIME_LIMIT_S[size]:.0f} s"
            )
    seconds = time.perf_counter() - t
    if result.exists():
        doc = json.loads(result.read_text())
        if doc.get("error"):
            return Outcome(name, seconds=seconds, error=doc["error"])
        return Outcome(name, [Row(**r) for r in doc["rows"]], seconds)
    tail = [line for line in log.read_text(errors="replace").splitlines() if line.strip()][-1:]
    return Outcome(name, seconds=seconds, error=f"exited with code {code}: {' '.join(tail)[:300]}")


def child_main(name: str, size: Size, result: Path) -> int:
    import structlog

    structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(logging.WARNING))
    outcome = run_in_process(name, size)
    doc: dict[str, Any] = {"error": outcome.error, "rows": [asdict(r) for r in outcome.rows]}
    result.write_text(json.dumps(doc))
    return 1 if outcome.error else 0


# --- the machine and the report ------------------------------------------------------------


def _cpu_model() -> str:
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or platform.machine()


async def _service_versions() -> dict[str, str]:
    import asyncpg
    import redis.asyncio as aioredis

    from bench.common import PG

    out: dict[str, str] = {}
    try:
        conn = await asyncpg.connect(f"{PG}/postgres")
        try:
            out["PostgreSQL"] = str(await conn.fetchval("SHOW server_version"))
        finally:
            await conn.close()
    except Exception as exc:
        out["PostgreSQL"] = f"unreachable ({type(exc).__name__})"
    try:
        r: Any = aioredis.from_url("redis://127.0.0.1:6379/14")  # type: ignore[no-untyped-call]
        try:
            out["Redis"] = str((await r.info("server"))["redis_version"])
        finally:
            await r.aclose()
    except Exception as exc:
        out["Redis"] = f"unreachable ({type(exc).__name__})"
    return out


def machine_description() -> dict[str, str]:
    from tests.servers import BAO

    info: dict[str, str] = {
        "CPU": _cpu_model(),
        "cores": str(os.cpu_count()),
        "load average (1/5/15 min) at start": "{:.2f} / {:.2f} / {:.2f}".format(*os.getloadavg()),
        "Python": platform.python_version(),
    }
    info.update(asyncio.run(_service_versions()))
    node = shutil.which("node")
    if node:  # the HTTP benchmark's load generator (bench/loadgen.mjs)
        with contextlib.suppress(OSError, subprocess.SubprocessError):
            info["Node"] = subprocess.run(
                [node, "--version"], capture_output=True, text=True, timeout=10
            ).stdout.strip()
    if BAO:
        with contextlib.suppress(OSError, subprocess.SubprocessError):
            first = subprocess.run([BAO, "version"], capture_output=True, text=True, timeout=10).stdout
            info["OpenBao"] = first.split()[1] if first.split() else "?"
    with contextlib.suppress(OSError, subprocess.SubprocessError):
        head = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True, text=True, timeout=30
        )
        dirty = subprocess.run(
            ["git", "status", "--porcelain"], cwd=ROOT, capture_output=True, text=True, timeout=30
        )
        info["keyrotor commit"] = head.stdout.strip() + (
            " (working tree has changes)" if dirty.stdout.strip() else ""
        )
    info["OS"] = platform.platform()
    return info


def _fmt(value: float | None, unit: str) -> str:
    if value is None:
        return ""
    if unit == "%":
        return f"{value:.2%}"
    if unit == "/s":
        return f"{value:,.0f}/s" if value >= 100 else f"{value:,.1f}/s"
    if unit == "ms":
        return f"{value:,.2f} ms" if value < 100 else f"{value:,.0f} ms"
    if unit == "MB":
        return f"{value:,.1f} MB"
    return f"{value:,.3g} {unit}".strip()


def _ratio(r: Row) -> str:
    if r.ratio is None:
        return ""
    if r.ratio >= 1000:
        return f"{r.ratio:,.0f}x"
    return f"{r.ratio:.3g}x"  # three significant digits: 0.997x is not 1.00x


HEADER = ("benchmark", "keyrotor", "value", "against (same run)", "value", "ratio", "target", "")


def table(outcomes: list[Outcome]) -> list[tuple[str, ...]]:
    lines: list[tuple[str, ...]] = []
    for o in outcomes:
        if o.error:
            lines.append((o.name, "FAILED", "", o.error.replace("|", "/"), "", "", "", "FAILED"))
            continue
        for r in o.rows:
            target = r.target.replace(">=", "≥").replace("<=", "≤") + ("x" if r.target else "")
            lines.append(
                (r.bench, r.figure, _fmt(r.value, r.unit), r.reference, _fmt(r.ref_value, r.unit), _ratio(r),
                 target, r.verdict)
            )  # fmt: skip
    return lines


def markdown_table(lines: list[tuple[str, ...]]) -> str:
    out = ["| " + " | ".join(HEADER) + " |", "|" + "|".join(["---"] * len(HEADER)) + "|"]
    out += ["| " + " | ".join(cell.replace("|", "\\|") for cell in line) + " |" for line in lines]
    return "\n".join(out)


def text_table(lines: list[tuple[str, ...]]) -> str:
    widths = [max(len(row[i]) for row in [HEADER, *lines]) for i in range(len(HEADER))]
    fmt = "  ".join(f"{{:<{w}}}" for w in widths)
    out = [fmt.format(*HEADER), fmt.format(*("-" * w for w in widths))]
    out += [fmt.format(*line) for line in lines]
    return "\n".join(s.rstrip() for s in out)


def load_note(load_start: float, load_end: float) -> list[str]:
    """A warning when other work shared the cores during the run (empty on a quiet machine)."""
    cores = os.cpu_count() or 1
    if max(load_start, load_end) <= cores:
        return []
    return [
        f"**The machine was busy:** the 1-minute load average ({load_start:.1f} at the start, "
        f"{load_end:.1f} at the end) exceeded its {cores} cores, so other work shared the CPUs. The "
        "KeyManager and audit ratios come from interleaved pairs of chunks and resist that; the "
        "others compare measurements taken seconds to minutes apart and carry the noise (a ratio "
        "above 1 against a ceiling means the ceiling's measurement was the more disturbed one).",
        "",
    ]


def report(
    command: str,
    size: Size,
    info: dict[str, str],
    outcomes: list[Outcome],
    wall_s: float,
    loads: tuple[float, float] = (0.0, 0.0),
) -> str:
    lines = table(outcomes)
    failed = [o.name for o in outcomes if o.error]
    parts = [
        "# Benchmarks",
        "",
        f"Generated by `{command}` on {datetime.now(UTC):%Y-%m-%d %H:%M} UTC ({size} sizes, "
        f"{wall_s / 60:.1f} minutes). Do not edit by hand: run the command again.",
        "",
        "Every figure is a ratio against a ceiling or a peer measured in the same run on the same machine "
        "(absolute rates on a shared 2-core machine are noise). `ratio` is keyrotor's value divided by the "
        "reference's (for decrypt/encrypt and the audit, the median of paired chunks' ratios); `target` is "
        "what the issue asked for, on that ratio.",
        "",
        "## Machine",
        "",
        *[f"- {k}: {v}" for k, v in info.items()],
        "",
        *load_note(*loads),
        "## Results",
        "",
        markdown_table(lines),
        "",
        f"Failed: {', '.join(failed)}." if failed else "All benchmarks ran.",
        "",
        "## What each row measures",
        "",
        *[f"- **{o.name}** ({o.seconds:.0f} s): {DESCRIPTIONS.get(o.name, '')}" for o in outcomes],
        "",
        "Each benchmark also runs alone, with more detail: `.venv/bin/python -m bench.bench_<name>` "
        "(`--help` for its sizes).",
        "",
    ]
    return "\n".join(parts)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="bench/run", description="Run keyrotor's benchmarks; print one table and write BENCHMARKS.md."
    )
    sizes = parser.add_mutually_exclusive_group()
    sizes.add_argument(
        "--full", action="store_true", help="the large sizes (RSS at 100k and 1M rows; ~30+ min)"
    )
    sizes.add_argument(
        "--smoke", action="store_true", help="tiny sizes in one process, for the test (seconds)"
    )
    parser.add_argument("--only", default="", help=f"comma-separated subset of: {', '.join(BENCHES)}")
    parser.add_argument("--out", type=Path, default=ROOT / "BENCHMARKS.md", help="where to write the report")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--size", default="default", help=argparse.SUPPRESS)
    parser.add_argument("--result", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        return child_main(args.child, args.size, args.result)

    size: Size = "full" if args.full else "smoke" if args.smoke else "default"
    import structlog

    structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(logging.WARNING))
    names = [n.strip() for n in args.only.split(",") if n.strip()] or list(BENCHES)
    unknown = [n for n in names if n not in BENCHES]
    if unknown:
        parser.error(f"unknown benchmark(s): {', '.join(unknown)} (known: {', '.join(BENCHES)})")
    command = shlex.join(["bench/run", *(argv if argv is not None else sys.argv[1:])])
    if size == "smoke":
        # A smoke run must never drop the databases of a real run going on beside it.
        os.environ.setdefault("KEYROTOR_BENCH_DB_SUFFIX", f"_smoke{os.getpid()}")
    load_start = os.getloadavg()[0]
    info = machine_description()
    print(
        f"{command}: {len(names)} benchmarks, {size} sizes, on {info['cores']} x {info['CPU']}",
        file=sys.stderr,
    )
    t0 = time.perf_counter()
    outcomes: list[Outcome] = []
    with tempfile.TemporaryDirectory(prefix="keyrotor-bench-") as tmp:
        if size == "smoke":
            # Figures of a smoke run mean nothing, so its benchmarks may share the cores: all at
            # once (most of their time is spent waiting for servers, subprocesses and Postgres).
            order = sorted(names, key=lambda n: SMOKE_ORDER.index(n) if n in SMOKE_ORDER else 0)
            with concurrent.futures.ThreadPoolExecutor(len(order)) as pool:
                done = dict(
                    zip(order, pool.map(lambda n: run_in_child(n, size, Path(tmp)), order), strict=True)
                )
            outcomes = [done[n] for n in names]
        else:
            for i, name in enumerate(names, 1):
                print(f"[{i}/{len(names)}] {name} ...", file=sys.stderr, flush=True)
                outcome = run_in_child(name, size, Path(tmp))
                outcomes.append(outcome)
                status = f"FAILED: {outcome.error}" if outcome.error else f"{len(outcome.rows)} rows"
                print(
                    f"[{i}/{len(names)}] {name}: {outcome.seconds:.0f} s, {status}",
                    file=sys.stderr,
                    flush=True,
                )
    wall = time.perf_counter() - t0
    if size == "smoke":
        with contextlib.suppress(Exception):  # best effort: a database left behind is harmless
            asyncio.run(_drop_smoke_databases())
    info["load average (1/5/15 min) at end"] = "{:.2f} / {:.2f} / {:.2f}".format(*os.getloadavg())
    print(text_table(table(outcomes)))
    args.out.write_text(report(command, size, info, outcomes, wall, (load_start, os.getloadavg()[0])))
    print(f"\nwrote {args.out} ({wall / 60:.1f} minutes)", file=sys.stderr)
    return 1 if any(o.error for o in outcomes) else 0


async def _drop_smoke_databases() -> None:
    import asyncpg

    from bench.common import PG

    suffix = os.environ.get("KEYROTOR_BENCH_DB_SUFFIX", "")
    if not suffix.startswith("_smoke"):
        return
    conn = await asyncpg.connect(f"{PG}/postgres")
    try:
        names = await conn.fetch(
            "SELECT datname FROM pg_database WHERE datname LIKE $1", f"keyrotor_bench_%{suffix}"
        )
        for (name,) in names:
            await conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
    finally:
        await conn.close()


if __name__ == "__main__":
    sys.exit(main())
