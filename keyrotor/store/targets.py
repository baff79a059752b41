"""The ciphertext columns rotation covers, and their statements on the asyncpg fast path.

A :class:`Target` describes one column of ``kr1`` ciphertexts: its table, key column, value
column, which scope its rows belong to, and how to compute the AAD context of a row. keyrotor's
own ``secrets`` table is the first target (:data:`SECRETS`); applications register their own
columns the same way (:func:`register_target`).

A target's key is one column of any type :class:`KeyType` covers (smallint, integer, bigint,
uuid, text, varchar); every statement binds its parameters in the key's own type. The
statements run on the raw asyncpg connection of the SQLAlchemy session (prepared once per
connection): the measured fast path of re-encryption. One batch is::

    SELECT id, value, ... FROM t WHERE <scope> AND <version = v> AND id > :after AND id <= :hi
      ORDER BY id LIMIT :n FOR UPDATE SKIP LOCKED
    UPDATE t SET value = u.new FROM unnest(:ids, :old, :new) AS u(id, old, new)
      WHERE t.id = u.id AND t.value = u.old            -- compare-and-swap

One version at a time. For ``secrets`` the query is an ordered range of the ``(scope_id, id)``
index filtered on the version: no index holds ``dek_version``, so the update is a HOT update
(migration 0013).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from functools import cached_property
from typing import Any

from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncSession

from keyrotor.errors import ConfigurationError
from keyrotor.store.identifiers import quote_ident
from keyrotor.store.key_ranges import INTEGER_KEY, MAX_ID, Key, KeyType, key_bounds

# Joins the values of one batch into one parameter: a character no ``kr1`` value contains.
SEPARATOR = ","


@dataclass(frozen=True)
class Target:
    """A column of ``kr1`` ciphertexts that rotation re-encrypts.

    Args:
        name: stable name (in range rows, job ids and error messages), e.g. ``secrets``.
        table: the table (``schema.table`` allowed).
        id_column: the single-column key (unique); its type is ``key_type``.
        value_column: the ``kr1`` text column.
        context: ``context(row_id, extra)`` -> the AAD context the value was sealed with;
            ``extra`` holds the values of ``context_columns``.
        context_columns: more columns the context needs (``("name",)`` for secrets).
        scope_id_column: the column holding ``key_scopes.id`` -- or, instead:
        scope: the one scope every row of the table belongs to -- or:
        scope_name_column: a text column holding the scope's *name* (application tables,
            e.g. ``settings.provider``).
        version_column: an integer column kept equal to the value's DEK version (indexed with
            the scope column for fast lookups); None: the version is read from the value's prefix.
        key_type: the key's type (:data:`INTEGER_KEY` for smallint, integer and bigint keys).
        context_prefix: when every row's context is this text followed by its key text (the
            first of ``context_columns`` if any, else the row key as ``str``), that text: a
            batch's contexts are then built without a call a row (:meth:`contexts`). It must
            agree with ``context``; None: ``context`` is called for each row.
    """

    name: str
    table: str
    id_column: str
    value_column: str
    context: Callable[[Any, tuple[Any, ...]], str] = field(compare=False)
    context_columns: tuple[str, ...] = ()
    scope_id_column: str | None = None
    scope: str | None = None
    version_column: str | None = None
    scope_name_column: str | None = None
    key_type: KeyType = INTEGER_KEY
    context_prefix: str | None = None

    def __post_init__(self) -> None:
        sources = (self.scope_id_column, self.scope, self.scope_name_column)
        if sum(s is not None for s in sources) != 1:
            raise ConfigurationError(
                f"target {self.name!r}: give exactly one of scope_id_column, scope_name_column and scope"
            )
        for ident in (self.table, self.id_column, self.value_column, *self.context_columns):
            quote_ident(ident)
        for optional in (self.scope_id_column, self.version_column, self.scope_name_column):
            if optional is not None:
                quote_ident(optional)

    def covers(self, scope: str) -> bool:
        """Whether rows of ``scope`` may live in this target."""
        return self.scope is None or self.scope == scope

    def contexts(self, rows: Sequence[Any]) -> list[str]:
        """The AAD context of each of ``rows`` (as :func:`lock_batch` returns them), in order."""
        prefix = self.context_prefix
        if prefix is None:
            context_of = self.context
            return [context_of(row[0], row[2:]) for row in rows]
        # The key text follows the prefix: the first context column if any, else the row key.
        if self.context_columns:
            return [prefix + row[2] for row in rows]
        return [prefix + str(row[0]) for row in rows]

    @cached_property
    def sql(self) -> TargetSql:
        """The statements of this target."""
        return TargetSql(self)


class TargetSql:
    """The statements of one target, with asyncpg ``$n`` parameters. ``$1`` is always the scope id.

    An integer key always binds its upper bound (``MAX_ID`` when open) and its lower one unless
    open (never ``> MIN_ID``: the key ``MIN_ID`` itself would be skipped). Other keys have no
    such bounds, so a range open at one end gets a statement without that side (:meth:`select`,
    :meth:`versions_in_range`).
    """

    def __init__(self, t: Target) -> None:
        table, idc, val = quote_ident(t.table), quote_ident(t.id_column), quote_ident(t.value_column)
        kt = self.key_type = t.key_type
        extra = "".join(f", {quote_ident(c)}" for c in t.context_columns)
        scope = f"{quote_ident(t.scope_id_column)} = $1" if t.scope_id_column else "$1::bigint IS NOT NULL"
        if t.scope_name_column:
            # An uncorrelated subquery: evaluated once, so an index on the name column still serves.
            scope = (
                f"{quote_ident(t.scope_name_column)} = (SELECT name FROM key_scopes WHERE id = $1::bigint)"
            )
        # A value is on a version as its prefix spells it (no leading zero), so that this
        # expression and ``is_v`` agree on every value: ``kr1:01:...`` (which never decrypts) is on
        # no version for either, rather than one a range finds rows of but never selects.
        on_v = f"{val} LIKE ('kr1:' || $2::int || ':%')"
        if t.version_column:
            ver = quote_ident(t.version_column)
            # The prefix is what decrypt reads: a ciphertext put back without its version column
            # (a restored dump, a copied row) is still on its prefix's version, so it is counted
            # and moved with that version's rows rather than left behind when its DEK goes.
            is_v = f"({ver} = $2 OR {on_v})"
            set_version = f", {ver} = $4"
        else:
            ver = f"substring({val} from '^kr1:([1-9][0-9]{{0,8}}):')::int"
            is_v = on_v
            set_version = ""
        older = f"{ver} < $2"
        self._version_expr = ver
        self._idc = idc
        self._table, self._scope = table, scope
        base = f"FROM {table} WHERE {scope} AND {is_v}"
        self._select_head = f"SELECT {kt.select(idc)}, {val}{extra} {base}"
        self._selects: dict[tuple[bool, bool, bool], str] = {}
        self._versions: dict[tuple[bool, bool], str] = {}
        self.update = (
            f"UPDATE {table} AS t SET {val} = u.new{set_version} "
            f"FROM unnest($1::{kt.sql}[], $2::text[], $3::text[]) AS u(id, old, new) "
            f"WHERE t.{idc} = u.id AND t.{val} = u.old"
        )
        # The same, with the old and new values each sent as one text joined by SEPARATOR
        # (asyncpg checks every element of a text[] parameter against three ABCs in Python).
        self.update_joined = (
            f"UPDATE {table} AS t SET {val} = u.new{set_version} "
            f"FROM unnest($1::{kt.sql}[], string_to_array($2::text, '{SEPARATOR}'), "
            f"string_to_array($3::text, '{SEPARATOR}')) AS u(id, old, new) "
            f"WHERE t.{idc} = u.id AND t.{val} = u.old"
        )
        self.has_version_param = bool(t.version_column)
        self.count_version = f"SELECT count(*) {base}"
        # Every row, whatever scope it names: a second-phase value needs the DEK that opens it.
        self.legacy_values = f"SELECT {val} FROM {table} WHERE {val} NOT LIKE 'kr1:%'"
        self.has_legacy_values = f"SELECT EXISTS ({self.legacy_values})"
        self.count_older = f"SELECT count(*) FROM {table} WHERE {scope} AND {older}"
        # k contiguous key buckets of about equal row counts over the rows still to do, each with
        # the least version its rows hold (where a range's first pass starts).
        self.plan = (
            f"SELECT {kt.aggregate('min', 'id')}, {kt.aggregate('max', 'id')}, count(*), min(v) FROM "
            f"(SELECT {idc} AS id, {ver} AS v, ntile($3) OVER (ORDER BY {idc}) AS b "
            f"FROM {table} WHERE {scope} AND {older}) AS s GROUP BY b ORDER BY b"
        )
        self.lock_table = f"LOCK TABLE {table} IN SHARE MODE"

    def select(self, *, after: bool, upper: bool, skip_locked: bool) -> str:
        """``SELECT id, value, extra...`` of one batch: ``$3``/``$4`` the bounds given, then the limit."""
        if self.key_type.integer:
            upper = True
        k = (after, upper, skip_locked)
        if k not in self._selects:
            bounds, n = key_bounds(self._idc, self.key_type, 3, after=after, upper=upper)
            sql = f"{self._select_head}{bounds} ORDER BY {self._idc} LIMIT ${n} FOR UPDATE"
            self._selects[k] = sql + " SKIP LOCKED" if skip_locked else sql
        return self._selects[k]

    def versions_in_range(self, *, after: bool, upper: bool) -> str:
        """The least version of ``$3`` (an ``int[]``) above ``$2`` that a row of the range holds, and
        the least of any; the range's bounds from ``$4``. One read of the range for both."""
        if self.key_type.integer:
            upper = True
        k = (after, upper)
        if k not in self._versions:
            bounds, _ = key_bounds(self._idc, self.key_type, 4, after=after, upper=upper)
            ver = self._version_expr
            self._versions[k] = (
                f"SELECT min(v) FILTER (WHERE v > $2), min(v) FROM (SELECT {ver} AS v "
                f"FROM {self._table} WHERE {self._scope} AND {ver} = ANY($3::int[]){bounds}) AS s"
            )
        return self._versions[k]


