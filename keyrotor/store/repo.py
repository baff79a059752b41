"""Async repository functions over the tables. Each takes the session of a transaction the
caller opened (``keyrotor.store.db.transaction``), so several of them commit as one unit."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from sqlalchemy import func, select, text
from sqlalchemy.dialects.postgresql import insert
from sqlalchemy.ext.asyncio import AsyncSession

from keyrotor.kek.base import WrappedDek
from keyrotor.schedule.rules import KeyState, RotationPolicy
from keyrotor.store.models import DataKey, KeyScope, Rotation, Secret

_RETIRED_USE_SQL = text(
    "INSERT INTO retired_key_uses (scope_id, dek_version, location, actor) VALUES (:s, :v, :l, :a)"
)
_SECRET_CIPHERTEXT_SQL = text(
    "SELECT s.ciphertext FROM secrets s JOIN key_scopes k ON k.id = s.scope_id "
    "WHERE k.name = :scope AND s.name = :name"
)


@dataclass(frozen=True, slots=True)
class KeyRecord:
    """What a process needs to use one DEK version: where it is and how it is wrapped."""

    scope_id: int
    scope: str
    version: int
    state: KeyState
    latest_version: int
    wrapped: WrappedDek | None  # None once destroyed


async def get_scope(session: AsyncSession, name: str, *, for_update: bool = False) -> KeyScope | None:
    """The scope row, or None."""
    stmt = select(KeyScope).where(KeyScope.name == name)
    if for_update:
        stmt = stmt.with_for_update()
    return (await session.execute(stmt)).scalar_one_or_none()


async def create_scope(
    session: AsyncSession, name: str, wrapped: WrappedDek, policy: RotationPolicy, now: datetime
) -> bool:
    """Create a scope with DEK v1 active. Returns False (and writes nothing) if it exists.

    Two processes creating the same scope at once both get here; the unique index makes the
    second ``INSERT`` wait for the first transaction and then do nothing, so exactly one DEK
    v1 is stored and both callers then read it.
    """
    stmt = (
        insert(KeyScope)
        .values(
            name=name,
            active_version=1,
            latest_version=1,
            rotation_enabled=policy.enabled,
            interval_days=policy.interval_days,
            grace_period_days=policy.grace_days,
            next_rotation_at=policy.next_rotation_after(now),
        )
        .on_conflict_do_nothing(index_elements=["name"])
        .returning(KeyScope.id)
    )
    scope_id = (await session.execute(stmt)).scalar_one_or_none()
    if scope_id is None:
        return False
    session.add(
        DataKey(
            scope_id=scope_id,
            version=1,
            state=KeyState.ACTIVE.value,
            encrypted_dek=wrapped.blob,
            kek_id=wrapped.kek_id,
            kek_version=wrapped.kek_version,
            activated_at=now,
            imported=False,  # keyrotor's own: its proof needs no scan for the old backend's values
        )
    )
    await session.flush()
    return True


def _record(scope: KeyScope, key: DataKey) -> KeyRecord:
    wrapped = (
        WrappedDek(kek_id=key.kek_id, kek_version=key.kek_version, blob=key.encrypted_dek)
        if key.encrypted_dek is not None
        else None
    )
    return KeyRecord(scope.id, scope.name, key.version, KeyState(key.state), scope.latest_version, wrapped)


async def get_key(session: AsyncSession, scope: str, version: int | None = None) -> KeyRecord | None:
    """One DEK version of a scope (the active one if ``version`` is None), or None."""
    stmt = (
        select(KeyScope, DataKey).join(DataKey, DataKey.scope_id == KeyScope.id).where(KeyScope.name == scope)
    )
    if version is None:
        stmt = stmt.where(DataKey.version == KeyScope.active_version)
    else:
        stmt = stmt.where(DataKey.version == version)
    row = (await session.execute(stmt)).first()
    return _record(row[0], row[1]) if row else None


async def record_retired_use(
    session: AsyncSession, scope_id: int, version: int, location: str, actor: str
) -> None:
    """Record a use of a retired DEK version (it cancels the version's pending destruction)."""
    await session.execute(_RETIRED_USE_SQL, {"s": scope_id, "v": version, "l": location, "a": actor})


async def put_secrets(
    session: AsyncSession, scope_id: int, rows: Sequence[tuple[str, str]], dek_version: int
) -> int:
    """Insert or replace many ``(name, ciphertext)`` rows of one scope in one statement."""
    if not rows:
        return 0
    names = [r[0] for r in rows]
    cts = [r[1] for r in rows]
    result = await session.execute(
        text(
            "INSERT INTO secrets (scope_id, name, ciphertext, dek_version) "
            "SELECT :scope_id, n, c, :v FROM unnest(CAST(:names AS text[]), CAST(:cts AS text[])) AS t(n, c) "
            "ON CONFLICT (scope_id, name) DO UPDATE SET ciphertext = EXCLUDED.ciphertext, "
            "dek_version = EXCLUDED.dek_version, updated_at = now()"
        ),
        {"scope_id": scope_id, "v": dek_version, "names": names, "cts": cts},
    )
    return int(getattr(result, "rowcount", len(rows)))


async def get_secret(session: AsyncSession, scope: str, name: str) -> Secret | None:
    """The secret row, or None."""
    stmt = (
        select(Secret)
        .join(KeyScope, KeyScope.id == Secret.scope_id)
        .where(KeyScope.name == scope, Secret.name == name)
    )
    return (await session.execute(stmt)).scalar_one_or_none()


async def secret_ciphertext(session: AsyncSession, scope: str, name: str) -> str | None:
    """The stored text of one secret of ``scope``, or None."""
    found = await session.execute(_SECRET_CIPHERTEXT_SQL, {"scope": scope, "name": name})
    return found.scalar_one_or_none()


async def count_legacy_secrets(session: AsyncSession) -> int:
    """Legacy (not ``kr1``) values left in the ``secrets`` table."""
    found = await session.execute(text("SELECT count(*) FROM secrets WHERE ciphertext NOT LIKE 'kr1:%'"))
    return int(found.scalar_one())


async def iter_secrets_page(
    session: AsyncSession, *, scope: str | None, after_id: int, limit: int
) -> list[tuple[int, str, str, str]]:
    """A keyset page of ``(id, scope, name, ciphertext)`` ordered by id."""
    stmt = (
        select(Secret.id, KeyScope.name, Secret.name, Secret.ciphertext)
        .join(KeyScope, KeyScope.id == Secret.scope_id)
        .where(Secret.id > after_id)
        .order_by(Secret.id)
        .limit(limit)
    )
    if scope is not None:
        stmt = stmt.where(KeyScope.name == scope)
    return [(r[0], r[1], r[2], r[3]) for r in (await session.execute(stmt)).all()]


async def status(session: AsyncSession, scope: str | None = None) -> list[dict[str, Any]]:
    """Every scope (or one) with its policy, keys and rows per DEK version."""
    scopes_stmt = select(KeyScope).order_by(KeyScope.name)
    if scope is not None:
        scopes_stmt = scopes_stmt.where(KeyScope.name == scope)
    scopes = (await session.execute(scopes_stmt)).scalars().all()
    if not scopes:
        return []
    ids = [s.id for s in scopes]
    keys = (
        (await session.execute(select(DataKey).where(DataKey.scope_id.in_(ids)).order_by(DataKey.version)))
        .scalars()
        .all()
    )
    keys_by_scope: dict[int, list[DataKey]] = {}
    for k in keys:
        keys_by_scope.setdefault(k.scope_id, []).append(k)
    rows_by_scope = await _rows_by_version(session, ids)
    run_by_scope = await _open_runs(session, ids)
    refused = await _refused_retirements(session, ids)
    out = []
    for s in scopes:
        scope_keys = keys_by_scope.get(s.id, [])
        rows = {str(k.version): 0 for k in scope_keys if KeyState(k.state).decrypts}
        rows.update(rows_by_scope.get(s.id, {}))
        out.append(
            {
                "scope": s.name,
                "active_version": s.active_version,
                "latest_version": s.latest_version,
                "rotation_count": s.dek_rotation_count,
                "policy": _policy_dict(s),
                "keys": [_key_dict(k) for k in scope_keys],
                "rows_by_version": dict(sorted(rows.items(), key=lambda kv: int(kv[0]))),
                "rows_total": sum(rows.values()),
                "run": run_by_scope.get(s.id),
                "retirement_refused": refused.get(s.id),
            }
        )
    return out


def _policy_dict(s: KeyScope) -> dict[str, Any]:
    return {
        "enabled": s.rotation_enabled,
        "interval_days": s.interval_days,
        "grace_period_days": s.grace_period_days,
        "max_encryptions": s.max_encryptions,
        "next_rotation_at": _iso(s.next_rotation_at),
        "last_rotation_at": _iso(s.last_rotation_at),
    }


def _key_dict(k: DataKey) -> dict[str, Any]:
    return {
        "version": k.version,
        "state": k.state,
        "kek_id": k.kek_id,
        "kek_version": k.kek_version,
        "created_at": _iso(k.created_at),
        "activated_at": _iso(k.activated_at),
        "grace_until": _iso(k.grace_until),
        "retired_at": _iso(k.retired_at),
        "destroy_after": _iso(k.destroy_after),
        "destroyed_at": _iso(k.destroyed_at),
    }


async def _rows_by_version(session: AsyncSession, ids: Sequence[int]) -> dict[int, dict[str, int]]:
    """Rows of keyrotor's ``secrets`` table per scope and DEK version."""
    counts = (
        await session.execute(
            select(Secret.scope_id, Secret.dek_version, func.count())
            .where(Secret.scope_id.in_(ids))
            .group_by(Secret.scope_id, Secret.dek_version)
        )
    ).all()
    rows_by_scope: dict[int, dict[str, int]] = {}
    for scope_id, version, n in counts:
        rows_by_scope.setdefault(scope_id, {})[str(version)] = int(n)
    return rows_by_scope


async def _open_runs(session: AsyncSession, ids: Sequence[int]) -> dict[int, dict[str, Any]]:
    """The open (queued or running) run of each scope: its DEK rotation, else its retirement."""
    open_runs = (
        await session.execute(
            select(Rotation.scope_id, Rotation.id, Rotation.state, Rotation.rows_done, Rotation.rows_total)
            .where(Rotation.scope_id.in_(ids), Rotation.state.in_(("pending", "running")))
            .order_by(Rotation.kind)  # 'dek' sorts before 'retire'
        )
    ).all()
    run_by_scope: dict[int, dict[str, Any]] = {}
    for scope_id, run_id, state, rows_done, rows_total in open_runs:
        if scope_id is not None:
            run_by_scope.setdefault(
                scope_id, {"id": run_id, "state": state, "rows_done": rows_done, "rows_total": rows_total}
            )
    return run_by_scope


async def _refused_retirements(session: AsyncSession, ids: Sequence[int]) -> dict[int, dict[str, Any]]:
    """Each scope's latest retirement (or destruction) run, where it failed: the refusal the
    scheduler backs off from until an operator acts on it."""
    rows = await session.execute(
        text(
            "SELECT DISTINCT ON (scope_id) scope_id, id, from_version, error, finished_at FROM rotations "
            "WHERE kind = 'retire' AND scope_id = ANY(:ids) AND state IN ('completed', 'failed') "
            "ORDER BY scope_id, id DESC"
        ),
        {"ids": list(ids)},
    )
    return {
        sid: {"run_id": rid, "version": version, "error": error, "at": _iso(at)}
        for sid, rid, version, error, at in rows.all()
        if error is not None
    }


def _iso(value: datetime | None) -> str | None:
    return value.isoformat() if value is not None else None
