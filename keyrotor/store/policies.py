"""Policy rows: the rotation-policy columns of ``key_scopes``, read with what they mean now.

A policy row is ``(id, name, rotation_enabled, interval_days, grace_period_days, max_encryptions,
next_rotation_at, last_rotation_at, active_version, created_at, active DEK's activated_at,
active DEK's encryptions, whether a DEK rotation is open)``; :mod:`keyrotor.schedule.policies`
turns it into a view.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any

from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncSession

_SELECT = (
    "SELECT s.id, s.name, s.rotation_enabled, s.interval_days, s.grace_period_days, s.max_encryptions, "
    "s.next_rotation_at, s.last_rotation_at, s.active_version, s.created_at, "
    "d.activated_at, coalesce(d.encryptions, 0), "
    "EXISTS (SELECT 1 FROM rotations o WHERE o.kind = 'dek' AND coalesce(o.scope_id, 0) = s.id "
    "AND o.state IN ('pending', 'running')) "
    "FROM key_scopes s LEFT JOIN data_keys d ON d.scope_id = s.id AND d.version = s.active_version"
)


async def policy_row(session: AsyncSession, scope: str, *, for_update: bool = False) -> Any | None:
    """One scope's policy row, or None; ``for_update`` locks the scope row."""
    sql = _SELECT + " WHERE s.name = :name" + (" FOR UPDATE OF s" if for_update else "")
    return (await session.execute(text(sql), {"name": scope})).first()


async def policy_rows(session: AsyncSession, *, limit: int) -> list[Any]:
    """The policy rows of the first ``limit`` scopes by name."""
    return list(
        (await session.execute(text(_SELECT + " ORDER BY s.name LIMIT :limit"), {"limit": limit})).all()
    )


async def count_scopes(session: AsyncSession) -> int:
    """How many scopes there are."""
    return int((await session.execute(text("SELECT count(*) FROM key_scopes"))).scalar_one())


async def update_policy(
    session: AsyncSession,
    scope_id: int,
    *,
    enabled: bool,
    interval_days: int,
    grace_days: int,
    max_encryptions: int | None,
    next_rotation_at: datetime | None,
) -> None:
    """Write a scope's policy columns."""
    await session.execute(
        text(
            "UPDATE key_scopes SET rotation_enabled = :enabled, interval_days = :interval, "
            "grace_period_days = :grace, max_encryptions = :max_enc, next_rotation_at = :next_at, "
            "updated_at = now() WHERE id = :id"
        ),
        {
            "id": scope_id,
            "enabled": enabled,
            "interval": interval_days,
            "grace": grace_days,
            "max_enc": max_encryptions,
            "next_at": next_rotation_at,
        },
    )
