"""KEK providers: rewrap throughput (batched vs one call per DEK) and cache-miss decrypt latency.

Starts its own moto (KMS, Secrets Manager) and OpenBao dev servers on loopback (the helpers of
tests/servers.py) and a fresh Postgres database; Redis is not needed.

- rewrap: ``provider.rewrap(all DEKs)`` (transit: ``batch_input`` chunks of 249; KMS: has no
  batch API, so ``ReEncrypt`` with 8 requests in flight; local and aws-sm: in process) against
  ``provider.rewrap([one])`` awaited DEK by DEK.
- cache-miss decrypt: ``KeyManager.decrypt`` right after ``invalidate()``: read the DEK row,
  unwrap it at the provider, open the value. Median and p95.

    .venv/bin/python -m bench.bench_kek [--json] [--deks N]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import statistics
import tempfile
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

from bench.common import bench_settings, fresh_database, machine
from keyrotor import KeyManager
from keyrotor.kek.base import KekProvider, WrapContext, WrappedDek
from keyrotor.kek.local import LocalKeyring
from keyrotor.kek.remote import open_remote_provider
from tests.servers import ServerProcess, aws_env, create_kek_secret, create_kms_key, launch, vault_env

API_KEY = "sk-ant-api03-" + "x" * 95
MISSES = 60


async def _items(kek: KekProvider, n: int) -> list[tuple[WrappedDek, WrapContext]]:
    limit = asyncio.Semaphore(16)

    async def one(i: int) -> tuple[WrappedDek, WrapContext]:
        ctx = WrapContext(f"bench-{i % 50}", 1 + i // 50)
        async with limit:
            return await kek.wrap(os.urandom(32), ctx), ctx

    return list(await asyncio.gather(*(one(i) for i in range(n))))


async def _timed(fn: Callable[[], Awaitable[Any]]) -> float:
    t = time.perf_counter()
    await fn()
    return time.perf_counter() - t


async def rewrap_rates(kek: KekProvider, n: int, n_single: int) -> dict[str, float]:
    items = await _items(kek, n)
    await kek.rewrap(items[:5])  # warm connections and caches
    batched = await _timed(lambda: kek.rewrap(items))
    singles = items[:n_single]

    async def one_by_one() -> None:
        for item in singles:
            await kek.rewrap([item])

    single = await _timed(one_by_one)
    return {
        "batched_deks_per_s": n / batched,
        "one_call_per_dek_deks_per_s": len(singles) / single,
        "speedup": (n / batched) / (len(singles) / single),
    }


async def miss_latency(kek: KekProvider, url: str) -> dict[str, float]:
    settings = bench_settings(url, audit_mode="off", listen_key_changes=False)
    async with KeyManager(settings, kek=kek) as km:
        scope = f"bench-{kek.name}"
        token = await km.encrypt(scope, API_KEY, context="user:42")
        samples: list[float] = []
        unwraps: list[float] = []
        record = None
        for _ in range(MISSES):
            km.invalidate()
            t = time.perf_counter()
            assert await km.decrypt(scope, token, context="user:42") == API_KEY
            samples.append(time.perf_counter() - t)
        async with km.sessions() as session:
            from keyrotor.store import repo

            record = await repo.get_key(session, scope, 1)
        assert record is not None and record.wrapped is not None
        for _ in range(MISSES):
            t = time.perf_counter()
            await kek.unwrap(record.wrapped, WrapContext(scope, 1))
            unwraps.append(time.perf_counter() - t)
    samples.sort()
    unwraps.sort()
    return {
        "decrypt_miss_median_ms": statistics.median(samples) * 1e3,
        "decrypt_miss_p95_ms": samples[int(len(samples) * 0.95) - 1] * 1e3,
        "unwrap_only_median_ms": statistics.median(unwraps) * 1e3,
    }


async def measure(n: int) -> dict[str, Any]:
    results: dict[str, Any] = {}
    with tempfile.TemporaryDirectory() as tmp:
        servers: list[ServerProcess] = []
        try:
            moto = launch("moto", Path(tmp))
            servers.append(moto)
            bao_dir = Path(tmp) / "bao"
            bao_dir.mkdir()
            bao = launch("bao", bao_dir)
            servers.append(bao)
            providers: list[tuple[str, Callable[[], Awaitable[KekProvider]]]] = [
                ("local", _local),
                (
                    "aws-kms",
                    lambda: open_remote_provider("aws", aws_env(moto, AWS_KMS_KEY_ID=create_kms_key(moto))),
                ),
                (
                    "aws-sm",
                    lambda: open_remote_provider("aws", aws_env(moto, AWS_SECRET_ID=create_kek_secret(moto))),
                ),
                ("vault", lambda: open_remote_provider("vault", vault_env(bao))),
            ]
            for name, opener in providers:
                # A database of its own: its audit key is wrapped by the provider that first
                # opens it, and a KeyManager refuses a database whose keys another provider holds.
                url = await fresh_database(f"keyrotor_bench_kek_{name.replace('-', '_')}")
                kek = await opener()
                try:
                    count = n if name != "aws-kms" else min(n, 1000)
                    single = min(count, 300)
                    results[name] = {
                        "deks": count,
                        **await rewrap_rates(kek, count, single),
                        **await miss_latency(kek, url),
                    }
                finally:
                    await kek.aclose()
        finally:
            for server in servers:
                server.stop()
    return results


async def _local() -> KekProvider:
    from bench.common import BENCH_KEY

    return LocalKeyring.from_keys({1: BENCH_KEY}, current=1)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--json", action="store_true")
    parser.add_argument("--deks", type=int, default=2000, help="DEKs rewrapped per provider")
    args = parser.parse_args()
    results = asyncio.run(measure(args.deks))
    if args.json:
        print(json.dumps({"machine": machine(), "results": results}, indent=2))
        return
    print(f"KEK providers on {machine()} (moto and OpenBao dev servers on loopback)")
    print(
        f"{'provider':<9} {'DEKs':>6} {'rewrap batched/s':>17} {'one-per-DEK/s':>14} {'speedup':>8} "
        f"{'miss median ms':>15} {'miss p95 ms':>12} {'unwrap ms':>10}"
    )
    for name, r in results.items():
        print(
            f"{name:<9} {r['deks']:>6} {r['batched_deks_per_s']:>17,.0f} "
            f"{r['one_call_per_dek_deks_per_s']:>14,.0f} "
            f"{r['speedup']:>7.1f}x {r['decrypt_miss_median_ms']:>15.2f} {r['decrypt_miss_p95_ms']:>12.2f} "
            f"{r['unwrap_only_median_ms']:>10.2f}"
        )


if __name__ == "__main__":
    main()
