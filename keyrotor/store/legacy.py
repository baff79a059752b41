"""Statements of the legacy migration: where legacy values live (:class:`Source`), their
batches, the compare-and-swap that replaces them, the ranges of a fanned-out run, and the DEKs
the old backend's second phase left behind.

The batch statements run on the asyncpg connection of the caller's transaction (``apg``): a
batch is one prepared statement a round, keyset-paged on the source's key::

    SELECT pk, value, scope FROM t WHERE value <> '' AND value NOT LIKE 'kr1:%' AND pk > $1
      ORDER BY pk LIMIT $n
    UPDATE t SET value = u.new FROM unnest(ids, olds, news, scopes) u
      WHERE t.pk = u.id AND t.value = u.old AND t.scope = u.scope RETURNING pk  -- compare-and-swap

(``AND t.scope = u.scope`` where the scope comes from a scope column of the row.)
"""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime
from typing import Any

from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncSession

from keyrotor.store.dates import days_from_now
from keyrotor.store.key_ranges import INTEGER_KEY, MAX_ID, Key, KeyType, key_bounds


def _legacy(value: str) -> str:
    """The condition of a legacy candidate: a value that is not ``kr1``. An empty string, like
    NULL, holds no key (an application's "none set"): it is neither migrated nor counted."""
    return f"{value} <> '' AND {value} NOT LIKE 'kr1:%'"


@dataclass(frozen=True)
class Source:
    """One place legacy values may live: ``secrets`` or a registered column."""

    name: str
    # -> (id, value, scope name, context text); ``{bounds}`` (see :meth:`select_sql`), ``{limit}``
    # and ``{scope}`` (a fixed scope) are the parameter placeholders.
    select: str
    update: str  # unnest($1 ids, $2 olds, $3 news[, $4 versions | scopes]) ... RETURNING id
    count: str  # -> (legacy candidates, kr1 values)
    plan: str  # $1 buckets -> (first id, last id, legacy rows) of equal-sized id ranges
    has_version: bool
    # The compare-and-swap also compares the row's scope column: a row the application moved to
    # another scope while scrypt ran must not get a value sealed under (and counted in) the old one.
    has_scope: bool = False
    key_column: str = "s.id"
    key_type: KeyType = INTEGER_KEY

    def select_sql(self, *, after: bool, upper: bool) -> str:
        """The batch SELECT with the bounds given (``$1``, ``$2``), then the limit and the scope.

        An integer key binds its upper bound always (``MAX_ID`` when open), its lower one unless
        open (``> MIN_ID`` would skip the key ``MIN_ID``).
        """
        if self.key_type.integer:
            upper = True
        bounds, n = key_bounds(self.key_column, self.key_type, 1, after=after, upper=upper)
        return self.select.format(bounds=bounds, limit=f"${n}", scope=f"${n + 1}::text")


SECRETS_SOURCE = Source(
    name="secrets",
    select=(
        "SELECT s.id, s.ciphertext, k.name, 'secret:' || s.name FROM secrets s "
        f"JOIN key_scopes k ON k.id = s.scope_id WHERE {_legacy('s.ciphertext')}{{bounds}} "
        "ORDER BY s.id LIMIT {limit}"
    ),
    update=(
        "UPDATE secrets AS t SET ciphertext = u.new, dek_version = u.ver, updated_at = now() "
        "FROM unnest($1::bigint[], $2::text[], $3::text[], $4::int[]) AS u(id, old, new, ver) "
        "WHERE t.id = u.id AND t.ciphertext = u.old RETURNING t.id"
    ),
    count=(
        f"SELECT count(*) FILTER (WHERE {_legacy('ciphertext')}), "
        "count(*) FILTER (WHERE ciphertext LIKE 'kr1:%') FROM secrets"
    ),
    plan=(
        "SELECT min(id), max(id), count(*) FROM (SELECT id, ntile($1) OVER (ORDER BY id) AS b "
        f"FROM secrets WHERE {_legacy('ciphertext')}) q GROUP BY b ORDER BY b"
    ),
    has_version=True,
)


@dataclass(frozen=True)
class ColumnSource(Source):
    """A registered column: a fixed scope (or None: the row's scope column) and a context template."""

    fixed_scope: str | None = None
    template: str | None = None


