"""The audit log's tables: ``encryption_audit_log`` (the chain) and ``audit_keys`` (its keys).

Two kinds of caller: the SQLAlchemy sessions of ordinary transactions (each function takes the
session of a transaction the caller opened), and the batched writers, which drive the raw
asyncpg connection they keep (``pg``) so that a batch costs as few round trips as possible.
Appends to the chain are serialised by the transaction-scoped advisory lock :data:`CHAIN_LOCK`,
and every transaction that takes it also bounds how long it may then sit idle (:func:`lock_chain`,
:func:`begin_locked`): a holder that stops before it commits must not stall every other appender.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterable, Mapping, Sequence
from datetime import datetime
from typing import Any

from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncSession

TABLE = "encryption_audit_log"
KEY_TABLE = "audit_keys"
# Serialises chain appends across processes, for the duration of the appending transaction.
CHAIN_LOCK = 0x6B72_6175_6469_74  # "kraudit"
# How long a transaction holding the chain lock may sit idle between its statements before the
# server ends it, releasing the lock (:func:`lock_chain`). A holder frozen between the lock and
# its commit (SIGSTOP, a VM pause, a partition: no FIN reaches the server) would otherwise hold
# every durable call of every process back. What runs under the lock is the head, the insert and
# the commit (write_event belongs just before the commit), so an idle second is already a stall;
# the bound is well under the durable writer's 30 s attempt, which therefore still succeeds.
CHAIN_LOCK_IDLE_S = 5.0
# The order of the hashed fields and of the COPY columns.
COLUMNS = (
    "id",
    "event_type",
    "scope",
    "key_version",
    "success",
    "actor",
    "ip_address",
    "user_agent",
    "error_message",
    "metadata",
    "created_at",
    "prev_hash",
    "row_hash",
    "audit_key_id",
)

# The idle bound and the lock in one statement (the server counts idleness between statements
# only, so there is no idle moment between the two). SET LOCAL: the bound starts here, not at
# the caller's BEGIN, and ends with the transaction, as the lock does. A shorter timeout the
# session already has (pg_settings shows it in ms; 0 is none) is kept.
_LOCK = text(
    "SELECT set_config('idle_in_transaction_session_timeout', CASE WHEN s.setting::bigint "
    "BETWEEN 1 AND :ms THEN s.setting ELSE :ms_text END, true), pg_advisory_xact_lock(:k) "
    "FROM pg_settings s WHERE s.name = 'idle_in_transaction_session_timeout'"
)
_HEAD = f"SELECT id, row_hash FROM {TABLE} ORDER BY id DESC LIMIT 1"
_INSERT = text(
    f"INSERT INTO {TABLE} ({', '.join(COLUMNS)}) VALUES (:id, :event_type, :scope, "
    ":key_version, :success, :actor, :ip_address, :user_agent, :error_message, "
    "CAST(:metadata AS json), :created_at, :prev_hash, :row_hash, :audit_key_id)"
)
_SHOWN = (
    "SELECT id, event_type, scope, key_version, success, actor, ip_address, user_agent, "
    f"error_message, metadata, created_at, prev_hash, row_hash FROM {TABLE}"
)
_CHAIN_SELECT = (
    "SELECT id, event_type, scope, key_version, success, actor, ip_address, user_agent, error_message, "
    f"metadata::text, created_at, prev_hash, row_hash, audit_key_id FROM {TABLE} "
)
_PAGE = text(_CHAIN_SELECT + "WHERE id > :after ORDER BY id LIMIT :n")
_ANCHORS = text(_CHAIN_SELECT + "WHERE event_type = 'anchor' AND id > :after ORDER BY id")
_HEAD_AND_FIRST = text(
    f"SELECT id, row_hash, (SELECT min(id) FROM {TABLE}) FROM {TABLE} ORDER BY id DESC LIMIT 1"
)
_SELECT_KEYS = f"SELECT id, switch_after, kek_id, kek_version, wrapped FROM {KEY_TABLE}"
_KEYED = f"SELECT EXISTS (SELECT 1 FROM {KEY_TABLE})"
_SWAP_WRAP = text(
    f"UPDATE {KEY_TABLE} SET kek_id = :kek_id, kek_version = :v, wrapped = :w "
    "WHERE id = :id AND wrapped = :old"
)


# --- the chain, in a session ---------------------------------------------------------------


async def lock_chain(session: AsyncSession, idle_s: float | None = None) -> None:
    """Take the chain lock until the session's transaction ends, and from now on let the server
    end that transaction (and so release the lock) once it sits idle for ``idle_s`` (default
    :data:`CHAIN_LOCK_IDLE_S`) between two statements.

    Only what follows the lock is bounded: the caller's statements before it may idle as long
    as they always could. So take it last, just before the commit; what still runs after it
    must not wait on anything slower than the database (a KEK call, another service).
    """
    ms = max(1, int((CHAIN_LOCK_IDLE_S if idle_s is None else idle_s) * 1000))
    await session.execute(_LOCK, {"k": CHAIN_LOCK, "ms": ms, "ms_text": str(ms)})


async def chain_head(session: AsyncSession) -> tuple[int, bytes] | None:
    """``(id, row_hash)`` of the newest row, or None for an empty log."""
    head = (await session.execute(text(_HEAD))).first()
    return (int(head[0]), bytes(head[1])) if head else None


async def insert_events(session: AsyncSession, rows: Sequence[Mapping[str, Any]]) -> None:
    """Insert chained rows, each a mapping of :data:`COLUMNS` (metadata as JSON text)."""
    await session.execute(_INSERT, list(rows))


def _like_prefix(prefix: str) -> str:
    return prefix.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_") + "%"


async def find_events(
    session: AsyncSession,
    *,
    after_id: int,
    limit: int,
    event: str | None = None,
    scope: str | None = None,
    scope_prefix: str | None = None,
    actor: str | None = None,
    since: datetime | None = None,
    until: datetime | None = None,
) -> Sequence[Sequence[Any]]:
    """Rows with ``id > after_id`` matching every filter given, oldest first, at most ``limit``.

    ``scope`` is exact; ``scope_prefix`` matches scopes starting with it. ``since`` is
    inclusive, ``until`` exclusive.
    """
    parts = ["id > :after_id"]
    params: dict[str, Any] = {"after_id": after_id, "limit": limit}
    for value, condition, name in (
        (event, "event_type = :event", "event"),
        (scope, "scope = :scope", "scope"),
        (actor, "actor = :actor", "actor"),
        (since, "created_at >= :since", "since"),
        (until, "created_at < :until", "until"),
    ):
        if value:
            parts.append(condition)
            params[name] = value
    if scope_prefix:
        parts.append("scope LIKE :scope_like")
        params["scope_like"] = _like_prefix(scope_prefix)
    stmt = text(f"{_SHOWN} WHERE {' AND '.join(parts)} ORDER BY id LIMIT :limit")
    return (await session.execute(stmt, params)).all()


async def newest_events(session: AsyncSession, n: int) -> Sequence[Sequence[Any]]:
    """The newest ``n`` rows, oldest first (columns as :func:`find_events`)."""
    stmt = text(f"SELECT * FROM ({_SHOWN} ORDER BY id DESC LIMIT :n) t ORDER BY id")
    return (await session.execute(stmt, {"n": n})).all()


async def chain_page(session: AsyncSession, after: int, n: int) -> Sequence[Sequence[Any]]:
    """Up to ``n`` rows after id ``after``, every column in :data:`COLUMNS` order (metadata as text)."""
    return (await session.execute(_PAGE, {"after": after, "n": n})).all()


async def anchor_rows(session: AsyncSession, after: int) -> Sequence[Sequence[Any]]:
    """The ``anchor`` rows with ``id > after``, oldest first (columns as :func:`chain_page`)."""
    return (await session.execute(_ANCHORS, {"after": after})).all()


async def head_and_first_id(session: AsyncSession) -> tuple[int, bytes, int] | None:
    """``(id, row_hash)`` of the newest row and the oldest row's id, or None for an empty log."""
    row = (await session.execute(_HEAD_AND_FIRST)).first()
    return None if row is None else (int(row[0]), bytes(row[1]), int(row[2]))


