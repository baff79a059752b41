"""What a column must be for ``keyrotor columns register`` to accept it.

Everything that would stop a rotation half way, or let a retirement's proof miss a row, is
refused here, at registration, in one line that names the reason: a relation that is not a
table, a name another role could resolve to another table, rows hidden by row-level security,
a value column a re-sealed value might not fit or that cannot be written, and a key that is not
one unique, non-NULL column of a supported type. Row-level security is asked again before every
rotation, range and proof (:func:`refuse_hidden_rows`): the worker may run as another role.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from sqlalchemy.ext.asyncio import AsyncSession

from keyrotor.errors import ConfigurationError, Conflict, InvalidInput, NotFound
from keyrotor.store import columns as store
from keyrotor.store.identifiers import quote_ident
from keyrotor.store.key_ranges import KeyType, key_type_of

if TYPE_CHECKING:
    from keyrotor.census.columns import ManagedColumn

# keyrotor's own tables: covered already, never registered.
_OWN_TABLES = ("secrets", "managed_columns", "key_scopes", "data_keys", "rotations")
_KEY_TYPES = "smallint, integer, bigint, uuid, text or varchar"
# pg_class.relkind of the relations a column may be registered in: a table, a partitioned table.
_TABLE_KINDS = ("r", "p")
_RELATION_KINDS = {
    "v": "a view",
    "m": "a materialized view",
    "f": "a foreign table",
    "S": "a sequence",
    "i": "an index",
    "I": "an index",
    "c": "a composite type",
}


class ColumnNotFound(NotFound):
    """The table or column does not exist."""


async def validate(session: AsyncSession, col: ManagedColumn) -> KeyType:
    """Check that the table, the columns and a unique single-column key of a supported type exist,
    and that rotation can write every value back (refused here, never in the middle of a run).

    Returns:
        The key's type.

    Raises:
        ColumnNotFound: the table or a column does not exist.
        Conflict: the table is one of keyrotor's own.
        InvalidInput: an unqualified table name resolves outside ``public``; row-level
            security hides rows of the table from this role; the relation is not a table (a
            view, a materialized view, ...); the value column is not text or unbounded
            varchar, or is generated; the key's type is not supported, the key is part of a
            composite primary key with no unique index of its own, or not unique, or may be
            NULL; or the scope column is not text.
    """
    await _check_relation(session, col)
    await _check_value_column(session, col)
    key_type = await _check_key_column(session, col)
    if col.scope_column is not None:
        scope_type = await store.column_type(session, col.table, col.scope_column)
        if scope_type is None:
            raise ColumnNotFound(f"scope column {col.table}.{col.scope_column} does not exist")
        if scope_type not in ("text",) and not scope_type.startswith("character varying"):
            raise InvalidInput(f"scope column {col.table}.{col.scope_column} is {scope_type}, not text")
    return key_type


async def _check_relation(session: AsyncSession, col: ManagedColumn) -> None:
    """Refuse a relation that is not one table every role resolves alike and sees all of."""
    found = await store.relation(session, col.table)
    if found is None:
        raise ColumnNotFound(f"table {col.table!r} does not exist")
    # By the relation the name resolves to: billing.secrets is an application's table.
    if await store.same_relation(session, col.table, _OWN_TABLES):
        raise Conflict(f"{col.table!r} is keyrotor's own table; it is covered already")
    kind, schema = found
    if "." not in col.table and schema != "public":
        # Every connection resolves an unqualified name through its own role's search_path: the
        # worker could rotate, and a proof count, another table of that name, or find none.
        raise InvalidInput(
            f"{col.table} is {schema}.{col.table} through this connection's search_path: register "
            f"{schema}.{col.name}, so that every role finds the same table"
        )
    if await store.hidden_by_row_security(session, [col.table]):
        raise InvalidInput(_hidden_rows_message(col.table))
    if kind not in _TABLE_KINDS:
        # A view's rows are another table's (register that one); the others cannot be updated.
        described = _RELATION_KINDS.get(kind, f"a relation of kind {kind!r}")
        raise InvalidInput(
            f"{col.table} is {described}, not a table: register the table that holds the values"
        )


async def _check_key_column(session: AsyncSession, col: ManagedColumn) -> KeyType:
    """The key's type; refused unless one unique, non-NULL column of a supported type."""
    pk_type = await store.column_type(session, col.table, col.pk_column)
    if pk_type is None:
        raise ColumnNotFound(f"key column {col.table}.{col.pk_column} does not exist")
    key_type = key_type_of(pk_type)
    if key_type is None:
        raise InvalidInput(f"key column {col.table}.{col.pk_column} is {pk_type}; it must be {_KEY_TYPES}")
    if not await store.unique_alone(session, col.table, col.pk_column):
        await _refuse_composite(session, col)
        raise InvalidInput(
            f"key column {col.table}.{col.pk_column} is not unique "
            "(no primary key or unique index on it alone)"
        )
    if not (await store.column_flags(session, col.table, col.pk_column))[0]:
        # A unique index admits any number of NULL keys, and no key range or cursor ever
        # reaches a NULL: such rows would stay on their version and block its retirement.
        raise InvalidInput(
            f"key column {col.table}.{col.pk_column} may be NULL (a row with a NULL key is never "
            f"rotated): make it NOT NULL (ALTER TABLE {quote_ident(col.table)} ALTER COLUMN "
            f"{quote_ident(col.pk_column)} SET NOT NULL)"
        )
    return key_type


