"""Keys of any supported type: how statements bind and bound them, and how ranges split them.

A registered column's key is one column of type smallint, integer, bigint, uuid, text or
varchar (:class:`KeyType`). Integer keys keep the fixed bounds ``MIN_ID``/``MAX_ID`` and
arithmetic ranges ``lo <= id <= hi``; other keys are bounded by values taken from the data, an
open side simply left out of the statement. A range of a fanned-out run is a
``rotation_ranges`` row (:class:`PlannedRange`, :func:`insert_range`, :func:`range_bounds`).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, NamedTuple

from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncSession

MIN_ID = -(2**63)
MAX_ID = 2**63 - 1
Key = int | str
"""A row's key as Python sees it: an int (integer keys) or a str (uuid in canonical form, text)."""


@dataclass(frozen=True)
class KeyType:
    """How the statements of a target bind and order its primary key.

    Every parameter is cast to ``sql`` explicitly: ``int4_id > $1::bigint`` compares across integer
    widths (one btree operator family, so the key's index still serves) where an inferred int4
    parameter could not hold the bounds ``-2**63`` / ``2**63-1``. Text keys compare in the key
    column's own collation in the WHERE and the ORDER BY alike, so one index range scan serves both.
    A uuid key is read back as text (``::text``), so keys, cursors and reports are plain strings.
    """

    sql: str  # bigint | uuid | text

    @property
    def integer(self) -> bool:
        """Integer keys have fixed bounds (``MIN_ID``/``MAX_ID``) and arithmetic (``lo - 1``,
        see :func:`start_cursor`)."""
        return self.sql == "bigint"

    def select(self, column: str) -> str:
        """The key as a SELECT returns it (uuid as text).

        Aliased: a bare ``ORDER BY id`` would otherwise name the text output column, not the
        uuid column, and sort in another order than the key's index (and the cursor's ``>``).
        """
        return f"{column}::text AS kr_key" if self.sql == "uuid" else column

    def aggregate(self, fn: str, column: str) -> str:
        """``min``/``max`` of keys. Postgres has none for uuid; its canonical text in the C collation
        orders exactly as the uuid does."""
        return f'{fn}({column}::text COLLATE "C")' if self.sql == "uuid" else f"{fn}({column})"

    @property
    def text_pattern(self) -> str | None:
        """A regular expression of every key as its text appears in a context (``str`` of an
        integer, a uuid's canonical text); None for text keys, which may be any text."""
        return _TEXT_PATTERNS.get(self.sql)

    def key(self, value: Any) -> Key:
        """A key read from the database or JSON, in its Python form."""
        return int(value) if self.integer else str(value)


_TEXT_PATTERNS = {
    "bigint": "-?[0-9]+",
    "uuid": "[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}",
}

INTEGER_KEY = KeyType("bigint")
UUID_KEY = KeyType("uuid")
TEXT_KEY = KeyType("text")

_KEY_TYPES = {"smallint": INTEGER_KEY, "integer": INTEGER_KEY, "bigint": INTEGER_KEY, "uuid": UUID_KEY}


def key_type_of(pg_type: str) -> KeyType | None:
    """The key type of a column of Postgres type ``pg_type`` (``format_type``), or None if unsupported."""
    if pg_type in ("text", "character varying") or pg_type.startswith("character varying("):
        return TEXT_KEY
    return _KEY_TYPES.get(pg_type)


def key_bounds(column: str, kt: KeyType, first: int, *, after: bool, upper: bool) -> tuple[str, int]:
    """``AND col > $n AND col <= $m`` for the bounds given, parameters from ``$first`` on.

    Returns the SQL fragment and the number of the next parameter. Unbounded sides are left
    out of the statement (never ``$n IS NULL OR ...``, which would hide the key's index).
    """
    sql, n = "", first
    if after:
        sql += f" AND {column} > ${n}::{kt.sql}"
        n += 1
    if upper:
        sql += f" AND {column} <= ${n}::{kt.sql}"
        n += 1
    return sql, n


def show_key(row_id: object) -> str:
    """A key as error messages and reports show it: ``42``, or ``'cus:é1'`` quoted (and bounded)."""
    return str(row_id) if isinstance(row_id, int) else repr(str(row_id)[:100])