def column_source(
    name: str,
    *,
    table: str,
    pk: str,
    value: str,
    scope_column: str | None,
    key_type: KeyType,
    fixed_scope: str | None,
    template: str | None,
) -> ColumnSource:
    """The statements of a registered column; ``table``, ``pk``, ``value`` and ``scope_column``
    are quoted identifiers (their braces impossible, so the statements are safe to format)."""
    kt = key_type
    scope = f"{scope_column}::text" if scope_column else "{scope}"
    if scope_column:
        update = (
            f"UPDATE {table} AS t SET {value} = u.new "
            f"FROM unnest($1::{kt.sql}[], $2::text[], $3::text[], $4::text[]) AS u(id, old, new, scope) "
            f"WHERE t.{pk} = u.id AND t.{value} = u.old AND t.{scope_column}::text = u.scope "
            f"RETURNING {kt.select(f't.{pk}')}"
        )
    else:
        update = (
            f"UPDATE {table} AS t SET {value} = u.new FROM unnest($1::{kt.sql}[], $2::text[], $3::text[]) "
            f"AS u(id, old, new) WHERE t.{pk} = u.id AND t.{value} = u.old RETURNING {kt.select(f't.{pk}')}"
        )
    return ColumnSource(
        name=name,
        select=(
            f"SELECT {kt.select(pk)}, {value}, {scope}, NULL::text FROM {table} "
            f"WHERE {_legacy(value)}{{bounds}} ORDER BY {pk} LIMIT {{limit}}"
        ),
        update=update,
        count=(
            f"SELECT count(*) FILTER (WHERE {_legacy(value)}), count(*) FILTER (WHERE {value} LIKE 'kr1:%') "
            f"FROM {table}"
        ),
        plan=(
            f"SELECT {kt.aggregate('min', 'id')}, {kt.aggregate('max', 'id')}, count(*) FROM "
            f"(SELECT {pk} AS id, ntile($1) OVER (ORDER BY {pk}) AS b "
            f"FROM {table} WHERE {_legacy(value)}) q GROUP BY b ORDER BY b"
        ),
        has_version=False,
        has_scope=scope_column is not None,
        key_column=pk,
        key_type=kt,
        fixed_scope=fixed_scope,
        template=template,
    )


@dataclass
class SealedBatch:
    """One batch's compare-and-swap arguments: ids, old values, new kr1 values, DEK versions and
    the scopes the rows were read (and sealed) in."""

    ids: list[Key] = field(default_factory=list)
    olds: list[str] = field(default_factory=list)
    news: list[str] = field(default_factory=list)
    versions: list[int] = field(default_factory=list)
    scopes: list[str] = field(default_factory=list)


# --- batches (asyncpg: the hot statements) --------------------------------------------------


async def fetch_rows(
    apg: Any, src: Source, after: Key | None, limit: int, hi: Key | None = None
) -> list[Any]:
    """The next ``limit`` legacy rows of ``src`` with ``after < id <= hi``, in key order.

    ``after`` None: from the first key; ``hi`` None: to the last.
    """
    if src.key_type.integer:
        bounds: list[Key] = [*([] if after is None else [after]), MAX_ID if hi is None else hi]
    else:
        bounds = [b for b in (after, hi) if b is not None]
    sql = src.select_sql(after=after is not None, upper=hi is not None)
    if isinstance(src, ColumnSource) and src.fixed_scope is not None:
        return list(await apg.fetch(sql, *bounds, limit, src.fixed_scope))
    return list(await apg.fetch(sql, *bounds, limit))


async def swap_values(apg: Any, src: Source, sealed: SealedBatch) -> set[Key]:
    """The batch's compare-and-swap UPDATE: the ids written (a row whose value, or scope column,
    changed meanwhile is not)."""
    if not sealed.ids:
        return set()
    if src.has_version:
        rows = await apg.fetch(src.update, sealed.ids, sealed.olds, sealed.news, sealed.versions)
    elif src.has_scope:
        rows = await apg.fetch(src.update, sealed.ids, sealed.olds, sealed.news, sealed.scopes)
    else:
        rows = await apg.fetch(src.update, sealed.ids, sealed.olds, sealed.news)
    return {src.key_type.key(r[0]) for r in rows}


async def count_values(apg: Any, src: Source) -> tuple[int, int]:
    """``(legacy candidates, kr1 values)`` of ``src``."""
    row = await apg.fetchrow(src.count)
    return int(row[0]), int(row[1])


async def plan_buckets(apg: Any, src: Source, buckets: int) -> list[Any]:
    """``(first key, last key, legacy rows)`` of ``buckets`` equal shares of ``src``'s legacy rows."""
    return list(await apg.fetch(src.plan, buckets))


