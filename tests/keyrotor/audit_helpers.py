"""Reading and tampering with the audit log in tests (raw SQL, as an attacker would)."""

from __future__ import annotations

from typing import Any

import asyncpg

from keyrotor import KeyManager
from keyrotor.audit.verify import ChainReport, verify_chain


async def rows(database_url: str, where: str = "true") -> list[dict[str, Any]]:
    conn = await asyncpg.connect(database_url)
    try:
        records = await conn.fetch(f"SELECT * FROM encryption_audit_log WHERE {where} ORDER BY id")
    finally:
        await conn.close()
    return [dict(r) for r in records]


async def tamper(database_url: str, *statements: str) -> None:
    """Run statements with triggers off (the append-only guard), like someone with DB access."""
    conn = await asyncpg.connect(database_url)
    try:
        async with conn.transaction():
            await conn.execute("SET LOCAL session_replication_role = replica")
            for sql in statements:
                await conn.execute(sql)
    finally:
        await conn.close()


async def verify(km: KeyManager, **kwargs: Any) -> ChainReport:
    await km.flush_audit()
    return await verify_chain(km.sessions, **kwargs)
