"""Legacy migration throughput: process pool versus one at a time, against scrypt's own cost.

Figures (legacy values migrated per second, the real ``keyrotor.legacy.migration`` path:
keyset read, scrypt decrypt, seal under the active DEK, verify, compare-and-swap write, cursor):

- **process pool**: scrypt in a ``ProcessPoolExecutor`` of one process a core (the default);
- **one at a time**: scrypt in a single-thread executor (off the event loop, one value at a time);
- **pool decrypt only**: the same pool decrypting the same values with no database: the ceiling;
- **scrypt floor**: N=16384 r=8 p=1 derivations alone, one after another, in this process;
  ``ratio`` = time a value in the migration / scrypt time a value (1.0 would be pure scrypt on
  one core; with k cores the pool can approach 1/k).

Measured on this 2-core machine (quiet; 160 values): process pool 30.7 values/s, one at a time
17.7/s (1.73x); the pool alone, without the database, 30.8/s (the database, sealing, verification
and compare-and-swap cost <1%); scrypt alone 49.6 ms a value (20.2/s), so the pool spends 0.66x
the scrypt floor a value (two cores; two parallel scrypts do not quite double, they share memory
bandwidth) and one at a time 1.14x. Under load from other processes the pool gains nothing.

    .venv/bin/python -m bench.bench_legacy [--values 120] [--json]
"""

from __future__ import annotations

import argparse
import asyncio
import concurrent.futures
import json
import os
import secrets

import asyncpg

from bench.common import BENCH_KEY, bench_settings, fresh_database, machine, timer
from keyrotor import KeyManager
from keyrotor.census import columns
from keyrotor.crypto import legacy_format as legacy
from keyrotor.legacy import migration as legacy_migration


def _chunk(items: list[str]) -> list[str]:
    return [legacy.encrypt(p, BENCH_KEY) for p in items]


def make_values(n: int) -> list[tuple[str, str]]:
    plain = [f"sk-ant-api03-{i:05d}-{secrets.token_urlsafe(60)}" for i in range(n)]
    size = max(1, n // (2 * (os.cpu_count() or 1)))
    with concurrent.futures.ProcessPoolExecutor() as pool:
        values = [
            v for part in pool.map(_chunk, [plain[i : i + size] for i in range(0, n, size)]) for v in part
        ]
    return list(zip(plain, values, strict=True))


def scrypt_floor(k: int = 10) -> float:
    """Seconds a scrypt derivation, alone, one after another."""
    salt = os.urandom(32)
    start = timer()
    for _ in range(k):
        legacy._derive_key(BENCH_KEY.encode(), salt)
    return (timer() - start) / k


async def one_run(url: str, values: list[tuple[str, str]], *, pooled: bool) -> float:
    conn = await asyncpg.connect(url)
    try:
        await conn.execute("DROP TABLE IF EXISTS settings")
        await conn.execute("CREATE TABLE settings (id bigserial PRIMARY KEY, provider text, api_key text)")
        await conn.executemany(
            "INSERT INTO settings (provider, api_key) VALUES ('anthropic', $1)", [(v,) for _, v in values]
        )
        await conn.execute("DELETE FROM managed_columns")
        await conn.execute("DELETE FROM rotations")
    finally:
        await conn.close()
    s = bench_settings(url, listen_key_changes=False, audit_mode="off")
    async with KeyManager(s) as km:
        await columns.register(km.sessions, "settings.api_key", pk="id", scope_column="provider")
        await km.encrypt("anthropic", "warm-up")  # the scope and its DEK exist before timing
        if pooled:
            workers = os.cpu_count() or 1
            executor: concurrent.futures.Executor = legacy_migration.make_executor(workers)
            # Start the processes before timing (spawn imports keyrotor in each).
            list(executor.map(abs, range(workers)))
        else:
            workers = 1
            executor = concurrent.futures.ThreadPoolExecutor(max_workers=1)
        try:
            start = timer()
            report = await legacy_migration.migrate_legacy(
                km, executor=executor, workers=workers, batch_rows=64
            )
            elapsed = timer() - start
        finally:
            executor.shutdown()
    assert report.migrated == len(values) and report.failed == 0, report.as_dict()
    return len(values) / elapsed


async def pool_only(values: list[tuple[str, str]]) -> float:
    """Values decrypted per second by the pool alone (no database): the pool's ceiling."""
    workers = os.cpu_count() or 1
    with legacy_migration.make_executor(workers) as executor:
        list(executor.map(abs, range(workers)))
        start = timer()
        for i in range(0, len(values), 64):
            await legacy_migration.decrypt_batch(
                [v for _, v in values[i : i + 64]], BENCH_KEY, executor, workers
            )
        return len(values) / (timer() - start)


async def main(n: int) -> dict[str, object]:
    url = await fresh_database("keyrotor_bench_legacy")
    values = make_values(n)
    floor = scrypt_floor()
    pooled = await one_run(url, values, pooled=True)
    serial = await one_run(url, values, pooled=False)
    ceiling = await pool_only(values)
    return {
        "machine": machine(),
        "values": n,
        "scrypt_floor_ms": round(floor * 1000, 1),
        "scrypt_floor_values_per_s": round(1 / floor, 1),
        "process_pool_values_per_s": round(pooled, 1),
        "one_at_a_time_values_per_s": round(serial, 1),
        "pool_decrypt_only_values_per_s": round(ceiling, 1),
        "pool_speedup": round(pooled / serial, 2),
        "pool_ratio_to_floor": round((1 / pooled) / floor, 2),
        "one_at_a_time_ratio_to_floor": round((1 / serial) / floor, 2),
    }


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--values", type=int, default=120)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    result = asyncio.run(main(args.values))
    if args.json:
        print(json.dumps(result, indent=2))
    else:
        for key, value in result.items():
            print(f"{key:32} {value}")
