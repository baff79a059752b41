"""A KEK rotation rewraps the audit chain's key as it does a DEK: verified before it is written,
and with no transaction (nor row lock) held while the provider answers.

The audit key is the only copy of what keys the audit chain: a rewrap that wrote a wrapping
opening to another key (a provider bug, a wrong key version, a truncated answer) would make
every later audited call and ``audit verify`` fail. The KEK is the real local keyring; only the
answer to the audit key's rewrap is spoiled, as a faulty provider would spoil it.
"""

from __future__ import annotations

import os
from typing import Any, cast

import asyncpg
import pytest

from keyrotor import KeyManager
from keyrotor.audit import key as audit_key
from keyrotor.errors import KekError
from keyrotor.kek.base import KekProvider, WrapContext, WrappedDek
from keyrotor.kek.factory import open_provider
from keyrotor.rotation import kek as kek_rotation
from keyrotor.rotation.context import RotationContext
from keyrotor.store import db
from tests.conftest import MASTER_KEY
from tests.jobs.conftest import settings_of
from tests.rotation_helpers import fetch, seed

NEW_KEY = "audit-key-rewrap-master-key-v2-4b9e1c7a3d5f"
AUDIT_SCOPE = "_keyrotor_audit_key:"


class _AuditRewrap:
    """The real provider; its rewrap of the audit key answers ``spoil`` (``good`` leaves it be)
    and checks, meanwhile, whether a transaction holds the audit key's row."""

    def __init__(self, inner: Any, database_url: str, spoil: str) -> None:
        self.inner, self.database_url, self.spoil = inner, database_url, spoil
        self.row_locked: bool | None = None

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)

    async def rewrap(self, items: list[tuple[WrappedDek, WrapContext]]) -> list[WrappedDek]:
        fresh: list[WrappedDek] = await self.inner.rewrap(items)
        if not any(ctx.scope.startswith(AUDIT_SCOPE) for _, ctx in items):
            return fresh
        self.row_locked = await self._row_locked()
        out = []
        for (_old, ctx), new in zip(items, fresh, strict=True):
            if self.spoil == "other_key":  # a valid wrapping, of another key
                new = await self.inner.wrap(os.urandom(32), ctx)
            elif self.spoil == "truncated":
                new = WrappedDek(new.kek_id, new.kek_version, new.blob[:-7])
            out.append(new)
        return out

    async def _row_locked(self) -> bool:
        conn = await asyncpg.connect(self.database_url)
        try:
            async with conn.transaction():
                await conn.execute("SET LOCAL lock_timeout = '100ms'")
                try:
                    await conn.execute("SELECT 1 FROM audit_keys FOR UPDATE")
                except asyncpg.exceptions.LockNotAvailableError:
                    return True
            return False
        finally:
            await conn.close()


async def _audit_keys(url: str) -> list[tuple[int, int, bytes]]:
    rows = await fetch(url, "SELECT id, kek_version, wrapped FROM audit_keys ORDER BY id")
    return [(r["id"], r["kek_version"], bytes(r["wrapped"])) for r in rows]


@pytest.mark.parametrize("spoil", ["other_key", "truncated", "good"])
async def test_the_audit_keys_rewrap_is_verified_and_holds_no_transaction(
    wenv: dict[str, str], spoil: str
) -> None:
    s = settings_of(wenv)
    await seed(s, "anthropic", 2)  # a DEK, and the audit key (created by the first KeyManager)
    moved = settings_of(
        wenv,
        ENCRYPTION_KEY=NEW_KEY,
        ENCRYPTION_KEY_VERSION="2",
        ENCRYPTION_KEYS_PREVIOUS=f'{{"1": "{MASTER_KEY}"}}',
    )
    before = await _audit_keys(s.database_url)
    assert [k[1] for k in before] == [1]
    engine = db.create_engine(s.database_url)
    real = await open_provider(moved, {})
    try:
        sessions = db.sessionmaker(engine)
        original = (await audit_key.load_keys(sessions, real))[1].mac(b"probe")
        kek = _AuditRewrap(real, s.database_url, spoil)
        rc = RotationContext(sessions, cast(KekProvider, kek), moved)
        if spoil == "good":
            assert (await kek_rotation.rotate_kek(rc)).run.state == "completed"
            assert [k[1] for k in await _audit_keys(s.database_url)] == [2]
        else:
            with pytest.raises(KekError, match="audit key 1") as caught:
                await kek_rotation.rotate_kek(rc)
            assert NEW_KEY not in str(caught.value) and MASTER_KEY not in str(caught.value)
            assert await _audit_keys(s.database_url) == before  # the old wrapping is kept
            (run,) = await fetch(s.database_url, "SELECT state FROM rotations WHERE kind = 'kek'")
            assert run["state"] == "failed"
        assert kek.row_locked is False  # the provider answered with no row lock held
        # The stored wrapping still opens to the very same key.
        assert (await audit_key.load_keys(sessions, real))[1].mac(b"probe") == original
    finally:
        await real.aclose()
        await engine.dispose()
    async with KeyManager(moved.model_copy(update={"listen_key_changes": False})) as km:  # audited calls work
        await km.put_secret("anthropic", "after", "sk-after-the-kek-rotation")