def _secret_context(_row_id: int, extra: tuple[Any, ...]) -> str:
    return f"secret:{extra[0]}"


SECRETS = Target(
    name="secrets",
    table="secrets",
    id_column="id",
    value_column="ciphertext",
    context=_secret_context,
    context_columns=("name",),
    scope_id_column="scope_id",
    version_column="dek_version",
    context_prefix="secret:",
)
"""keyrotor's own table; values are sealed with context ``secret:<name>``."""

_registered: list[Target] = []


def register_target(target: Target) -> None:
    """Register an application-owned ciphertext column for every rotation of this process.

    Raises:
        ConfigurationError: another target has the same name.
    """
    if any(t.name == target.name for t in (SECRETS, *_registered)):
        raise ConfigurationError(f"a target named {target.name!r} is registered already")
    _registered.append(target)


def default_targets() -> list[Target]:
    """``secrets`` plus the registered targets."""
    return [SECRETS, *_registered]


# --- the connection ---------------------------------------------------------------------


async def raw_connection(session: AsyncSession) -> Any:
    """The asyncpg connection under the session's transaction (which must have begun)."""
    conn = await session.connection()
    raw = await conn.get_raw_connection()
    apg = raw.driver_connection
    if apg is None or not apg.is_in_transaction():
        # SQLAlchemy's asyncpg adapter sends BEGIN lazily, with its first statement.
        await session.execute(text("SELECT 1"))
    return apg