async def last_proven_run_detail(session: AsyncSession, before: int | None) -> dict[str, Any] | None:
    """The ``detail`` of the latest legacy run (before run ``before``, if given) that ended
    having migrated values (so its master key was the old backend's), or None."""
    found = await session.execute(
        text(
            "SELECT detail FROM rotations WHERE kind = 'legacy' AND id < :r AND rows_done > 0 "
            "AND state IN ('completed', 'failed') ORDER BY id DESC LIMIT 1"
        ),
        {"r": before if before is not None else 2**63 - 1},
    )
    detail: dict[str, Any] | None = found.scalar_one_or_none()
    return detail


# --- ranges of a fanned-out run ------------------------------------------------------------


async def range_row(session: AsyncSession, run_id: int, target: str, lo: int) -> tuple[int, str, Any] | None:
    """The range's id, state and ``(cursor, after_key, hi_key, cursor_key)``, or None."""
    row = (
        await session.execute(
            text(
                "SELECT id, state, cursor, after_key, hi_key, cursor_key FROM rotation_ranges "
                "WHERE run_id = :r AND target = :t AND lo = :lo"
            ),
            {"r": run_id, "t": target, "lo": lo},
        )
    ).first()
    return None if row is None else (int(row[0]), str(row[1]), tuple(row[2:]))


async def lock_range_run_state(session: AsyncSession, range_id: int) -> tuple[str, Any]:
    """The state of the range's run and the range's ``(cursor, after_key, hi_key, cursor_key)``,
    the range row locked until the transaction ends."""
    row = (
        await session.execute(
            text(
                "SELECT r.state, g.cursor, g.after_key, g.hi_key, g.cursor_key FROM rotation_ranges g "
                "JOIN rotations r ON r.id = g.run_id WHERE g.id = :g FOR UPDATE OF g"
            ),
            {"g": range_id},
        )
    ).one()
    return str(row[0]), tuple(row[1:])


async def set_range_report(session: AsyncSession, run_id: int, key: str, part: str) -> None:
    """Set one range's part (JSON text) of the run's ``detail.range_reports``.

    One key set in place: ranges committing at once never lose each other's parts (the UPDATE
    works on the row's latest version under its lock).
    """
    await session.execute(
        text(
            "UPDATE rotations SET detail = jsonb_set(detail, ARRAY['range_reports', :k], "
            "CAST(:part AS jsonb), true) WHERE id = :r"
        ),
        {"r": run_id, "k": key, "part": part},
    )


# --- the old second phase's DEKs -----------------------------------------------------------


async def decrypting_deks(session: AsyncSession, scope: str) -> list[tuple[int, str, bytes, str, int]]:
    """``(version, state, wrapped blob, kek id, kek version)`` of every DEK of ``scope`` that
    still decrypts, newest first."""
    rows = (
        await session.execute(
            text(
                "SELECT d.version, d.state, d.encrypted_dek, d.kek_id, d.kek_version FROM data_keys d "
                "JOIN key_scopes s ON s.id = d.scope_id WHERE s.name = :n AND d.state <> 'destroyed' "
                "ORDER BY d.version DESC"
            ),
            {"n": scope},
        )
    ).all()
    return [(int(v), str(st), bytes(blob), str(kid), int(kv)) for v, st, blob, kid, kv in rows]


async def insert_grace_dek(
    session: AsyncSession, scope_id: int, version: int, *, blob: bytes, kek_id: str, kek_version: int
) -> datetime | None:
    """Add a decrypt-only DEK version in ``grace`` for the scope's grace period, as the scope's
    latest version, marked ``imported`` (the retirement proof looks for the values it sealed in
    every table). Returns the end of its grace."""
    row = (
        await session.execute(
            text(
                "INSERT INTO data_keys (scope_id, version, state, encrypted_dek, kek_id, kek_version, "
                "imported, grace_until) VALUES (:s, :v, 'grace', :blob, :kid, :kv, true, "
                f"{days_from_now('SELECT grace_period_days FROM key_scopes WHERE id = :s')}) "
                "RETURNING grace_until"
            ),
            {"s": scope_id, "v": version, "blob": blob, "kid": kek_id, "kv": kek_version},
        )
    ).one()
    await session.execute(
        text("UPDATE key_scopes SET latest_version = :v, updated_at = now() WHERE id = :s"),
        {"s": scope_id, "v": version},
    )
    grace_until: datetime | None = row[0]
    return grace_until