async def last_event_id(session: AsyncSession) -> int:
    """The newest row's id (0 for an empty log)."""
    return int((await session.execute(text(f"SELECT coalesce(max(id), 0) FROM {TABLE}"))).scalar_one())


async def first_id_since(session: AsyncSession, since: datetime) -> int | None:
    """The smallest id of a row created at or after ``since``."""
    found = await session.execute(
        text(f"SELECT min(id) FROM {TABLE} WHERE created_at >= :before"), {"before": since}
    )
    value = found.scalar_one()
    return None if value is None else int(value)


async def id_bounds(session: AsyncSession) -> tuple[int, int] | None:
    """``(smallest id, largest id)`` of the log, or None when it is empty."""
    bounds = (await session.execute(text(f"SELECT min(id), max(id) FROM {TABLE}"))).one()
    return None if bounds[0] is None else (int(bounds[0]), int(bounds[1]))


async def row_hash_of(session: AsyncSession, row_id: int) -> bytes:
    """The ``row_hash`` of row ``row_id`` (which must exist)."""
    found = await session.execute(text(f"SELECT row_hash FROM {TABLE} WHERE id = :id"), {"id": row_id})
    return bytes(found.scalar_one())


async def delete_through(session: AsyncSession, row_id: int) -> int:
    """Delete the rows up to ``row_id``; how many. The append-only trigger lets only this through:
    it allows deletes while the transaction-local ``keyrotor.audit_prune`` is on."""
    await session.execute(text("SELECT set_config('keyrotor.audit_prune', 'on', true)"))
    deleted = (await session.execute(text(f"DELETE FROM {TABLE} WHERE id <= :id"), {"id": row_id})).rowcount  # type: ignore[attr-defined]
    await session.execute(text("SELECT set_config('keyrotor.audit_prune', 'off', true)"))
    return int(deleted)


