"""``encryption_grants``: which actor may encrypt or decrypt in which scope patterns.

Rows come back as ``(actor, scope_pattern, can_encrypt, can_decrypt, created_at, updated_at)``.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncSession

TABLE = "encryption_grants"
_COLUMNS = "actor, scope_pattern, can_encrypt, can_decrypt, created_at, updated_at"


async def all_grants(session: AsyncSession) -> Sequence[Sequence[Any]]:
    """Every grant, ordered by actor then pattern."""
    return (
        await session.execute(text(f"SELECT {_COLUMNS} FROM {TABLE} ORDER BY actor, scope_pattern"))
    ).all()


async def grant_for_update(session: AsyncSession, actor: str, pattern: str) -> Sequence[Any] | None:
    """The grant of exactly ``actor`` on ``pattern``, locked; or None."""
    stmt = text(f"SELECT {_COLUMNS} FROM {TABLE} WHERE actor = :a AND scope_pattern = :p FOR UPDATE")
    return (await session.execute(stmt, {"a": actor, "p": pattern})).first()


async def add_permissions(
    session: AsyncSession, actor: str, pattern: str, *, encrypt: bool, decrypt: bool
) -> Sequence[Any]:
    """Create the grant, or add the permissions to the one there; the grant as it is now."""
    stmt = text(
        f"INSERT INTO {TABLE} AS g (actor, scope_pattern, can_encrypt, can_decrypt) "
        "VALUES (:a, :p, :e, :d) ON CONFLICT (actor, scope_pattern) DO UPDATE SET "
        "can_encrypt = g.can_encrypt OR EXCLUDED.can_encrypt, "
        "can_decrypt = g.can_decrypt OR EXCLUDED.can_decrypt, updated_at = now() "
        f"RETURNING {_COLUMNS}"
    )
    return (await session.execute(stmt, {"a": actor, "p": pattern, "e": encrypt, "d": decrypt})).one()


async def set_permissions(
    session: AsyncSession, actor: str, pattern: str, *, encrypt: bool, decrypt: bool
) -> Sequence[Any]:
    """Set an existing grant's permissions; the grant as it is now."""
    stmt = text(
        f"UPDATE {TABLE} SET can_encrypt = :e, can_decrypt = :d, updated_at = now() "
        f"WHERE actor = :a AND scope_pattern = :p RETURNING {_COLUMNS}"
    )
    return (await session.execute(stmt, {"a": actor, "p": pattern, "e": encrypt, "d": decrypt})).one()


async def delete_grant(session: AsyncSession, actor: str, pattern: str) -> None:
    """Remove the grant of exactly ``actor`` on ``pattern``."""
    stmt = text(f"DELETE FROM {TABLE} WHERE actor = :a AND scope_pattern = :p")
    await session.execute(stmt, {"a": actor, "p": pattern})


async def grant_exists(session: AsyncSession, actor: str, pattern: str) -> bool:
    """Whether ``actor`` has a grant on exactly ``pattern``."""
    stmt = text(f"SELECT 1 FROM {TABLE} WHERE actor = :a AND scope_pattern = :p")
    return (await session.execute(stmt, {"a": actor, "p": pattern})).first() is not None
