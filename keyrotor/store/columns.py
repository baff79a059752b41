"""``managed_columns`` (application columns keyrotor covers) and the catalog facts registering one needs.

Identifiers reach SQL only through :func:`quote_ident`: validated as plain identifiers, then
double-quoted, so a name is never formatted into a statement unquoted.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from datetime import datetime
from typing import Any

from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession

from keyrotor.store.identifiers import quote_ident
from keyrotor.store.key_ranges import KeyType, key_type_of

_SELECT = (
    "SELECT table_name, column_name, pk_column, scope_column, scope, context_template, registered_at "
    "FROM managed_columns"
)
_COLUMN_TYPE = text(
    "SELECT format_type(a.atttypid, a.atttypmod) FROM pg_attribute a "
    "WHERE a.attrelid = to_regclass(:t) AND a.attname = :c AND a.attnum > 0 "
    "AND NOT a.attisdropped"
)
_UNIQUE_ALONE = text(
    "SELECT EXISTS (SELECT 1 FROM pg_index i JOIN pg_attribute a "
    "ON a.attrelid = i.indrelid AND a.attnum = i.indkey[0] "
    "WHERE i.indrelid = to_regclass(:t) AND i.indisunique AND i.indnatts = 1 "
    "AND i.indpred IS NULL AND i.indexprs IS NULL AND a.attname = :c)"
)
_RELATION = text(
    "SELECT c.relkind::text, n.nspname::text FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace "
    "WHERE c.oid = to_regclass(:t)"
)
_COLUMN_FLAGS = text(
    "SELECT a.attnotnull, a.attgenerated <> '' FROM pg_attribute a "
    "WHERE a.attrelid = to_regclass(:t) AND a.attname = :c AND a.attnum > 0 AND NOT a.attisdropped"
)
_PRIMARY_KEY = text(
    "SELECT array_agg(a.attname::text ORDER BY k.n) FROM pg_index i "
    "CROSS JOIN LATERAL unnest(i.indkey) WITH ORDINALITY AS k(attnum, n) "
    "JOIN pg_attribute a ON a.attrelid = i.indrelid AND a.attnum = k.attnum "
    "WHERE i.indrelid = to_regclass(:t) AND i.indisprimary"
)


async def managed_columns(session: AsyncSession) -> Sequence[Sequence[Any]]:
    """Every registered column as ``(table, column, pk_column, scope_column, scope, context_template,
    registered_at)``, by table and column."""
    return (await session.execute(text(_SELECT + " ORDER BY table_name, column_name"))).all()


async def lock_managed_columns(session: AsyncSession) -> None:
    """Lock ``managed_columns`` in SHARE mode until the transaction ends (registering and
    unregistering a column wait)."""
    await session.execute(text("LOCK TABLE managed_columns IN SHARE MODE"))


async def lock_managed_columns_for_change(session: AsyncSession) -> None:
    """Lock ``managed_columns`` in SHARE ROW EXCLUSIVE mode until the transaction ends: one
    registration at a time, so each is checked against every column registered before it."""
    await session.execute(text("LOCK TABLE managed_columns IN SHARE ROW EXCLUSIVE MODE"))


async def insert_managed_column(
    session: AsyncSession,
    table: str,
    column: str,
    *,
    pk: str,
    scope_column: str | None,
    scope: str | None,
    context_template: str,
) -> datetime | None:
    """Register a column; its ``registered_at``, or None if it was registered already."""
    stmt = text(
        "INSERT INTO managed_columns (table_name, column_name, pk_column, scope_column, scope, "
        "context_template) VALUES (:t, :c, :pk, :sc, :s, :ct) "
        "ON CONFLICT (table_name, column_name) DO NOTHING RETURNING registered_at"
    )
    params = {"t": table, "c": column, "pk": pk, "sc": scope_column, "s": scope, "ct": context_template}
    found: datetime | None = (await session.execute(stmt, params)).scalar_one_or_none()
    return found


async def delete_managed_column(session: AsyncSession, table: str, column: str) -> bool:
    """Unregister a column; False if it was not registered."""
    stmt = text("DELETE FROM managed_columns WHERE table_name = :t AND column_name = :c RETURNING id")
    return (await session.execute(stmt, {"t": table, "c": column})).scalar_one_or_none() is not None


async def same_relation(session: AsyncSession, table: str, others: Sequence[str]) -> bool:
    """Whether ``table`` is the very relation one of ``others`` names, each name resolved as this
    connection resolves it (``schema.table`` or through the search_path)."""
    found = await session.execute(
        text(
            "SELECT EXISTS (SELECT 1 FROM unnest(CAST(:os AS text[])) AS o "
            "WHERE to_regclass(o) = to_regclass(:t))"
        ),
        {"t": quote_ident(table), "os": [quote_ident(o) for o in others]},
    )
    return bool(found.scalar_one())


async def column_type(session: AsyncSession, table: str, column: str) -> str | None:
    """The column's type as ``format_type`` spells it; None if the table or column does not exist."""
    found = await session.execute(_COLUMN_TYPE, {"t": quote_ident(table), "c": column})
    value: str | None = found.scalar_one_or_none()
    return value


async def relation(session: AsyncSession, table: str) -> tuple[str, str] | None:
    """``(relkind, schema)`` of ``table`` as this connection resolves it (``relkind``: ``r`` a
    table, ``p`` a partitioned one, ``v`` a view, ``m`` a materialized view, ...); None if it
    does not exist."""
    found = (await session.execute(_RELATION, {"t": quote_ident(table)})).one_or_none()
    return None if found is None else (str(found[0]), str(found[1]))


