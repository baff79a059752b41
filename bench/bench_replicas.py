"""Multi-region KEK replication: check duration, and decrypt latency on failover.

Builds a primary and three secondary regions (each a fresh database on the local server, each
secondary with its own local wrapping key) holding ``--scopes`` scopes (default 10,000, one DEK
each, seeded directly), then measures:

- initial replication: ``check(repair=True)`` into empty regions (unwrap at the primary, wrap
  and verify under each region's key, write);
- the check: ``check(repair=False)`` of all regions in sync, cold (a fresh process: every
  primary DEK is unwrapped for its fingerprint) and warm (fingerprints cached, as in the worker
  that runs it hourly), against a ceiling measured in the same run: reading the same rows
  (primary + every region) with nothing else;
- cache-miss decrypt through the primary, and through a secondary while the primary is down
  (the primary marked down: reads go straight to the first secondary), median and p95, as a
  ratio.

    .venv/bin/python -m bench.bench_replicas [--json] [--scopes N] [--misses N]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import time
from typing import Any

import asyncpg
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from bench.common import BENCH_KEY, PG, fresh_database, machine
from keyrotor import KeyManager, Settings
from keyrotor.crypto import envelope
from keyrotor.crypto.envelope import new_dek
from keyrotor.kek.base import WrapContext
from keyrotor.kek.factory import local_keyring
from keyrotor.replication.check import env_prefix

REGIONS = ("eu-west-1", "ap-south-1", "sa-east-1")
REGION_KEYS = {
    "eu-west-1": "bench-eu-wrapping-key-3f9a1c7e5b2d4068a1c3e5f7b9d0e2a4",
    "ap-south-1": "bench-ap-wrapping-key-8c2e4a6b0d1f3e5a7c9b1d3f5e7a9c0b",
    "sa-east-1": "bench-sa-wrapping-key-1d3f5a7c9e0b2d4f6a8c0e1b3d5f7a9c",
}
VALUE = "sk-ant-api03-" + "x" * 95


async def _seed(url: str, n: int) -> list[tuple[str, str]]:
    """``n`` scopes with one active DEK each, and one value per scope: (scope, token)."""
    kek = local_keyring(Settings.from_env({"ENCRYPTION_KEY": BENCH_KEY}))
    scopes, blobs, kek_id, tokens = [], [], kek.kek_id(kek.current), []
    for i in range(n):
        scope = f"tenant-{i:05d}/openai"
        dek = new_dek()
        scopes.append(scope)
        blobs.append(kek.wrap_sync(dek, WrapContext(scope, 1)).blob)
        if i < 2_000:
            tokens.append(
                (
                    scope,
                    envelope.seal(
                        VALUE.encode(), cipher=AESGCM(dek), scope=scope, dek_version=1, context="b"
                    ),
                )
            )
    conn = await asyncpg.connect(url)
    try:
        async with conn.transaction():
            await conn.execute(
                "INSERT INTO key_scopes (name, active_version, latest_version) "
                "SELECT unnest($1::text[]), 1, 1",
                scopes,
            )
            await conn.execute(
                "INSERT INTO data_keys (scope_id, version, state, encrypted_dek, kek_id, kek_version, "
                "activated_at) SELECT k.id, 1, 'active', b.blob, $3, $4, now() "
                "FROM unnest($1::text[], $2::bytea[]) AS b(name, blob) JOIN key_scopes k ON k.name = b.name",
                scopes,
                blobs,
                kek_id,
                kek.current,
            )
    finally:
        await conn.close()
    return tokens


async def _read_floor(urls: list[str]) -> float:
    """Seconds to read the same rows a check reads, with nothing else (the ceiling)."""
    t = time.perf_counter()

    async def one(url: str, sql: str) -> None:
        conn = await asyncpg.connect(url)
        try:
            await conn.fetch(sql)
        finally:
            await conn.close()

    await asyncio.gather(
        one(urls[0], "SELECT k.name, d.* FROM data_keys d JOIN key_scopes k ON k.id = d.scope_id"),
        *(one(u, "SELECT * FROM replica_keys") for u in urls[1:]),
    )
    return time.perf_counter() - t


def _env(primary: str, regions: dict[str, str]) -> dict[str, str]:
    env = {
        "DATABASE_URL": primary,
        "ENCRYPTION_KEY": BENCH_KEY,
        "REDIS_URL": "redis://127.0.0.1:6379/14",
        "KEYROTOR_PRIMARY_REGION": "us-east-1",
        "KEYROTOR_REGIONS": ",".join(f"{r}={u}" for r, u in regions.items()),
        "KEYROTOR_LISTEN_KEY_CHANGES": "false",
        "KEYROTOR_AUDIT": "off",  # measures the key path; bench_audit measures auditing
        "KEYROTOR_FAILOVER_RETRY_SECONDS": "3600",
    }
    for r in regions:
        env[env_prefix(r) + "ENCRYPTION_KEY"] = REGION_KEYS[r]
    return env


async def _misses(km: KeyManager, tokens: list[tuple[str, str]], n: int) -> list[float]:
    out = []
    for scope, token in tokens[:n]:
        km.invalidate(scope)
        t = time.perf_counter()
        await km.decrypt(scope, token, context="b")
        out.append(time.perf_counter() - t)
    return out


def _stats(xs: list[float]) -> dict[str, float]:
    xs = sorted(xs)
    return {
        "median_us": round(statistics.median(xs) * 1e6, 1),
        "p95_us": round(xs[int(len(xs) * 0.95) - 1] * 1e6, 1),
    }


async def run(scopes: int, misses: int) -> dict[str, Any]:
    suffix = os.environ.get("KEYROTOR_BENCH_DB_SUFFIX", "")
    primary = await fresh_database("keyrotor_bench_repl_primary")
    regions = {r: await fresh_database(f"keyrotor_bench_repl_{r.replace('-', '_')}") for r in REGIONS}
    try:
        tokens = await _seed(primary, scopes)
        env = _env(primary, regions)
        settings = Settings.from_env(env)
        async with KeyManager(settings, environ=env) as km:
            rep = km.replication
            assert rep is not None
            t = time.perf_counter()
            first = await rep.check(repair=True, record=False)
            initial_s = time.perf_counter() - t
            assert first.in_sync, first.as_dict()
        async with KeyManager(settings, environ=env) as km:
            rep = km.replication
            assert rep is not None
            t = time.perf_counter()
            cold = await rep.check(repair=False)
            cold_s = time.perf_counter() - t
            warm_runs = []
            for _ in range(3):
                t = time.perf_counter()
                warm = await rep.check(repair=False)
                warm_runs.append(time.perf_counter() - t)
            assert cold.in_sync and warm.in_sync
            floor = min([await _read_floor([primary, *regions.values()]) for _ in range(3)])
            # Cache-miss decrypts: through the primary, then with the primary marked down
            # (what every read meets during an outage once the first one has failed over).
            await _misses(km, tokens, 50)  # warm the pools
            via_primary = _stats(await _misses(km, tokens, misses))
            rep.failover._primary_down_until = time.monotonic() + 3600
            rep.failover.failing_over = True
            via_secondary = _stats(await _misses(km, tokens, misses))
        copies = scopes * len(REGIONS)
        warm_s = min(warm_runs)
        return {
            "machine": machine(),
            "regions": len(REGIONS),
            "scopes": scopes,
            "dek_copies": copies,
            "initial_replication_s": round(initial_s, 2),
            "initial_replication_copies_per_s": round(copies / initial_s),
            "check_cold_s": round(cold_s, 2),
            "check_warm_s": round(warm_s, 2),
            "check_warm_us_per_copy": round(warm_s / copies * 1e6, 1),
            "read_ceiling_s": round(floor, 3),
            "check_warm_over_read_ceiling": round(warm_s / floor, 1),
            "decrypt_miss_primary": via_primary,
            "decrypt_miss_failover": via_secondary,
            "failover_over_primary_median": round(via_secondary["median_us"] / via_primary["median_us"], 2),
            "failover_over_primary_p95": round(via_secondary["p95_us"] / via_primary["p95_us"], 2),
            "db_suffix": suffix,
        }
    finally:
        conn = await asyncpg.connect(f"{PG}/postgres")
        try:
            for url in (primary, *regions.values()):
                await conn.execute(f"DROP DATABASE IF EXISTS {url.rsplit('/', 1)[1]} WITH (FORCE)")
        finally:
            await conn.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", action="store_true")
    parser.add_argument("--scopes", type=int, default=10_000)
    parser.add_argument("--misses", type=int, default=1_000)
    args = parser.parse_args()
    result = asyncio.run(run(args.scopes, args.misses))
    if args.json:
        print(json.dumps(result, indent=2))
        return
    print(f"replication benchmark on {result['machine']}")
    print(f"{result['regions']} regions x {result['scopes']} scopes = {result['dek_copies']} DEK copies")
    print(
        f"initial replication: {result['initial_replication_s']} s "
        f"({result['initial_replication_copies_per_s']} copies/s, wrapped, verified, written)"
    )
    print(
        f"check: cold {result['check_cold_s']} s, warm {result['check_warm_s']} s "
        f"({result['check_warm_us_per_copy']} µs a copy; {result['check_warm_over_read_ceiling']}x "
        f"the {result['read_ceiling_s']} s it takes only to read the rows)"
    )
    p, f = result["decrypt_miss_primary"], result["decrypt_miss_failover"]
    print(
        f"cache-miss decrypt: primary median {p['median_us']} µs (p95 {p['p95_us']}), failover "
        f"median {f['median_us']} µs (p95 {f['p95_us']}): failover/primary = "
        f"{result['failover_over_primary_median']} (median), {result['failover_over_primary_p95']} (p95)"
    )


if __name__ == "__main__":
    main()
