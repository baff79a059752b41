"""Legacy (old Node backend) values for tests: generated once per session in a process pool."""

from __future__ import annotations

import concurrent.futures
import functools
import json
import secrets
from pathlib import Path
from typing import Any

import asyncpg

from keyrotor.crypto import legacy_format as legacy
from tests.conftest import MASTER_KEY

VECTORS = Path(__file__).resolve().parents[2] / "shared" / "vectors" / "legacy-node.jsonl"
VECTOR_KEY = "shared-master-key-2025-10-27"
PROVIDERS = ("anthropic", "openai")


def _plaintext(provider: str, i: int) -> str:
    if provider == "anthropic":
        return f"sk-ant-api03-{i:05d}-{secrets.token_urlsafe(60)}"
    return f"sk-proj-{i:05d}-{secrets.token_urlsafe(40)}"


def _encrypt_chunk(items: list[tuple[str, str]]) -> list[str]:
    return [legacy.encrypt(p, MASTER_KEY) for _prov, p in items]


@functools.cache
def legacy_rows(n: int = 200) -> list[tuple[str, str, str]]:
    """``n`` rows ``(provider, plaintext, legacy value)`` under the tests' MASTER_KEY (cached)."""
    items = [(PROVIDERS[i % 2], _plaintext(PROVIDERS[i % 2], i)) for i in range(n)]
    chunks = [items[i : i + 25] for i in range(0, n, 25)]
    with concurrent.futures.ProcessPoolExecutor(max_workers=2) as pool:
        values = [v for part in pool.map(_encrypt_chunk, chunks) for v in part]
    return [(p, t, v) for (p, t), v in zip(items, values, strict=True)]


def vectors() -> list[dict[str, Any]]:
    """The Node vectors (skipped by callers when the shared folder is absent)."""
    return [json.loads(line) for line in VECTORS.read_text().splitlines() if line.strip()]


async def store_legacy_secret(database_url: str, scope: str, name: str, value: str) -> None:
    """Put a legacy ``value`` in keyrotor's ``secrets`` as secret ``name`` of ``scope`` (which must
    exist), as the old backend's rows were imported: a legacy value opens only through its row."""
    conn = await asyncpg.connect(database_url)
    try:
        await conn.execute(
            "INSERT INTO secrets (scope_id, name, ciphertext, dek_version) "
            "SELECT id, $2, $3, 0 FROM key_scopes WHERE name = $1 "
            "ON CONFLICT (scope_id, name) DO UPDATE SET ciphertext = EXCLUDED.ciphertext",
            scope,
            name,
            value,
        )
    finally:
        await conn.close()
