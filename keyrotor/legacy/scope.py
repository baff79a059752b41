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
the one stored there) is refused, with one exception: a row (or secret) that now holds a ``kr1``
value may have been migrated between the caller's read and its decrypt. Its ``kr1`` value is
then the *successor* the reader checks the presented value against (:mod:`keyrotor.legacy.reader`:
it opens only to the plaintext the row's successor opens to, which the caller may read anyway).

The lookup is one indexed read, on the legacy path only, which costs a scrypt anyway; it runs
before the scrypt, so a refused value costs none.
"""

from __future__ import annotations

import re
import uuid
from typing import Any

from sqlalchemy.ext.asyncio import AsyncSession

from keyrotor.census.columns import ManagedColumn, census, list_columns
from keyrotor.census.locations import PK_PLACEHOLDER, SECRETS_TEMPLATE, display, location_of
from keyrotor.store import app_rows, repo
from keyrotor.store.key_ranges import Key

_SECRET_PREFIX = SECRETS_TEMPLATE.split(PK_PLACEHOLDER)[0]


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


def _successor(stored: str | None) -> str | None:
    """``stored`` if it is a ``kr1`` value (the place's value may have been migrated), else None."""
    return stored if stored is not None and stored.startswith("kr1:") else None


async def refusal(
    session: AsyncSession, scope: str, context: str, ciphertext: str
) -> tuple[str | None, str | None]:
    """Why the legacy value ``ciphertext`` may not open in ``scope`` with ``context`` (None: it
    may), and the ``kr1`` value the named place of ``scope`` holds instead, if any (its successor,
    when the migration replaced the value after the caller read it).

    The reason names the location, never the value.
    """
    where = display(location_of(context))
    if context.startswith(_SECRET_PREFIX):
        stored = await repo.secret_ciphertext(session, scope, context[len(_SECRET_PREFIX) :])
        if stored is None:
            return f"no secret of that name in scope {scope!r}", None
        if stored == ciphertext:
            return None, None
        return "it is not the value stored in that secret", _successor(stored)
    reasons: list[str] = []
    successor: str | None = None
    for col in await list_columns(session):
        raw = key_in_context(col.context_template, context)
        key = None if raw is None else _typed_key(col, raw)
        if key is None:
            continue
        found = await app_rows.scope_and_value(
            session,
            table=col.table,
            column=col.column,
            pk_column=col.pk_column,
            key_sql_type=col.key_type.sql,
            key=key,
            scope_column=col.scope_column,
        )
        if found is None:
            reasons.append(f"no row of {col.name} has that key")
        elif col.scope_of(found[0]) != scope:
            reasons.append(f"that row of {col.name} belongs to another scope")
        elif found[1] != ciphertext:
            reasons.append(f"it is not the value stored in that row of {col.name}")
            successor = successor or _successor(found[1])
        else:
            return None, None
    if reasons:
        return "; ".join(reasons), successor
    return (
        f"its context's location {where!r} is neither a registered column nor keyrotor's "
        "secrets (a legacy value opens only through the row it lives in)"
    ), None


async def legacy_remaining(session: AsyncSession, managed: list[dict[str, Any]] | None = None) -> int:
    """Legacy values left in ``secrets`` and every registered column (``managed``: a census
    already taken by :func:`keyrotor.census.columns.census`)."""
    if managed is None:
        managed = await census(session)
    return await repo.count_legacy_secrets(session) + sum(int(c["legacy"]) for c in managed)