async def relax_commit(apg: Any) -> None:
    """Let this batch's commit return before its WAL reaches disk (``synchronous_commit = off``).

    Safe for a re-encryption batch: a crash may lose the last few committed batches, but only
    whole transactions -- rows and the cursor that counts them revert together to values the
    old DEK (kept in grace) still opens, and the run redoes them. It saves a disk flush per
    batch. Transactions that must survive a crash (completing a run, destroying a key) do not
    use it.
    """
    await apg.execute("SET LOCAL synchronous_commit = off")


async def durable_commit(apg: Any) -> None:
    """Make this transaction's commit wait for its WAL on disk, whatever the session default."""
    await apg.execute("SET LOCAL synchronous_commit = on")


# --- the statements of a target -----------------------------------------------------------


def _bound_args(target: Target, after: Key | None, hi: Key | None) -> tuple[bool, bool, list[Key]]:
    """Which bounds a statement of ``target`` binds, and their values (integer keys: always the
    upper one; an open lower side is left out, as ``id > MIN_ID`` would skip the key ``MIN_ID``)."""
    if target.key_type.integer:
        return after is not None, True, [*([] if after is None else [after]), MAX_ID if hi is None else hi]
    return after is not None, hi is not None, [b for b in (after, hi) if b is not None]


async def lock_batch(
    apg: Any,
    target: Target,
    scope_id: int,
    version: int,
    *,
    after: Key | None,
    hi: Key | None,
    limit: int,
    skip_locked: bool,
) -> list[Any]:
    """Lock and read up to ``limit`` rows on ``version`` with ``after < id <= hi``, in key order:
    ``(id, value, *context_columns)`` records."""
    has_after, has_hi, bounds = _bound_args(target, after, hi)
    select = target.sql.select(after=has_after, upper=has_hi, skip_locked=skip_locked)
    rows: list[Any] = await apg.fetch(select, scope_id, version, *bounds, limit)
    return rows


