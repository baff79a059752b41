"""Managed columns: application-owned ``kr1`` columns that keyrotor rotates, retires and verifies.

An application that keeps ciphertexts in its own tables registers each column once::

    keyrotor columns register settings.api_key --pk id --scope-column provider

and then seals values with the row's context (default ``<table>.<column>:<pk>``)::

    token = await km.encrypt(row.provider, api_key, context=f"settings.api_key:{row.id}")
    api_key = await km.decrypt(row.provider, token, context=f"settings.api_key:{row.id}")

Every registered column becomes a :class:`keyrotor.rotation.reencrypt.Target`, so a DEK rotation
re-encrypts it, a retirement proves no row of it still uses the old version, ``verify`` opens
every value, and ``keyrotor legacy migrate`` converts its legacy values.

Identifiers are validated against ``information_schema`` and always quoted (never formatted into
SQL unquoted). The key must be one column with a unique index of its own, of type smallint,
integer, bigint, uuid, text or varchar (:class:`keyrotor.store.key_ranges.KeyType`): rotation splits a
table into key ranges, pages it in key order and writes back with ``unnest($keys::<type>[])``.
A composite primary key is refused: a row must be named by one column.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, replace
from datetime import datetime
from typing import TYPE_CHECKING, Any

from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession, async_sessionmaker

from keyrotor.audit.log import record_config_change

# ColumnNotFound is raised by register() (through validate) and is part of this module's API.
from keyrotor.census.column_checks import ColumnNotFound as ColumnNotFound
from keyrotor.census.column_checks import refuse_concurrent_index, refuse_hidden_rows, validate
from keyrotor.census.locations import PK_PLACEHOLDER, SECRETS_TEMPLATE, context_prefix, templates_collide
from keyrotor.errors import Conflict, InvalidInput, NotFound
from keyrotor.inputs import check_scope
from keyrotor.store import columns as store
from keyrotor.store import db
from keyrotor.store.key_ranges import INTEGER_KEY, KeyType
from keyrotor.store.targets import Target

# The actor of a registration made in code without one (the CLI passes --as or the default actor).
SYSTEM_ACTOR = "system"

if TYPE_CHECKING:
    from keyrotor.rotation.context import RotationContext

_IDENT = re.compile(r"[A-Za-z_][A-Za-z0-9_]{0,62}")


class ColumnNotRegistered(NotFound):
    """The column is not registered."""


def _ident(name: str, what: str) -> str:
    if not _IDENT.fullmatch(name):
        raise InvalidInput(f"{what} {name[:80]!r} is not a plain SQL identifier ([A-Za-z_][A-Za-z0-9_]*)")
    return name


def parse_column(spec: str) -> tuple[str, str]:
    """Split ``TABLE.COLUMN`` or ``SCHEMA.TABLE.COLUMN`` into ``(table, column)``.

    Raises:
        InvalidInput: not two or three plain identifiers joined by dots.
    """
    parts = spec.split(".")
    if len(parts) not in (2, 3):
        raise InvalidInput(f"expected TABLE.COLUMN or SCHEMA.TABLE.COLUMN, got {spec[:80]!r}")
    for p in parts:
        _ident(p, "name")
    return ".".join(parts[:-1]), parts[-1]


@dataclass(frozen=True)
class ManagedColumn:
    """One row of ``managed_columns``."""

    table: str
    column: str
    pk_column: str
    scope_column: str | None
    scope: str | None
    context_template: str
    registered_at: datetime | None = None
    key_type: KeyType = INTEGER_KEY  # read from the catalog (:func:`list_columns`), not stored

    @property
    def name(self) -> str:
        """``table.column``: the target's name in runs, ranges and reports."""
        return f"{self.table}.{self.column}"

    def context(self, pk: object) -> str:
        """The AAD context of the row whose key is ``pk``."""
        return self.context_template.replace(PK_PLACEHOLDER, str(pk))

    def target(self) -> Target:
        """The rotation target of this column (the version is read from the ``kr1:`` prefix)."""
        template = self.context_template

        def context(row_id: object, _extra: tuple[Any, ...]) -> str:
            return template.replace(PK_PLACEHOLDER, str(row_id))

        return ManagedTarget(
            name=self.name,
            table=self.table,
            id_column=self.pk_column,
            value_column=self.column,
            context=context,
            scope=self.scope,
            scope_name_column=self.scope_column,
            key_type=self.key_type,
            context_prefix=context_prefix(template),
        )

    def page_sql(self, where: str = "TRUE", *, first: bool = False) -> str:
        """``SELECT pk, value, scope`` of one keyset page (:func:`keyrotor.store.columns.page_sql`):
        ``$1`` the last key seen, ``$2`` the size; with ``first``, the size is ``$1``. ``scope``
        is NULL for a fixed-scope column (use :meth:`scope_of`)."""
        return store.page_sql(
            self.table, self.pk_column, self.column, self.scope_column, self.key_type, where, first=first
        )

    def scope_of(self, row_scope: str | None) -> str | None:
        """The scope of a row, given the scope column's value from :meth:`page_sql`."""
        return self.scope if self.scope is not None else row_scope

    def index_sql(self) -> str:
        """The expression index that makes "rows on DEK version N" an index scan."""
        return store.version_index_sql(self.name, self.table, self.column)

    def as_dict(self) -> dict[str, Any]:
        return {
            "column": self.name,
            "table": self.table,
            "value_column": self.column,
            "pk": self.pk_column,
            "scope_column": self.scope_column,
            "scope": self.scope,
            "context_template": self.context_template,
            "registered_at": self.registered_at.isoformat() if self.registered_at else None,
            "index_recommendation": self.index_sql(),
        }