# --- the audit keys, in a session ----------------------------------------------------------


async def chain_keyed(session: AsyncSession) -> bool:
    """Whether an audit key exists (every row after its switch point must be keyed)."""
    return bool((await session.execute(text(_KEYED))).scalar_one())


async def key_switch_point(session: AsyncSession) -> int | None:
    """The smallest ``switch_after`` of the audit keys (None: no key yet)."""
    value = (await session.execute(text(f"SELECT min(switch_after) FROM {KEY_TABLE}"))).scalar_one()
    return None if value is None else int(value)


async def newest_key(session: AsyncSession) -> Sequence[Any] | None:
    """``(id, switch_after, kek_id, kek_version, wrapped)`` of the newest audit key, or None."""
    return (await session.execute(text(f"{_SELECT_KEYS} ORDER BY id DESC LIMIT 1"))).first()


async def all_keys(session: AsyncSession, *, for_update: bool = False) -> Sequence[Sequence[Any]]:
    """Every audit key (columns as :func:`newest_key`), by id; locked with ``for_update``."""
    lock = " FOR UPDATE" if for_update else ""
    return (await session.execute(text(f"{_SELECT_KEYS} ORDER BY id{lock}"))).all()


async def keys_not_wrapped_by(session: AsyncSession, kek_id: str) -> Sequence[Sequence[Any]]:
    """The audit keys (columns as :func:`newest_key`) whose wrap is not by ``kek_id``, by id.

    Not locked: the caller moves them with no transaction open and writes each with
    :func:`swap_key_wrap`."""
    stmt = text(f"{_SELECT_KEYS} WHERE kek_id <> :t ORDER BY id")
    return (await session.execute(stmt, {"t": kek_id})).all()


async def insert_first_key(
    session: AsyncSession, switch_after: int, kek_id: str, kek_version: int, wrapped: bytes
) -> None:
    """Store audit key 1, wrapped, with the id of the last unkeyed row."""
    await session.execute(
        text(
            f"INSERT INTO {KEY_TABLE} (id, switch_after, kek_id, kek_version, wrapped) "
            "VALUES (1, :switch_after, :kek_id, :kek_version, :wrapped)"
        ),
        {"switch_after": switch_after, "kek_id": kek_id, "kek_version": kek_version, "wrapped": wrapped},
    )


async def swap_key_wrap(
    session: AsyncSession, key_id: int, old: bytes, kek_id: str, kek_version: int, wrapped: bytes
) -> bool:
    """Replace audit key ``key_id``'s wrap if it is still ``old`` (compare-and-swap); whether it was."""
    params = {"kek_id": kek_id, "v": kek_version, "w": wrapped, "id": key_id, "old": old}
    return bool((await session.execute(_SWAP_WRAP, params)).rowcount)  # type: ignore[attr-defined]


# --- the batched writers, on their own asyncpg connection -----------------------------------

_ROW_HAS_HASH = f"SELECT 1 FROM {TABLE} WHERE id = $1 AND row_hash = $2"
_UNNEST_TYPES = (
    "bigint",
    "text",
    "text",
    "bigint",
    "boolean",
    "text",
    "text",
    "text",
    "text",
    "json",
    "timestamptz",
    "bytea",
    "bytea",
    "integer",
)
_INSERT_UNNEST = (
    f"INSERT INTO {TABLE} ({', '.join(COLUMNS)}) SELECT * FROM unnest("
    + ", ".join(f"${i + 1}::{t}[]" for i, t in enumerate(_UNNEST_TYPES))
    + ")"
)
# A batch on the known head in ONE round trip: an implicit transaction (autocommit) that takes
# the chain lock, then inserts the rows, and commits at the statement's end. BEGIN, COPY and
# COMMIT would be three round trips, and a commit's round trips are what bound durable
# throughput (every waiting caller sits idle through them). The lock is taken before the first
# row is produced: the rows come out of a join with the one-row locking subquery.
_INSERT_ON_HEAD = (
    f"INSERT INTO {TABLE} ({', '.join(COLUMNS)}) "
    "SELECT u.id, u.et, u.sc, u.kv, u.ok, u.ac, u.ip, u.ua, u.em, u.md::json, "
    "'epoch'::timestamptz + u.us * interval '1 microsecond', u.ph, u.rh, u.ki "
    f"FROM (SELECT pg_advisory_xact_lock({CHAIN_LOCK})) AS chain_lock, "
    "unnest($1::bigint[], $2::text[], $3::text[], $4::bigint[], $5::bool[], $6::text[], $7::text[], "
    "$8::text[], $9::text[], $10::text[], $11::bigint[], $12::bytea[], $13::bytea[], $14::int[]) "
    "AS u(id, et, sc, kv, ok, ac, ip, ua, em, md, us, ph, rh, ki)"
)


