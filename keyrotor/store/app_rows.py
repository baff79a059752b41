"""Reads of the application's own rows, in the tables and columns registered with keyrotor.

Their names come from the registry (``managed_columns``), never from a caller, and each is
checked to be a plain SQL identifier before it is quoted into a statement.
"""

from __future__ import annotations

from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncSession

from keyrotor.store.identifiers import quote_ident
from keyrotor.store.key_ranges import Key


async def scope_and_value(
    session: AsyncSession,
    *,
    table: str,
    column: str,
    pk_column: str,
    key_sql_type: str,
    key: Key,
    scope_column: str | None,
) -> tuple[str | None, str] | None:
    """``(row scope, stored value)`` of the row whose key is ``key``, or None if there is none.

    The row scope is the text of ``scope_column``, or None for a column without one.
    """
    scope = f"{quote_ident(scope_column)}::text" if scope_column else "NULL::text"
    row = (
        await session.execute(
            text(
                f"SELECT {scope}, {quote_ident(column)} FROM {quote_ident(table)} "
                f"WHERE {quote_ident(pk_column)} = CAST(:k AS {key_sql_type})"
            ),
            {"k": key},
        )
    ).first()
    return None if row is None else (row[0], row[1])