def _joined(values: list[str]) -> str | None:
    """``values`` joined by :data:`SEPARATOR`, or None unless ``string_to_array`` gives them back
    exactly: every value non-empty and free of the separator (``kr1`` values always are)."""
    joined = SEPARATOR.join(values)
    if joined.count(SEPARATOR) != len(values) - 1 or not all(values):
        return None
    return joined


async def swap_values(
    apg: Any, target: Target, ids: list[Key], olds: list[str], news: list[str], new_version: int
) -> int:
    """Write ``news`` over the rows whose value is still the matching ``olds`` (compare-and-swap
    against application writes). Returns the rows written."""
    sql = target.sql
    old_text, new_text = _joined(olds), _joined(news)
    statement = sql.update
    args: tuple[object, ...] = (ids, olds, news)
    if old_text is not None and new_text is not None:
        statement, args = sql.update_joined, (ids, old_text, new_text)
    if sql.has_version_param:
        args += (new_version,)
    status = await apg.execute(statement, *args)
    return int(status.rsplit(" ", 1)[-1])


async def count_older(apg: Any, target: Target, scope_id: int, version: int) -> int:
    """Rows of ``target`` in the scope on a version older than ``version``."""
    return int(await apg.fetchval(target.sql.count_older, scope_id, version))


async def count_version(apg: Any, target: Target, scope_id: int, version: int) -> int:
    """Rows of ``target`` in the scope on exactly ``version``."""
    return int(await apg.fetchval(target.sql.count_version, scope_id, version))


async def has_legacy_values(apg: Any, target: Target) -> bool:
    """Whether ``target`` holds a value that is not ``kr1`` (the old backend's), in any row."""
    return bool(await apg.fetchval(target.sql.has_legacy_values))


async def count_legacy_values(
    apg: Any, target: Target, opens: Callable[[str], bool], *, page: int = 2_000
) -> int:
    """How many values of ``target`` (in any row, whatever scope its row names) are not ``kr1``
    (the old backend's) and pass ``opens``. Read through a cursor ``page`` values at a time, in
    the caller's transaction: a table the old backend filled is not held in memory, and the
    event loop runs between pages."""
    n = 0
    async for record in apg.cursor(target.sql.legacy_values, prefetch=page):
        n += opens(record[0])
    return n


async def key_buckets(apg: Any, target: Target, scope_id: int, new_version: int, k: int) -> Sequence[Any]:
    """``k`` contiguous ``(first key, last key, rows, least version)`` buckets of the rows older
    than ``new_version``."""
    buckets: Sequence[Any] = await apg.fetch(target.sql.plan, scope_id, new_version, k)
    return buckets


async def versions_in_range(
    apg: Any,
    target: Target,
    scope_id: int,
    versions: Sequence[int],
    current: int,
    after: Key | None,
    hi: Key | None,
) -> tuple[int | None, int | None]:
    """Of ``versions``, the least that a row of ``target`` with ``after < id <= hi`` holds above
    ``current``, and the least it holds at all (None: no such row)."""
    has_after, has_hi, bounds = _bound_args(target, after, hi)
    sql = target.sql.versions_in_range(after=has_after, upper=has_hi)
    row = await apg.fetchrow(sql, scope_id, current, list(versions), *bounds)
    return row[0], row[1]


async def lock_target(apg: Any, target: Target) -> None:
    """Lock ``target``'s table in SHARE mode until the transaction ends (writers wait)."""
    await apg.execute(target.sql.lock_table)


async def read_page(session: AsyncSession, sql: str, *args: Any) -> list[Any]:
    """The rows of one keyset page read with ``sql`` (asyncpg parameters ``args``) on the
    session's connection, in the caller's transaction."""
    apg = (await (await session.connection()).get_raw_connection()).driver_connection
    assert apg is not None
    rows: list[Any] = await apg.fetch(sql, *args)
    return rows
