"""Batched re-encryption of ciphertext columns under a scope's new DEK.

Rotation re-encrypts every value of a scope wherever it lives. A :class:`Target` describes one
column of ``kr1`` ciphertexts: its table, id column, value column, which scope its rows belong
to, and how to compute the AAD context of a row. keyrotor's own ``secrets`` table is the first
target (:data:`SECRETS`); applications register their own columns the same way (e.g.
``settings.api_key`` with context ``settings.api_key:<pk>``) and rotation covers them alike.

A target's key is one column of any type :class:`KeyType` covers (smallint, integer, bigint,
uuid, text, varchar); every statement binds its parameters in the key's own type.

One batch is one transaction (DESIGN.md, steps 3-5)::

    SELECT id, value, ... FROM t WHERE <scope> AND <version = v> AND id > :after AND id <= :hi
      ORDER BY id LIMIT :n FOR UPDATE SKIP LOCKED
    -- in Python: decrypt with the old DEK, encrypt with the new, decrypt the new and compare
    UPDATE t SET value = u.new FROM unnest(:ids, :old, :new) AS u(id, old, new)
      WHERE t.id = u.id AND t.value = u.old            -- compare-and-swap

One version at a time, so the query is an exact, ordered range of the
``(scope_id, dek_version, id)`` index. The statements run on the raw asyncpg connection of the
SQLAlchemy session (prepared once per connection): the measured fast path. A value that fails
to decrypt raises :class:`RowFailed` naming the table and row key, and nothing of its batch is
written.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from functools import cached_property
from typing import Any

from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncSession

from keyrotor import metrics
from keyrotor.census.locations import location_of, record_batch
from keyrotor.crypto import envelope
from keyrotor.errors import ConfigurationError, DecryptionFailed, KeyrotorError, KeyVersionTooOld
from keyrotor.kek.base import WrappedDek
from keyrotor.store.key_ranges import (
    INTEGER_KEY,
    MAX_ID,
    MIN_ID,
    Key,
    KeyType,
    PlannedRange,
    key_bounds,
    ranges_from_buckets,
    show_key,
)

_IDENT = re.compile(r"[A-Za-z_][A-Za-z0-9_]{0,62}")


class RowFailed(DecryptionFailed):
    """A stored value could not be re-encrypted (tampered, or under a key that no longer decrypts)."""

    def __init__(self, target: str, row_id: Key, cause: KeyrotorError | str) -> None:
        reason = f"{type(cause).__name__}: {cause}" if isinstance(cause, KeyrotorError) else cause
        super().__init__(f"{target} row id={show_key(row_id)} could not be re-encrypted: {reason}")
        self.target = target
        self.row_id = row_id
        self.reason = reason

    def __reduce__(self) -> tuple[type[RowFailed], tuple[str, Key, str]]:
        # arq pickles a failed job's exception into its result; keep it loadable.
        return (type(self), (self.target, self.row_id, self.reason))


def _quote(name: str) -> str:
    parts = name.split(".")
    if not 1 <= len(parts) <= 2 or not all(_IDENT.fullmatch(p) for p in parts):
        raise ConfigurationError(f"not a plain SQL identifier: {name[:80]!r}")
    return ".".join(f'"{p}"' for p in parts)


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

    def __post_init__(self) -> None:
        sources = (self.scope_id_column, self.scope, self.scope_name_column)
        if sum(s is not None for s in sources) != 1:
            raise ConfigurationError(
                f"target {self.name!r}: give exactly one of scope_id_column, scope_name_column and scope"
            )
        for ident in (self.table, self.id_column, self.value_column, *self.context_columns):
            _quote(ident)
        for optional in (self.scope_id_column, self.version_column, self.scope_name_column):
            if optional is not None:
                _quote(optional)

    def covers(self, scope: str) -> bool:
        """Whether rows of ``scope`` may live in this target."""
        return self.scope is None or self.scope == scope

    @cached_property
    def sql(self) -> _TargetSql:
        return _TargetSql(self)


class _TargetSql:
    """The statements of one target, with asyncpg ``$n`` parameters. ``$1`` is always the scope id.

    An integer key always binds both bounds (``MIN_ID``/``MAX_ID`` when open): one statement, as
    fast as it ever was for ``secrets``. Other keys have no such bounds, so a range open at one
    end gets a statement without that side (:meth:`select`, :meth:`exists_in_range`).
    """

    def __init__(self, t: Target) -> None:
        table, idc, val = _quote(t.table), _quote(t.id_column), _quote(t.value_column)
        kt = self.key_type = t.key_type
        extra = "".join(f", {_quote(c)}" for c in t.context_columns)
        scope = f"{_quote(t.scope_id_column)} = $1" if t.scope_id_column else "$1::bigint IS NOT NULL"
        if t.scope_name_column:
            # An uncorrelated subquery: evaluated once, so an index on the name column still serves.
            scope = f"{_quote(t.scope_name_column)} = (SELECT name FROM key_scopes WHERE id = $1::bigint)"
        if t.version_column:
            ver = _quote(t.version_column)
            is_v = f"{ver} = $2"
            older = f"{ver} < $2"
            set_version = f", {ver} = $4"
        else:
            is_v = f"{val} LIKE ('kr1:' || $2::int || ':%')"
            older = f"substring({val} from '^kr1:([0-9]{{1,9}}):')::int < $2"
            set_version = ""
        self._idc = idc
        self._base = base = f"FROM {table} WHERE {scope} AND {is_v}"
        self._select_head = f"SELECT {kt.select(idc)}, {val}{extra} {base}"
        self._selects: dict[tuple[bool, bool, bool], str] = {}
        self._exists: dict[tuple[bool, bool], str] = {}
        self.update = (
            f"UPDATE {table} AS t SET {val} = u.new{set_version} "
            f"FROM unnest($1::{kt.sql}[], $2::text[], $3::text[]) AS u(id, old, new) "
            f"WHERE t.{idc} = u.id AND t.{val} = u.old"
        )
        self.has_version_param = bool(t.version_column)
        self.count_version = f"SELECT count(*) {base}"
        self.count_older = f"SELECT count(*) FROM {table} WHERE {scope} AND {older}"
        # k contiguous key buckets of about equal row counts over the rows still to do.
        self.plan = (
            f"SELECT {kt.aggregate('min', 'id')}, {kt.aggregate('max', 'id')}, count(*) FROM "
            f"(SELECT {idc} AS id, ntile($3) OVER (ORDER BY {idc}) AS b "
            f"FROM {table} WHERE {scope} AND {older}) AS s GROUP BY b ORDER BY b"
        )
        self.lock_table = f"LOCK TABLE {table} IN SHARE MODE"

    def select(self, *, after: bool, upper: bool, skip_locked: bool) -> str:
        """``SELECT id, value, extra...`` of one batch: ``$3``/``$4`` the bounds given, then the limit."""
        if self.key_type.integer:
            after = upper = True
        k = (after, upper, skip_locked)
        if k not in self._selects:
            bounds, n = key_bounds(self._idc, self.key_type, 3, after=after, upper=upper)
            sql = f"{self._select_head}{bounds} ORDER BY {self._idc} LIMIT ${n} FOR UPDATE"
            self._selects[k] = sql + " SKIP LOCKED" if skip_locked else sql
        return self._selects[k]

    def exists_in_range(self, *, after: bool, upper: bool) -> str:
        """Whether a row on version ``$2`` lies after ``$3`` and up to ``$4`` (the bounds given)."""
        if self.key_type.integer:
            after = upper = True
        k = (after, upper)
        if k not in self._exists:
            bounds, _ = key_bounds(self._idc, self.key_type, 3, after=after, upper=upper)
            self._exists[k] = f"SELECT EXISTS (SELECT 1 {self._base}{bounds})"
        return self._exists[k]


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


# --- the keys of one rotation -------------------------------------------------------------


@dataclass
class RotationKeys:
    """The DEKs one re-encryption uses: the new one and every older version of the scope.

    ``old`` maps each older version to its cipher, or to None when it no longer decrypts
    (destroyed): rows still on such a version fail, naming their id.
    """

    scope: str
    scope_id: int
    new_version: int
    new_cipher: AESGCM
    old: dict[int, AESGCM | None]

    @property
    def old_versions(self) -> list[int]:
        return sorted(self.old)


async def load_keys(
    session: AsyncSession,
    cipher_of: Callable[[str, int, WrappedDek], Any],
    scope: str,
    scope_id: int,
    new_version: int,
    *,
    only: Sequence[int] | None = None,
) -> RotationKeys:
    """Read the scope's DEK rows and unwrap the new version and the older ones (``only`` those)."""
    rows = (
        await session.execute(
            text(
                "SELECT version, state, encrypted_dek, kek_id, kek_version FROM data_keys "
                "WHERE scope_id = :sid AND version <= :v ORDER BY version"
            ),
            {"sid": scope_id, "v": new_version},
        )
    ).all()
    ciphers: dict[int, AESGCM | None] = {}
    new_cipher: AESGCM | None = None
    for version, state, blob, kek_id, kek_version in rows:
        if version != new_version and only is not None and version not in only:
            continue
        cipher = None
        if blob is not None and state != "destroyed":
            cipher = await cipher_of(scope, version, WrappedDek(kek_id, kek_version, bytes(blob)))
        if version == new_version:
            new_cipher = cipher
        else:
            ciphers[version] = cipher
    if new_cipher is None:
        raise KeyVersionTooOld(f"{scope}: DEK v{new_version} is not available to re-encrypt with")
    return RotationKeys(scope, scope_id, new_version, new_cipher, ciphers)