@dataclass(frozen=True)
class ManagedTarget(Target):
    """A target built from a ``managed_columns`` row (replaced on every refresh)."""


async def list_columns(session: AsyncSession) -> list[ManagedColumn]:
    """Every registered column, by name, each with its key's type as the catalog has it now."""
    out = []
    for row in await store.managed_columns(session):
        col = ManagedColumn(*row)
        # A key whose type changed to one not supported (or a dropped table) keeps the integer
        # statements: they fail, naming the column, rather than the column silently dropping out.
        kt = await store.key_type(session, col.table, col.pk_column)
        out.append(replace(col, key_type=kt or INTEGER_KEY))
    return out


async def load_targets(sessions: async_sessionmaker[AsyncSession]) -> list[Target]:
    """The targets of every registered column.

    Raises:
        ConfigurationError: row-level security hides rows of a column's table from this role.
    """
    async with db.transaction(sessions) as session:
        cols = await list_columns(session)
        await refuse_hidden_rows(session, cols)
        return [c.target() for c in cols]


async def refresh_targets(rc: RotationContext) -> None:
    """Bring ``rc``'s targets up to date with ``managed_columns`` (one query).

    Targets given in code (``secrets``, :func:`keyrotor.rotation.reencrypt.register_target`, tests) stay;
    the managed ones are replaced, so a column registered after the worker started is covered
    by the next rotation, retirement or range job.
    """
    _replace_managed(rc, await load_targets(rc.sessions))


async def freeze_targets(rc: RotationContext, session: AsyncSession) -> None:
    """Lock the registry (``managed_columns`` in SHARE mode) in the caller's transaction and bring
    ``rc``'s targets up to date from it: until that transaction ends, no column is registered or
    unregistered, so what it counts and what the census calls covered are the same columns.

    Raises:
        ConfigurationError: row-level security hides rows of a column's table from this role.
    """
    await store.lock_managed_columns(session)
    cols = await list_columns(session)
    await refuse_hidden_rows(session, cols)
    _replace_managed(rc, [c.target() for c in cols])


def _replace_managed(rc: RotationContext, loaded: list[Target]) -> None:
    kept = [t for t in rc.all_targets if not isinstance(t, ManagedTarget)]
    names = {t.name for t in kept}
    rc.targets = kept + [t for t in loaded if t.name not in names]


