"""Where legacy values live: keyrotor's ``secrets`` and every registered application column
(:mod:`keyrotor.census.columns`), each with the statements of :mod:`keyrotor.store.legacy`.
"""

from __future__ import annotations

from keyrotor.census.columns import ManagedColumn, list_columns
from keyrotor.keys import KeyManager
from keyrotor.store import db
from keyrotor.store.identifiers import quote_ident as _quote
from keyrotor.store.key_ranges import Key
from keyrotor.store.legacy import SECRETS_SOURCE, ColumnSource, Source
from keyrotor.store.legacy import column_source as _column_statements


def column_source(col: ManagedColumn) -> ColumnSource:
    """The legacy source of a registered column (its identifiers quoted)."""
    return _column_statements(
        col.name,
        table=_quote(col.table),
        pk=_quote(col.pk_column),
        value=_quote(col.column),
        scope_column=_quote(col.scope_column) if col.scope_column else None,
        key_type=col.key_type,
        fixed_scope=col.scope,
        template=col.context_template,
    )


async def sources(km: KeyManager) -> list[Source]:
    """``secrets`` and every registered column."""
    async with db.transaction(km.sessions) as session:
        cols = await list_columns(session)
    return [SECRETS_SOURCE, *(column_source(c) for c in cols)]


def row_context(src: Source, row_id: Key, stored_context: str | None) -> str:
    """The context a row's new ``kr1`` value is sealed with: the column's template with the
    row's key, or the context the row's statement gave (``secret:<name>``)."""
    if isinstance(src, ColumnSource) and src.template is not None:
        return src.template.replace("{pk}", str(row_id))
    return stored_context or ""