# --- one batch ----------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Batch:
    """What one batch did: rows locked, rows written (compare-and-swap hits), last id seen."""

    selected: int
    written: int
    last_id: Key | None


def _bound_args(target: Target, after: Key | None, hi: Key | None) -> tuple[bool, bool, list[Key]]:
    """Which bounds a statement of ``target`` binds, and their values (integer keys: always both)."""
    if target.key_type.integer:
        return True, True, [MIN_ID if after is None else after, MAX_ID if hi is None else hi]
    return after is not None, hi is not None, [b for b in (after, hi) if b is not None]


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


async def reencrypt_batch(
    apg: Any,
    target: Target,
    keys: RotationKeys,
    version: int,
    *,
    after: Key | None,
    hi: Key | None = None,
    limit: int,
    skip_locked: bool = True,
) -> Batch:
    """Re-encrypt up to ``limit`` rows of ``target`` still on ``version`` with ``after < id <= hi``.

    ``after`` None: from the first key; ``hi`` None: to the last.

    Runs inside the caller's transaction (``apg`` from :func:`raw_connection`); the caller
    commits it together with its progress counters.

    Raises:
        RowFailed: a value did not decrypt (or did not verify after re-encryption); nothing of
            the batch has been written.
    """
    sql = target.sql
    has_after, has_hi, bounds = _bound_args(target, after, hi)
    select = sql.select(after=has_after, upper=has_hi, skip_locked=skip_locked)
    rows = await apg.fetch(select, keys.scope_id, version, *bounds, limit)
    if not rows:
        return Batch(0, 0, None)
    old = keys.old.get(version)
    new_cipher, new_version, scope = keys.new_cipher, keys.new_version, keys.scope
    context_of = target.context
    ids: list[Key] = []
    olds: list[str] = []
    news: list[str] = []
    split, open_raw, seal = envelope.split, envelope.open_raw, envelope.seal
    located: dict[str, int] = {}  # where the new values go (keyrotor.census.locations)
    for row in rows:
        row_id, value = row[0], row[1]
        try:
            if old is None:
                raise KeyVersionTooOld(f"{scope}: DEK v{version} no longer decrypts")
            context = context_of(row_id, tuple(row)[2:])
            found, raw = split(value)
            if found != version:
                raise DecryptionFailed(f"the row says DEK v{version} but its value says v{found}")
            plaintext = open_raw(raw, cipher=old, scope=scope, dek_version=version, context=context)
            sealed = seal(plaintext, cipher=new_cipher, scope=scope, dek_version=new_version, context=context)
            # Prove the new value opens to the same bytes before the old one is overwritten.
            _, new_raw = split(sealed)
            if open_raw(
                new_raw, cipher=new_cipher, scope=scope, dek_version=new_version, context=context
            ) != (plaintext):
                raise DecryptionFailed("the re-encrypted value did not verify")
        except (DecryptionFailed, KeyVersionTooOld) as exc:
            metrics.decrypt_failed(exc)
            raise RowFailed(target.name, row_id, exc) from exc
        location = location_of(context)
        located[location] = located.get(location, 0) + 1
        ids.append(row_id)
        olds.append(value)
        news.append(sealed)
    await record_batch(apg, keys.scope_id, new_version, located)
    if sql.has_version_param:
        status = await apg.execute(sql.update, ids, olds, news, new_version)
    else:
        status = await apg.execute(sql.update, ids, olds, news)
    written = int(status.rsplit(" ", 1)[-1])
    metrics.ROWS_REENCRYPTED.labels(metrics.scope_label(scope)).inc(written)
    return Batch(len(rows), written, ids[-1])


