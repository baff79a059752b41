"""The ``api_tokens`` table: bearer tokens of the HTTP API, kept as SHA-256 hashes only.

Each function takes the session of a transaction the caller opened
(``keyrotor.store.db.transaction``). Making, hashing and checking tokens is
``keyrotor.api.tokens``'s work; this module only reads and writes rows.
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from typing import Any

from sqlalchemy import func, insert, select, update
from sqlalchemy.ext.asyncio import AsyncSession

from keyrotor.store.models import ApiToken


@dataclass(frozen=True, slots=True)
class TokenRecord:
    """One token row, without its hash."""

    id: int
    actor: str
    created_by: str
    created_at: datetime
    expires_at: datetime | None
    revoked_at: datetime | None

    def as_dict(self) -> dict[str, Any]:
        """JSON-ready (timestamps as ISO 8601)."""
        return {
            "id": self.id,
            "actor": self.actor,
            "created_by": self.created_by,
            "created_at": self.created_at.isoformat(),
            "expires_at": self.expires_at.isoformat() if self.expires_at else None,
            "revoked_at": self.revoked_at.isoformat() if self.revoked_at else None,
        }


_COLUMNS = (
    ApiToken.id,
    ApiToken.actor,
    ApiToken.created_by,
    ApiToken.created_at,
    ApiToken.expires_at,
    ApiToken.revoked_at,
)


def _record(row: Any) -> TokenRecord:
    return TokenRecord(*row)


async def insert_token(
    session: AsyncSession, actor: str, token_hash: bytes, *, created_by: str, expires_at: datetime | None
) -> TokenRecord:
    """Store a new token's hash; returns its row."""
    stmt = (
        insert(ApiToken)
        .values(actor=actor, token_hash=token_hash, created_by=created_by, expires_at=expires_at)
        .returning(*_COLUMNS)
    )
    return _record((await session.execute(stmt)).one())


async def list_tokens(session: AsyncSession) -> list[TokenRecord]:
    """Every token, oldest first."""
    rows = (await session.execute(select(*_COLUMNS).order_by(ApiToken.id))).all()
    return [_record(r) for r in rows]


async def get_token(session: AsyncSession, token_id: int) -> TokenRecord | None:
    """One token by id, or None."""
    row = (await session.execute(select(*_COLUMNS).where(ApiToken.id == token_id))).first()
    return _record(row) if row is not None else None


async def revoke_token(session: AsyncSession, token_id: int) -> TokenRecord | None:
    """Mark a token revoked (once: a revoked token keeps its first revocation time).

    Returns the row as it is now, or None if there is no such token.
    """
    await session.execute(
        update(ApiToken)
        .where(ApiToken.id == token_id, ApiToken.revoked_at.is_(None))
        .values(revoked_at=func.now())
    )
    return await get_token(session, token_id)


async def find_by_hash(session: AsyncSession, token_hash: bytes) -> tuple[TokenRecord, bytes] | None:
    """The token whose hash is ``token_hash``, with the stored hash (for a constant-time check)."""
    row = (
        await session.execute(select(*_COLUMNS, ApiToken.token_hash).where(ApiToken.token_hash == token_hash))
    ).first()
    if row is None:
        return None
    return _record(row[:6]), bytes(row[6])


async def reachable(session: AsyncSession) -> None:
    """One read of the table: the database answers and has the API's schema."""
    await session.execute(select(ApiToken.id).limit(1))