def _refuse_secrets_collision(template: str, key_type: KeyType) -> None:
    """Refuse a template whose contexts could be those of keyrotor's own ``secrets`` table.

    keyrotor seals its secrets with the context ``secret:<name>`` (``SECRETS_TEMPLATE``), and a
    name may be any printable text. A template that can spell that prefix would bind a row of the
    column to the AAD of a named secret, so a value could be moved between the two and still
    open. The literal text before the first ``{pk}`` can spell it; so can a text or uuid key
    that follows a shorter literal (``{pk}``, ``se{pk}``); an integer key cannot.

    Raises:
        InvalidInput: the template collides.
    """
    prefix = SECRETS_TEMPLATE.split(PK_PLACEHOLDER)[0]
    before = template.split(PK_PLACEHOLDER)[0]
    if before.startswith(prefix) or (not key_type.integer and prefix.startswith(before)):
        raise InvalidInput(
            f"context template {template!r} collides with keyrotor's own secrets table "
            f"(contexts {SECRETS_TEMPLATE!r}): choose another prefix, e.g. the default "
            "<table>.<column>:{pk}"
        )


def _refuse_column_collision(col: ManagedColumn, key_type: KeyType, registered: list[ManagedColumn]) -> None:
    """Refuse a template whose contexts could be those of another registered column of a scope
    they may share (the AAD holds the scope, so columns of two fixed scopes never collide).

    Two such columns share AADs, so a value could be moved from a row of one to a row of the
    other and still open; and the census would count the one's location as covered by the
    other, so a retirement proven on the other column could destroy the DEK of values left in
    the first once it is unregistered.

    Raises:
        InvalidInput: the template collides.
    """
    for other in registered:
        shared = col.scope is None or other.scope is None or col.scope == other.scope
        if not shared or other.name == col.name:
            continue
        if templates_collide(
            col.context_template, key_type.integer, other.context_template, other.key_type.integer
        ):
            raise InvalidInput(
                f"context template {col.context_template!r} collides with registered column "
                f"{other.name} (contexts {other.context_template!r}) in a scope they share: choose "
                "another prefix, e.g. the default <table>.<column>:{pk}"
            )


async def _refuse_repeats(session: AsyncSession, col: ManagedColumn, key_type: KeyType) -> None:
    """Refuse a column registered already under another name of its table (``settings`` and
    ``public.settings``): it would have two context templates, so a rotation would fail on
    the rows sealed with the other's, and the census would count its rows twice. Then
    :func:`_refuse_column_collision` against every registered column.

    Raises:
        Conflict: naming the registration it repeats.
        InvalidInput: see :func:`_refuse_column_collision`.
    """
    registered = await list_columns(session)
    for other in registered:
        same_column = other.column == col.column and other.table != col.table
        if same_column and await store.same_relation(session, col.table, [other.table]):
            raise Conflict(f"column {col.name!r} is registered already as {other.name}")
    _refuse_column_collision(col, key_type, registered)


def _new_column(
    spec: str, pk: str, scope_column: str | None, scope: str | None, context_template: str | None
) -> ManagedColumn:
    """The column ``register`` is asked for, its names and template checked (not yet the database)."""
    table, column = parse_column(spec)
    _ident(pk, "key column")
    if (scope_column is None) == (scope is None):
        raise InvalidInput("give exactly one of --scope-column COLUMN and --scope NAME")
    if scope_column is not None:
        _ident(scope_column, "scope column")
    if scope is not None:
        check_scope(scope)
    template = context_template if context_template is not None else f"{table}.{column}:{PK_PLACEHOLDER}"
    if PK_PLACEHOLDER not in template:
        raise InvalidInput("the context template must contain {pk}, so a value is bound to its row")
    return ManagedColumn(table, column, pk, scope_column, scope, template)


