"""Scope creation: a scope comes into being with DEK v1 active on its first encryption."""

from __future__ import annotations

from datetime import UTC, datetime

from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from keyrotor.crypto import envelope
from keyrotor.errors import ScopeNotFound
from keyrotor.kek.base import KekProvider, WrapContext
from keyrotor.schedule.rules import RotationPolicy
from keyrotor.settings import Settings
from keyrotor.store import db, repo
from keyrotor.store import kek as kek_store


def _default_policy(settings: Settings) -> RotationPolicy:
    """The rotation policy a new scope starts with (``KEYROTOR_DEFAULT_*``)."""
    return RotationPolicy(
        enabled=settings.default_rotation_enabled,
        interval_days=settings.default_interval_days,
        grace_days=min(settings.default_grace_days, settings.default_interval_days),
    )


async def create_scope(
    sessions: async_sessionmaker[AsyncSession], kek: KekProvider, settings: Settings, scope: str
) -> tuple[repo.KeyRecord, AESGCM | None]:
    """Create ``scope`` with DEK v1 under the default policy, unless another caller just did.

    The DEK is wrapped inside the inserting transaction, after :func:`hold_off_kek_cutoff`: a KEK
    rotation's cut-off cannot fall between the wrap and the insert (the transaction is held
    open for one KEK call). A concurrent creator wins harmlessly.

    Returns:
        The scope's active DEK record, and the new DEK's cipher if this call created it (None
        if another did).
    """
    dek = envelope.new_dek()
    async with db.transaction(sessions) as session:
        await kek_store.hold_off_kek_cutoff(session)
        wrapped = await kek.wrap(dek, WrapContext(scope, 1))
        created = await repo.create_scope(
            session, scope, wrapped, _default_policy(settings), datetime.now(UTC)
        )
        record = await repo.get_key(session, scope)
    if record is None:  # pragma: no cover - the row was just written or read
        raise ScopeNotFound(f"scope {scope!r} could not be created")
    return record, AESGCM(dek) if created else None
