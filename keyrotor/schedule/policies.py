"""Reading and changing the rotation policies stored on ``key_scopes``.

The rules (ranges, due dates) are pure, in :mod:`keyrotor.schedule.rules`; this module loads a scope's
policy, applies a change under the scope row's lock, and records it as a ``config_change`` audit
event (before and after in its metadata) in the same transaction, so a change and its record
commit or roll back together.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from datetime import datetime
from typing import Any

from sqlalchemy.ext.asyncio import AsyncSession

from keyrotor.audit.log import check_actor, record_config_change
from keyrotor.errors import ScopeNotFound
from keyrotor.inputs import check_scope
from keyrotor.schedule.rules import ScopePolicy, change_policy
from keyrotor.store import policies as store
from keyrotor.store.policies import count_scopes as count_scopes


@dataclass(frozen=True)
class PolicyView:
    """A scope's policy and what it means now."""

    scope_id: int
    scope: str
    policy: ScopePolicy
    last_rotation_at: datetime | None
    active_version: int
    anchor: datetime  # the interval counts from here: the last rotation, else the active DEK's activation
    encryptions: int  # made by the active DEK, as flushed so far
    encryption_limit: int
    open_run: bool

    def due_reason(self, now: datetime) -> str | None:
        """``schedule`` or ``usage`` if a rotation is due at ``now``."""
        return self.policy.due_reason(now, self.encryptions, self.encryption_limit)

    def stored(self) -> dict[str, Any]:
        """The policy fields, JSON-ready (what the audit event records as before/after)."""
        p = self.policy
        return {
            "enabled": p.enabled,
            "interval_days": p.interval_days,
            "grace_period_days": p.grace_days,
            "max_encryptions": p.max_encryptions,
            "next_rotation_at": p.next_rotation_at.isoformat() if p.next_rotation_at else None,
        }

    def as_dict(self, now: datetime) -> dict[str, Any]:
        return {
            "scope": self.scope,
            **self.stored(),
            "last_rotation_at": self.last_rotation_at.isoformat() if self.last_rotation_at else None,
            "active_version": self.active_version,
            "encryptions": self.encryptions,
            "encryption_limit": self.encryption_limit,
            "due": self.due_reason(now),
            "run_open": self.open_run,
        }


def _view(row: Any, default_max: int) -> PolicyView:
    sid, name, enabled, interval, grace, max_enc, next_at, last_at, active, created, activated, enc, open_ = (
        row
    )
    policy = ScopePolicy(enabled, interval, grace, max_enc, next_at)
    return PolicyView(
        scope_id=sid,
        scope=name,
        policy=policy,
        last_rotation_at=last_at,
        active_version=active,
        anchor=last_at or activated or created,
        encryptions=int(enc),
        encryption_limit=policy.encryption_limit(default_max),
        open_run=bool(open_),
    )


async def get_policy(
    session: AsyncSession, scope: str, *, default_max: int, for_update: bool = False
) -> PolicyView:
    """One scope's policy.

    Raises:
        InvalidScope: a malformed scope name.
        ScopeNotFound: no such scope.
    """
    check_scope(scope)
    row = await store.policy_row(session, scope, for_update=for_update)
    if row is None:
        raise ScopeNotFound(f"scope {scope!r} does not exist")
    return _view(row, default_max)


async def list_policies(session: AsyncSession, *, default_max: int, limit: int = 10_000) -> list[PolicyView]:
    """The policies of the first ``limit`` scopes by name (see :func:`count_scopes` for the total)."""
    return [_view(r, default_max) for r in await store.policy_rows(session, limit=limit)]


async def set_policy(
    session: AsyncSession,
    scope: str,
    *,
    actor: str,
    now: datetime,
    default_max: int,
    enabled: bool | None = None,
    interval_days: int | None = None,
    grace_days: int | None = None,
    max_encryptions: int | None = None,
    clear_max_encryptions: bool = False,
    next_rotation_at: datetime | None = None,
) -> tuple[PolicyView, PolicyView]:
    """Change a scope's policy (None: leave a field as it is) and audit it. Returns (before, after).

    An unchanged policy writes nothing (no audit event either).

    Raises:
        InvalidScope, InvalidInput: bad input (see :func:`keyrotor.schedule.rules.change_policy`); nothing
            is changed.
        ScopeNotFound: no such scope.
    """
    check_actor(actor)
    before = await get_policy(session, scope, default_max=default_max, for_update=True)
    new = change_policy(
        before.policy,
        anchor=before.anchor,
        now=now,
        enabled=enabled,
        interval_days=interval_days,
        grace_days=grace_days,
        max_encryptions=max_encryptions,
        clear_max_encryptions=clear_max_encryptions,
        next_rotation_at=next_rotation_at,
        encryptions=before.encryptions,
        default_max=default_max,
    )
    if new == before.policy:
        return before, before
    await store.update_policy(
        session,
        before.scope_id,
        enabled=new.enabled,
        interval_days=new.interval_days,
        grace_days=new.grace_days,
        max_encryptions=new.max_encryptions,
        next_rotation_at=new.next_rotation_at,
    )
    after = replace(before, policy=new, encryption_limit=new.encryption_limit(default_max))
    await record_config_change(session, actor, "policy", before.stored(), after.stored(), scope=scope)
    return before, after
