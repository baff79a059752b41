"""Which scope a legacy value belongs to, so it opens only where its ``kr1`` successor would.

A legacy value of the old Node backend carries no scope and no context: its only key is the
master key. Left alone, ``KeyManager.decrypt`` would open it in whatever scope the caller named,
so a grant on one scope would read every tenant's legacy values. A legacy value therefore opens
only when the caller's ``context`` names the place it lives and that place belongs to the named
scope (the grants check of that scope has run before):

- ``secret:<name>``: keyrotor's own ``secrets`` table; the secret ``name`` must exist in the
  scope and hold that very value;
- a registered column whose context template produces the context: the row the context's key
  names must exist, hold that very value, and belong to the scope (the column's fixed scope, or
  the row's scope column).

Anything else (no context, an unregistered location, another scope's row, a value that is not
the one stored there) is refused. The lookup is one indexed read, on the legacy path only, which
costs a scrypt anyway; it runs before the scrypt, so a refused value costs none.
"""

from __future__ import annotations

import re
import uuid
from typing import Any

from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncSession

from keyrotor.census.columns import ManagedColumn, list_columns
from keyrotor.census.locations import PK_PLACEHOLDER, SECRETS_TEMPLATE, display, location_of
from keyrotor.store.key_ranges import Key
from keyrotor.store.targets import quote_ident as _quote

_SECRET_PREFIX = SECRETS_TEMPLATE.split(PK_PLACEHOLDER)[0]

_SECRET_SQL = text(
    "SELECT s.ciphertext FROM secrets s JOIN key_scopes k ON k.id = s.scope_id "
    "WHERE k.name = :scope AND s.name = :name"
)


def key_in_context(template: str, context: str) -> str | None:
    """The key that, substituted into ``template``'s ``{pk}`` placeholders, gives ``context``."""
    parts = template.split(PK_PLACEHOLDER)
    if len(parts) == 1:
        return None
    # The first placeholder captures the key; the others must repeat it.
    pattern = re.escape(parts[0]) + "(?P<pk>.*)" + "(?P=pk)".join(re.escape(p) for p in parts[1:])
    # Greedy: with a ':' inside a key, the same context is produced by one key only when the
    # literal text after it is fixed, which every registered template has.
    m = re.fullmatch(pattern, context, re.DOTALL)
    return m.group("pk") if m else None


def _typed_key(col: ManagedColumn, raw: str) -> Key | None:
    """``raw`` as the key column's type would give it back in a context, or None if it cannot be."""
    if col.key_type.integer:
        try:
            number = int(raw)
        except ValueError:
            return None
        return number if str(number) == raw and -(2**63) <= number < 2**63 else None
    if col.key_type.sql == "uuid":
        try:
            return raw if str(uuid.UUID(raw)) == raw else None
        except ValueError:
            return None
    return raw


async def _column_row(session: AsyncSession, col: ManagedColumn, key: Key) -> tuple[str | None, str] | None:
    """``(row scope, stored value)`` of the row with ``key``, or None if there is none."""
    scope = f"{_quote(col.scope_column)}::text" if col.scope_column else "NULL::text"
    row = (
        await session.execute(
            text(
                f"SELECT {scope}, {_quote(col.column)} FROM {_quote(col.table)} "
                f"WHERE {_quote(col.pk_column)} = CAST(:k AS {col.key_type.sql})"
            ),
            {"k": key},
        )
    ).first()
    return None if row is None else (row[0], row[1])


async def refusal(session: AsyncSession, scope: str, context: str, ciphertext: str) -> str | None:
    """Why the legacy value ``ciphertext`` may not open in ``scope`` with ``context`` (None: it may).

    The reason names the location, never the value.
    """
    where = display(location_of(context))
    if context.startswith(_SECRET_PREFIX):
        stored = (
            await session.execute(_SECRET_SQL, {"scope": scope, "name": context[len(_SECRET_PREFIX) :]})
        ).scalar_one_or_none()
        if stored is None:
            return f"no secret of that name in scope {scope!r}"
        return None if stored == ciphertext else "it is not the value stored in that secret"
    reasons: list[str] = []
    for col in await list_columns(session):
        raw = key_in_context(col.context_template, context)
        key = None if raw is None else _typed_key(col, raw)
        if key is None:
            continue
        found = await _column_row(session, col, key)
        if found is None:
            reasons.append(f"no row of {col.name} has that key")
        elif col.scope_of(found[0]) != scope:
            reasons.append(f"that row of {col.name} belongs to another scope")
        elif found[1] != ciphertext:
            reasons.append(f"it is not the value stored in that row of {col.name}")
        else:
            return None
    if reasons:
        return "; ".join(reasons)
    return (
        f"its context's location {where!r} is neither a registered column nor keyrotor's "
        "secrets (a legacy value opens only through the row it lives in)"
    )


async def legacy_secrets(session: AsyncSession) -> int:
    """Legacy (not ``kr1``) values left in keyrotor's own ``secrets`` table."""
    found = await session.execute(text("SELECT count(*) FROM secrets WHERE ciphertext NOT LIKE 'kr1:%'"))
    return int(found.scalar_one())


async def legacy_remaining(session: AsyncSession, managed: list[dict[str, Any]] | None = None) -> int:
    """Legacy values left in ``secrets`` and every registered column (``managed``: a census
    already taken by :func:`keyrotor.census.columns.census`)."""
    if managed is None:
        from keyrotor.census.columns import census

        managed = await census(session)
    return await legacy_secrets(session) + sum(int(c["legacy"]) for c in managed)