class PlannedRange(NamedTuple):
    """One range of a fanned-out run's target.

    Integer keys: rows with ``lo <= id <= hi`` (``after_key``/``hi_key`` None). Other keys:
    ``lo``/``hi`` number the range (its ordinal) and the rows are ``after_key < id <= hi_key``,
    an unbounded side None.
    """

    lo: int
    hi: int
    rows: int
    after_key: str | None = None
    hi_key: str | None = None
    least_version: int | None = None  # the oldest version its rows held when planned, if known


def ranges_from_buckets(kt: KeyType, buckets: Sequence[Sequence[Any]]) -> list[PlannedRange]:
    """Contiguous ranges covering every key, from ``(first, last, rows[, least version])``
    buckets in key order.

    Integer keys: the first range starts at the smallest key or 0 (``MIN_ID`` included: see
    :func:`start_cursor`), the last ends at the largest bigint, so a negative key written during
    the run below the smallest planned one falls in no range: the completion's sweep re-encrypts
    it. Other keys: a boundary after each bucket's last key (taken from the data), the first and
    last ranges open-ended, so a row written during the run, below, between or above the planned
    keys, falls in a range.
    """
    if not buckets:
        return []
    # A fourth column, when the buckets have one: the least version of each bucket's rows.
    least = [int(b[3]) if len(b) > 3 and b[3] is not None else None for b in buckets]
    if kt.integer:
        los = [min(0, int(buckets[0][0])), *(int(b[0]) for b in buckets[1:])]
        return [
            PlannedRange(
                lo, (los[i + 1] - 1) if i + 1 < len(los) else MAX_ID, int(b[2]), least_version=least[i]
            )
            for i, (lo, b) in enumerate(zip(los, buckets, strict=True))
        ]
    lasts: list[str | None] = [str(b[1]) for b in buckets[:-1]]
    afters, his = [None, *lasts], [*lasts, None]
    return [
        PlannedRange(i, i, int(b[2]), after_key=afters[i], hi_key=his[i], least_version=least[i])
        for i, b in enumerate(buckets)
    ]


def start_cursor(lo: int) -> int | None:
    """The ``cursor`` of an integer range's pass that has done no key yet: ``lo - 1``, the
    exclusive bound a pass begins after, or None (NULL, migration 0014) for a range starting at
    ``MIN_ID``, where ``lo - 1`` is no bigint and the pass has no lower bound at all.

    ``> MIN_ID`` instead would skip the key ``MIN_ID``; None keeps it in the range's first batch.
    """
    return lo - 1 if lo > MIN_ID else None


async def insert_range(
    session: AsyncSession, run_id: int, target: str, p: PlannedRange, *, version: int
) -> None:
    """Store one planned range of a run (a no-op if the run has it already)."""
    await session.execute(
        text(
            "INSERT INTO rotation_ranges (run_id, target, lo, hi, version, cursor, after_key, hi_key) "
            "VALUES (:r, :t, :lo, :hi, :v, :c, :ak, :hk) ON CONFLICT DO NOTHING"
        ),
        {
            "r": run_id,
            "t": target,
            "lo": p.lo,
            "hi": p.hi,
            "v": version,
            "c": start_cursor(p.lo),
            "ak": p.after_key,
            "hk": p.hi_key,
        },
    )


def range_bounds(
    kt: KeyType, lo: int, hi: int, row: Sequence[Any]
) -> tuple[Key | None, Key | None, Key | None]:
    """``(start, cursor, upper)`` of a range row read with ``cursor, after_key, hi_key, cursor_key``.

    ``start`` is the exclusive lower bound a pass over the range begins after; ``cursor`` the
    last key done of the current pass (``start`` if none yet); ``upper`` the inclusive upper
    bound. None: unbounded (integer keys are bounded by ``lo - 1`` and ``hi``, except the range
    starting at ``MIN_ID``: :func:`start_cursor`).
    """
    cursor, after_key, hi_key, cursor_key = row
    if kt.integer:
        start = start_cursor(lo)
        return start, start if cursor is None else int(cursor), hi
    return after_key, cursor_key if cursor_key is not None else after_key, hi_key