async def sweep(
    apg: Any, target: Target, keys: RotationKeys, *, limit: int, versions: Sequence[int] | None = None
) -> int:
    """Re-encrypt every row of ``target`` still on an older version, waiting for locked rows.

    Used inside one transaction: for a small scope (all of it) and when a run completes
    (stragglers written by processes whose cache still named the old DEK). Returns rows written.
    """
    written = 0
    for version in versions if versions is not None else keys.old_versions:
        after: Key | None = None
        while True:
            batch = await reencrypt_batch(
                apg, target, keys, version, after=after, limit=limit, skip_locked=False
            )
            if batch.last_id is None:
                break
            written += batch.written
            after = batch.last_id
    return written


async def count_older(apg: Any, target: Target, scope_id: int, version: int) -> int:
    """Rows of ``target`` in the scope on a version older than ``version``."""
    return int(await apg.fetchval(target.sql.count_older, scope_id, version))


async def count_version(apg: Any, target: Target, scope_id: int, version: int) -> int:
    """Rows of ``target`` in the scope on exactly ``version``."""
    return int(await apg.fetchval(target.sql.count_version, scope_id, version))


async def plan_ranges(
    apg: Any, target: Target, scope_id: int, new_version: int, *, range_rows: int
) -> list[PlannedRange]:
    """Split the rows still to do into contiguous key ranges of about ``range_rows`` rows each.

    See :func:`ranges_from_buckets` for how the ranges cover every key.
    """
    total = await count_older(apg, target, scope_id, new_version)
    if total == 0:
        return []
    k = max(1, -(-total // range_rows))
    buckets = await apg.fetch(target.sql.plan, scope_id, new_version, k)
    return ranges_from_buckets(target.key_type, buckets)


async def exists_in_range(
    apg: Any, target: Target, keys: RotationKeys, after: Key | None, hi: Key | None
) -> bool:
    """Whether any row of ``target`` with ``after < id <= hi`` is still on an older version."""
    has_after, has_hi, bounds = _bound_args(target, after, hi)
    sql = target.sql.exists_in_range(after=has_after, upper=has_hi)
    for version in keys.old_versions:
        if await apg.fetchval(sql, keys.scope_id, version, *bounds):
            return True
    return False