async def column_flags(session: AsyncSession, table: str, column: str) -> tuple[bool, bool]:
    """``(not_null, generated)`` of an existing column."""
    found = (await session.execute(_COLUMN_FLAGS, {"t": quote_ident(table), "c": column})).one()
    return bool(found[0]), bool(found[1])


async def hidden_by_row_security(session: AsyncSession, tables: Sequence[str]) -> list[str]:
    """Those of ``tables`` whose row-level security policies apply to this session's role
    (``row_security_active``): a statement sees only the rows a policy shows it. One query."""
    if not tables:
        return []
    found = await session.execute(
        text(
            "SELECT t FROM unnest(CAST(:ts AS text[]), CAST(:qs AS text[])) AS u(t, q) "
            "WHERE row_security_active(to_regclass(q))"
        ),
        {"ts": list(tables), "qs": [quote_ident(t) for t in tables]},
    )
    return [str(r[0]) for r in found]


async def key_type(session: AsyncSession, table: str, column: str) -> KeyType | None:
    """The :class:`KeyType` of a key column as the catalog has it now; None if the table or
    column is gone, or its type is not one keyrotor supports."""
    pk_type = await column_type(session, table, column)
    return key_type_of(pk_type) if pk_type is not None else None


async def unique_alone(session: AsyncSession, table: str, column: str) -> bool:
    """Whether a unique index (no predicate, no expression) covers ``column`` alone."""
    found = await session.execute(_UNIQUE_ALONE, {"t": quote_ident(table), "c": column})
    return bool(found.scalar_one())


async def primary_key_columns(session: AsyncSession, table: str) -> list[str]:
    """The columns of the table's primary key, in key order (empty without one)."""
    found = (await session.execute(_PRIMARY_KEY, {"t": quote_ident(table)})).scalar_one_or_none()
    return list(found or [])


async def values_by_version(session: AsyncSession, table: str, column: str) -> Sequence[Sequence[Any]]:
    """``(DEK version as text, count)`` of a column's values; version ``''`` counts the values
    that are not ``kr1`` (legacy). NULL and the empty string hold no key and are not counted, as
    the legacy migration skips them. One grouped scan."""
    val = quote_ident(column)
    stmt = text(
        f"SELECT CASE WHEN {val} LIKE 'kr1:%' THEN split_part({val}, ':', 2) ELSE '' END AS v, "
        f"count(*) FROM {quote_ident(table)} WHERE {val} <> '' GROUP BY 1"
    )
    return (await session.execute(stmt)).all()


async def values_by_scope_and_version(
    session: AsyncSession, table: str, column: str, scope_column: str
) -> Sequence[Sequence[Any]]:
    """``(scope, DEK version as text, count)`` of a column whose rows name their scope in
    ``scope_column``; as :func:`values_by_version` otherwise (version ``''``: legacy). One
    grouped scan."""
    val, scope = quote_ident(column), quote_ident(scope_column)
    stmt = text(
        f"SELECT {scope}::text AS s, "
        f"CASE WHEN {val} LIKE 'kr1:%' THEN split_part({val}, ':', 2) ELSE '' END AS v, "
        f"count(*) FROM {quote_ident(table)} WHERE {val} <> '' GROUP BY 1, 2"
    )
    return (await session.execute(stmt)).all()


def page_sql(
    table: str,
    pk_column: str,
    column: str,
    scope_column: str | None,
    key_type: KeyType,
    where: str = "TRUE",
    *,
    first: bool = False,
) -> str:
    """``SELECT pk, value, scope`` of one keyset page of a column (asyncpg parameters): ``$1`` the
    last key seen, ``$2`` the size; with ``first``, no ``$1`` and the size is ``$1``.

    The key is compared in its own type and ordered by the same expression, so the key's index
    serves both. ``scope`` is NULL without a ``scope_column``. ``where`` is keyrotor's own SQL.
    """
    pk, val = quote_ident(pk_column), quote_ident(column)
    scope = f"{quote_ident(scope_column)}::text" if scope_column else "NULL::text"
    after = "" if first else f" AND {pk} > $1::{key_type.sql}"
    return (
        f"SELECT {key_type.select(pk)}, {val}, {scope} FROM {quote_ident(table)} WHERE {val} IS NOT NULL "
        f"AND ({where}){after} ORDER BY {pk} LIMIT ${1 if first else 2}"
    )


def version_index_sql(name: str, table: str, column: str) -> str:
    """The expression index that makes "rows on DEK version N" of a column an index scan."""
    short = re.sub(r"[^A-Za-z0-9_]", "_", name)[:40]
    return (
        f'CREATE INDEX CONCURRENTLY IF NOT EXISTS "ix_kr_{short}_dek_version" ON {quote_ident(table)} '
        f"((split_part({quote_ident(column)}, ':', 2)))"
    )


async def create_index_concurrently(engine: AsyncEngine, index_sql: str) -> None:
    """Run a ``CREATE INDEX CONCURRENTLY`` statement (outside any transaction, as it must be)."""
    async with engine.connect() as conn:
        autocommit = await conn.execution_options(isolation_level="AUTOCOMMIT")
        await autocommit.execute(text(index_sql))