async def register(
    sessions: async_sessionmaker[AsyncSession],
    spec: str,
    *,
    pk: str,
    scope_column: str | None = None,
    scope: str | None = None,
    context_template: str | None = None,
    create_index: bool = False,
    actor: str = SYSTEM_ACTOR,
) -> ManagedColumn:
    """Register ``TABLE.COLUMN`` (see the module docstring); audited as a ``config_change``
    (``managed_column``) by ``actor`` in the same transaction.

    Args:
        spec: ``table.column`` or ``schema.table.column``.
        pk: the unique key column (smallint, integer, bigint, uuid, text or varchar).
        scope_column: a text column of the row naming its scope -- or, instead:
        scope: the one scope of every row.
        context_template: the AAD context with ``{pk}`` for the row's key; default
            ``<table>.<column>:{pk}``.
        create_index: also create the recommended expression index (``CONCURRENTLY``).

    Returns:
        The registered column.

    Raises:
        InvalidInput: bad names, both or neither scope source, a context template that could
            give a context of keyrotor's own ``secrets`` table (``secret:<name>``) or of another
            registered column of a scope they may share, or see :func:`validate`.
        ColumnNotFound: the table or a column does not exist.
        Conflict: the column is registered already (under this name or another name of its
            table, ``public.settings`` for ``settings``), or is in one of keyrotor's own tables.
    """
    col = _new_column(spec, pk, scope_column, scope, context_template)
    async with db.transaction(sessions) as session:
        key_type = await validate(session, col)
        if create_index:  # refused now, not after the registration commits
            await refuse_concurrent_index(session, col)
        _refuse_secrets_collision(col.context_template, key_type)
        await store.lock_managed_columns_for_change(session)
        await _refuse_repeats(session, col, key_type)
        inserted = await store.insert_managed_column(
            session,
            col.table,
            col.column,
            pk=pk,
            scope_column=scope_column,
            scope=scope,
            context_template=col.context_template,
        )
        if inserted is None:
            raise Conflict(f"column {col.name!r} is registered already (unregister it first to change it)")
        # What retirement counts as covered changes with it: who changed it is on the record.
        registered = replace(col, registered_at=inserted, key_type=key_type)
        await record_config_change(session, actor, "managed_column", None, registered.as_dict())
    if create_index:
        engine: AsyncEngine = sessions.kw["bind"]
        await store.create_index_concurrently(engine, col.index_sql())
    return registered


async def unregister(
    sessions: async_sessionmaker[AsyncSession], spec: str, *, actor: str = SYSTEM_ACTOR
) -> None:
    """Stop covering ``TABLE.COLUMN`` (its values and the table are left alone); audited as a
    ``config_change`` (``managed_column``) by ``actor`` in the same transaction.

    Raises:
        ColumnNotRegistered: it is not registered.
    """
    table, column = parse_column(spec)
    async with db.transaction(sessions) as session:
        before = next(
            (c for c in await list_columns(session) if (c.table, c.column) == (table, column)), None
        )
        gone = await store.delete_managed_column(session, table, column)
        if not gone:
            raise ColumnNotRegistered(f"column {table}.{column} is not registered")
        await record_config_change(
            session, actor, "managed_column", None if before is None else before.as_dict(), None
        )


async def census(session: AsyncSession) -> list[dict[str, Any]]:
    """Per registered column: legacy values left and ``kr1`` rows by DEK version (``status``).

    One grouped scan a column (the expression index of :meth:`ManagedColumn.index_sql` does not
    help a full census; it serves "rows on version N").
    """
    return [{k: v for k, v in c.items() if k != "rows_by_scope"} for c in await census_by_scope(session)]


async def census_by_scope(session: AsyncSession) -> list[dict[str, Any]]:
    """:func:`census`, each column also with ``rows_by_scope``: ``{scope: {version: count}}`` of
    its ``kr1`` values (a fixed-scope column's are all its scope's). Still one grouped scan a
    column, grouped by the scope column too where there is one."""
    out = []
    for col in await list_columns(session):
        per_scope: dict[str, dict[str, int]] = {}
        if col.scope_column is None:
            counted = await store.values_by_version(session, col.table, col.column)
            rows = [(col.scope, v, n) for v, n in counted]
        else:
            by_scope = store.values_by_scope_and_version
            rows = [(s, v, n) for s, v, n in await by_scope(session, col.table, col.column, col.scope_column)]
        by_version: dict[str, int] = {}
        for scope, v, n in rows:
            if v:
                by_version[str(v)] = by_version.get(str(v), 0) + int(n)
                if scope is not None:
                    of_scope = per_scope.setdefault(str(scope), {})
                    of_scope[str(v)] = of_scope.get(str(v), 0) + int(n)
        out.append(
            {
                "column": col.name,
                "scope": col.scope,
                "scope_column": col.scope_column,
                "legacy": sum(int(n) for _, v, n in rows if not v),
                "rows_by_version": dict(sorted(by_version.items(), key=lambda kv: (len(kv[0]), kv[0]))),
                "rows_by_scope": per_scope,
            }
        )
    return out