async def _check_value_column(session: AsyncSession, col: ManagedColumn) -> None:
    """Refuse a value column rotation could not write every re-sealed value back to."""
    value_type = await store.column_type(session, col.table, col.column)
    if value_type is None:
        raise ColumnNotFound(f"column {col.name!r} does not exist")
    if value_type.startswith("character varying("):
        # A re-sealed value is longer than the one it replaces when the version gains a digit,
        # and a migrated legacy value is longer still: Postgres would refuse the write (it never
        # truncates on assignment) and the run would stop half way, so refuse it now.
        raise InvalidInput(
            f"column {col.name!r} is {value_type}: a re-sealed value may not fit; make it text "
            f"first (ALTER TABLE {quote_ident(col.table)} ALTER COLUMN {quote_ident(col.column)} "
            "TYPE text rewrites nothing)"
        )
    if value_type not in ("text", "character varying"):
        raise InvalidInput(f"column {col.name!r} is {value_type}, not text")
    if (await store.column_flags(session, col.table, col.column))[1]:
        raise InvalidInput(
            f"{col.name} is a generated column: it cannot be written; register the column it is computed from"
        )


async def _refuse_composite(session: AsyncSession, col: ManagedColumn) -> None:
    """Refuse, in one line that says what to do, a key column that is part of a composite key."""
    columns = await store.primary_key_columns(session, col.table)
    if len(columns) > 1:
        raise InvalidInput(
            f"{col.table} has a composite primary key ({', '.join(columns)}); composite keys are not "
            f"supported: add a single-column unique key (e.g. CREATE UNIQUE INDEX ON {col.table} "
            f"({col.pk_column}) if {col.pk_column} alone is unique, or a uuid/bigserial column) and "
            "register with --pk naming it"
        )


async def refuse_hidden_rows(session: AsyncSession, cols: list[ManagedColumn]) -> None:
    """Refuse to work on columns whose table shows this database role only the rows a
    row-level security policy lets it see.

    A rotation would skip the rows it cannot see, and a retirement's proof would not count
    them: the version would be retired, then destroyed, with values still on it. The worker
    may run as another role than the one that registered the column, and a policy may be
    added later, so every rotation, range and proof asks again (one query).

    Raises:
        ConfigurationError: naming the first such table.
    """
    hidden = await store.hidden_by_row_security(session, sorted({c.table for c in cols}))
    if hidden:
        raise ConfigurationError(_hidden_rows_message(hidden[0]))


def _hidden_rows_message(table: str) -> str:
    return (
        f"row-level security on {table} hides rows from this database role: keyrotor could not "
        "rotate or count them; run it as the table's owner or a role with BYPASSRLS"
    )


async def refuse_concurrent_index(session: AsyncSession, col: ManagedColumn) -> None:
    """Refuse ``--create-index`` on a partitioned table: Postgres cannot build an index on one
    ``CONCURRENTLY``, and the registration would be left without the index it asked for.

    Raises:
        InvalidInput: the table is partitioned.
    """
    found = await store.relation(session, col.table)
    if found is not None and found[0] == "p":
        raise InvalidInput(
            f"{col.table} is partitioned: Postgres cannot build its index CONCURRENTLY; create it on "
            "each partition (or with a plain CREATE INDEX, which blocks writes) and register without "
            "--create-index"
        )
