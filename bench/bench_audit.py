"""The cost of the audit log: KeyManager decrypts with async auditing vs off, and audit rows/s.

Measured in one run, on one database, so the ratio is what matters (absolute rates on a shared
2-core machine are noise):

1. decrypt ops/s through KeyManager, audited vs ``KEYROTOR_AUDIT=off``, in interleaved pairs of
   chunks; an audited chunk's time includes writing its events (``flush_audit()``), so the
   figure is sustained throughput, not throughput into a growing queue. Target: >= 0.5x.
2. audit rows written per second by the writer alone, COPY vs one ``INSERT ... SELECT FROM
   unnest(...)``, both one round trip a batch (how the writer's method was chosen).

    .venv/bin/python -m bench.bench_audit [--json]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import time
from typing import Any, Literal

from bench.common import bench_settings, fresh_database, machine
from keyrotor import KeyManager
from keyrotor.audit.log import Row, now_us
from keyrotor.audit.writer import AuditWriter
from keyrotor.store import db

API_KEY = "sk-ant-api03-" + "x" * 95
CHUNK = 100_000
PAIRS = 5
WRITER_ROWS = 100_000


async def decrypt_pairs(url: str) -> dict[str, float]:
    # Async mode: this compares the queued writer with no audit (bench_audit_modes.py: durable).
    audited = KeyManager(bench_settings(url, listen_key_changes=False, audit_mode="async"))
    plain = KeyManager(bench_settings(url, listen_key_changes=False, audit_mode="off"))
    async with audited, plain:
        token = await audited.encrypt("anthropic", API_KEY, context="user:42")
        for km in (audited, plain):  # warm the DEK and grant caches
            for _ in range(1_000):
                await km.decrypt("anthropic", token, context="user:42")
        await audited.flush_audit()
        assert audited.audit is not None
        written_before = audited.audit.written

        cpu: dict[bool, float] = {True: 0.0, False: 0.0}

        async def chunk(km: KeyManager) -> float:
            t, c = time.perf_counter(), time.process_time()
            for _ in range(CHUNK):
                await km.decrypt("anthropic", token, context="user:42", actor="svc-api")
            await km.flush_audit()
            cpu[km.audit is not None] += time.process_time() - c
            return time.perf_counter() - t

        pairs = [(await chunk(audited), await chunk(plain)) for _ in range(PAIRS)]
        audited_time = sum(a for a, _ in pairs)
        return {
            "audited_ops_s": CHUNK / min(a for a, _ in pairs),
            "unaudited_ops_s": CHUNK / min(p for _, p in pairs),
            "ratio": statistics.median(p / a for a, p in pairs),
            "rows_written_s": (audited.audit.written - written_before) / audited_time,
            "blocked_calls": audited.audit.blocked,
            "audited_cpu_us": cpu[True] / (CHUNK * PAIRS) * 1e6,
            "unaudited_cpu_us": cpu[False] / (CHUNK * PAIRS) * 1e6,
        }


async def writer_rate(url: str, method: Literal["copy", "insert"]) -> float:
    engine = db.create_engine(url)
    writer = AuditWriter(
        engine, queue_max=WRITER_ROWS, batch_size=1_000, flush_interval_s=0.05, method=method
    )
    now = now_us()
    rows: list[Row] = [
        ("decrypt", "anthropic", 1, True, "svc-api", "10.1.2.3", None, None, f'{{"context":"user:{i}"}}', now)
        for i in range(WRITER_ROWS)
    ]
    await writer.start()
    try:
        t = time.perf_counter()
        for row in rows:
            if not writer.offer(row):
                await writer.put(row)
        await writer.flush()
        return WRITER_ROWS / (time.perf_counter() - t)
    finally:
        await writer.close()
        await engine.dispose()


async def measure() -> dict[str, Any]:
    url = await fresh_database("keyrotor_bench_audit")
    out: dict[str, Any] = await decrypt_pairs(url)
    copy_rates, insert_rates = [], []
    for _ in range(3):  # alternate, keep the best of each
        copy_rates.append(await writer_rate(url, "copy"))
        insert_rates.append(await writer_rate(url, "insert"))
    out["writer_copy_rows_s"] = max(copy_rates)
    out["writer_insert_rows_s"] = max(insert_rates)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    r = asyncio.run(measure())
    out = {
        "machine": machine(),
        "decrypt_unaudited_ops_s": round(r["unaudited_ops_s"]),
        "decrypt_audited_ops_s": round(r["audited_ops_s"]),
        "audited_over_unaudited": round(r["ratio"], 3),
        "target_ratio": 0.5,
        "audit_rows_written_s_during_decrypts": round(r["rows_written_s"]),
        "callers_blocked_on_full_queue": r["blocked_calls"],
        "client_cpu_us_per_decrypt_unaudited": round(r["unaudited_cpu_us"], 2),
        "client_cpu_us_per_decrypt_audited": round(r["audited_cpu_us"], 2),
        "writer_copy_rows_s": round(r["writer_copy_rows_s"]),
        "writer_insert_unnest_rows_s": round(r["writer_insert_rows_s"]),
    }
    if args.json:
        print(json.dumps(out, indent=2))
        return
    print(f"machine: {out['machine']}")
    print(
        f"decrypt  unaudited {out['decrypt_unaudited_ops_s']:>9,}/s   "
        f"audited {out['decrypt_audited_ops_s']:>9,}/s   "
        f"audited/unaudited {out['audited_over_unaudited']}x (median of {PAIRS} pairs; target >= 0.5x)"
    )
    print(
        f"client CPU per decrypt (this process; Postgres not counted): unaudited "
        f"{out['client_cpu_us_per_decrypt_unaudited']} us, "
        f"audited {out['client_cpu_us_per_decrypt_audited']} us"
    )
    print(
        f"audit rows written {out['audit_rows_written_s_during_decrypts']:,}/s while decrypting "
        f"({out['callers_blocked_on_full_queue']} calls waited for queue space)"
    )
    print(
        f"writer alone: COPY (text) {out['writer_copy_rows_s']:,} rows/s, "
        f"INSERT ... unnest {out['writer_insert_unnest_rows_s']:,} rows/s (batches of 1,000)"
    )


if __name__ == "__main__":
    main()