# insert_on_head's statement for rows given as one text (keyrotor.audit.chain.chain_lines): a line
# a row, its COPY fields split on tabs, NULL spelled \N, the hashes in hex.
_INSERT_LINES_ON_HEAD = (
    f"INSERT INTO {TABLE} ({', '.join(COLUMNS)}) "
    "SELECT f[1]::bigint, f[2], f[3], f[4]::bigint, f[5]::boolean, f[6], f[7], f[8], f[9], "
    "f[10]::json, f[11]::timestamptz, decode(f[12], 'hex'), decode(f[13], 'hex'), f[14]::integer "
    f"FROM (SELECT pg_advisory_xact_lock({CHAIN_LOCK})) AS chain_lock, "
    "unnest(string_to_array($1::text, E'\\n')) AS line, "
    "LATERAL string_to_array(line, E'\\t', '\\N') AS f"
)


async def begin_locked(pg: Any, timeout_s: float) -> None:
    """Open a transaction on ``pg`` holding the chain lock.

    The server ends the transaction (and so releases the lock) if ``pg`` then sits idle in it
    for ``timeout_s``: a writer stopped between BEGIN and COMMIT (SIGSTOP, a hung host, a
    network partition) sends no FIN, and would otherwise hold every appender back for ever.
    A writer's own pauses between its statements are a batch's hashing, far shorter.
    """
    idle_ms = max(1, int(timeout_s * 1000))
    await pg.execute(
        f"BEGIN; SET LOCAL idle_in_transaction_session_timeout = {idle_ms}; "
        f"SELECT pg_advisory_xact_lock({CHAIN_LOCK})",
        timeout=timeout_s,
    )


async def commit(pg: Any, timeout_s: float) -> None:
    """Commit ``pg``'s transaction."""
    await pg.execute("COMMIT", timeout=timeout_s)


async def row_has_hash(pg: Any, row_id: int, row_hash: bytes, timeout_s: float) -> bool:
    """Whether row ``row_id`` exists with ``row_hash`` (did a batch of unknown fate commit?)."""
    return bool(await pg.fetchval(_ROW_HAS_HASH, row_id, row_hash, timeout=timeout_s))


async def chain_keyed_pg(pg: Any, timeout_s: float) -> bool:
    """:func:`chain_keyed` on the writer's connection."""
    return bool(await pg.fetchval(_KEYED, timeout=timeout_s))


async def chain_head_pg(pg: Any, timeout_s: float) -> tuple[int, bytes] | None:
    """:func:`chain_head` on the writer's connection."""
    head = await pg.fetchrow(_HEAD, timeout=timeout_s)
    return (int(head[0]), bytes(head[1])) if head else None


async def copy_events(pg: Any, source: AsyncIterator[bytes], timeout_s: float) -> None:
    """COPY chained rows (text format, :data:`COLUMNS` order) from ``source`` into the log."""
    await pg.copy_to_table(TABLE, source=source, columns=COLUMNS, format="text", timeout=timeout_s)


async def insert_event_columns(pg: Any, columns: Sequence[Sequence[Any]], timeout_s: float) -> None:
    """Insert chained rows given column by column (:data:`COLUMNS` order, created_at a datetime)."""
    await pg.execute(_INSERT_UNNEST, *columns, timeout=timeout_s)


async def insert_on_head(pg: Any, columns: Iterable[Sequence[Any]], timeout_s: float) -> None:
    """Lock, insert and commit chained rows in one autocommit statement (:data:`COLUMNS` order,
    created_at in microseconds since 1970). Raises asyncpg's UniqueViolationError, having written
    nothing, if the first id exists: another writer appended since the head the rows were chained on."""
    await pg.execute(_INSERT_ON_HEAD, *columns, timeout=timeout_s)


async def insert_lines_on_head(pg: Any, lines: str, timeout_s: float) -> None:
    """:func:`insert_on_head` for rows given as one text (``keyrotor.audit.chain.chain_lines``)."""
    await pg.execute(_INSERT_LINES_ON_HEAD, lines, timeout=timeout_s)
