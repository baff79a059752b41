"""The audit log: who did what to which key, chained and keyed so that edits are detectable.

Rows of ``encryption_audit_log`` are numbered and hashed as :mod:`keyrotor.audit.chain` says:
each row's hash covers the previous row's, under the audit key (:mod:`keyrotor.audit.key`).
Appends are serialised by a transaction-scoped advisory lock, so writers in many processes keep
one unbroken chain: take the lock, read the head, hash and insert the new rows, commit.

Public API (KeyManager, the jobs, the scheduler and the CLI use it):

- :class:`AuditEvent` - one event;
- :func:`write_event` - append events inside the caller's transaction, so an audit row commits
  or rolls back together with the change it records;
- :func:`record_config_change` - the ``config_change`` event for grants and policies;
- :func:`actor_context` - who is calling, for every KeyManager call inside the block;
- :class:`AuditQuery`, :func:`query_events`, :func:`tail_events` - reading the log.

The names of :mod:`keyrotor.audit.events`, :mod:`keyrotor.audit.actors` and
:mod:`keyrotor.audit.chain` that callers use are importable from here too. Batched background
writing (what KeyManager uses) is :mod:`keyrotor.audit.writer`; chain verification and pruning
are :mod:`keyrotor.audit.verify`.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from typing import Any

from sqlalchemy.ext.asyncio import AsyncSession

from keyrotor.audit.actors import CALLER, Caller, actor_context, check_actor, check_pattern, current_caller
from keyrotor.audit.chain import (
    CHAIN_FORMAT,
    GENESIS,
    KEYED_FORMAT,
    Record,
    canonical,
    chain_copy,
    chain_hash,
    chain_records,
    copy_field,
)
from keyrotor.audit.events import (
    EVENT_TYPES,
    INT8,
    MAX_ACTOR_CHARS,
    MAX_ERROR_CHARS,
    MAX_SHORT_CHARS,
    AuditEvent,
    EventType,
    Row,
    clean_short,
    clean_text,
    event_row,
    from_us,
    metadata_json,
    normalize_metadata,
    now_us,
    to_us,
    utc,
)
from keyrotor.audit.key import key_in_session
from keyrotor.errors import InvalidInput
from keyrotor.store import audit as store
from keyrotor.store.audit import CHAIN_LOCK, COLUMNS, TABLE

__all__ = [
    "CALLER",
    "CHAIN_FORMAT",
    "CHAIN_LOCK",
    "COLUMNS",
    "EVENT_TYPES",
    "GENESIS",
    "KEYED_FORMAT",
    "MAX_ACTOR_CHARS",
    "MAX_ERROR_CHARS",
    "MAX_QUERY_LIMIT",
    "MAX_SHORT_CHARS",
    "TABLE",
    "AuditEvent",
    "AuditQuery",
    "Caller",
    "EventType",
    "Record",
    "Row",
    "actor_context",
    "canonical",
    "chain_copy",
    "chain_hash",
    "chain_records",
    "check_actor",
    "check_event_type",
    "clean_short",
    "clean_text",
    "copy_field",
    "current_caller",
    "event_row",
    "from_us",
    "metadata_json",
    "normalize_metadata",
    "now_us",
    "parse_time",
    "query_events",
    "record_config_change",
    "row_dict",
    "tail_events",
    "to_us",
    "utc",
    "write_event",
    "write_events",
]


async def write_event(session: AsyncSession, *events: AuditEvent) -> None:
    """Append events to the chain inside the caller's transaction.

    The rows commit or roll back with the caller's transaction. Taking the chain lock makes
    every other audit writer wait until that transaction ends, so call this last in a
    transaction, just before it commits: from the lock on, the server ends the transaction if
    it sits idle between statements for ``keyrotor.store.audit.CHAIN_LOCK_IDLE_S`` (a frozen
    holder must not stall every durable call), so nothing after this call may wait on anything
    but the database. What ran before it is not bounded.

    Raises:
        InvalidInput: an unknown event type.
        ConfigurationError: the chain is keyed and this process cannot load the audit key.
    """
    await write_events(session, events)


async def write_events(session: AsyncSession, events: Sequence[AuditEvent]) -> list[int]:
    """Append many events in order, inside the caller's transaction. Returns their ids."""
    if not events:
        return []
    rows = [event_row(e) for e in events]
    # The key before the lock: loading it may call the KEK (a remote KMS, its retries), and the
    # lock bounds how long this transaction may then idle (keyrotor.store.audit.lock_chain).
    key = await key_in_session(session)
    await store.lock_chain(session)
    if key is None:
        # Checked again under the lock: a key created since would make an unkeyed row a downgrade.
        key = await key_in_session(session)
    last_id, prev = await store.chain_head(session) or (0, GENESIS)
    records = chain_records(last_id, prev, rows, key)
    await store.insert_events(
        session, [{**dict(zip(COLUMNS, r, strict=True)), "created_at": from_us(r[10])} for r in records]
    )
    return [r[0] for r in records]


async def record_config_change(
    session: AsyncSession,
    actor: str,
    what: str,
    before: Any,
    after: Any,
    *,
    scope: str | None = None,
    ip: str | None = None,
    user_agent: str | None = None,
) -> None:
    """Record a configuration change (a grant, a revoke, a rotation policy) in the caller's transaction.

    Args:
        actor: who made the change.
        what: what changed, e.g. ``grant``, ``revoke``, ``policy``.
        before, after: JSON-able descriptions of the old and new state (None: did not exist).
        scope: the scope concerned, if there is one.
    """
    await write_event(
        session,
        AuditEvent(
            "config_change",
            scope=scope,
            actor=actor,
            ip_address=ip,
            user_agent=user_agent,
            metadata={"what": what, "before": before, "after": after},
        ),
    )


# --- reading ---------------------------------------------------------------------------------

_RELATIVE = re.compile(r"(\d{1,9})\s*([smhdw])")
_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800}
MAX_QUERY_LIMIT = 10_000


def parse_time(value: str, *, now: datetime | None = None) -> datetime:
    """Parse a point in time for ``--since``/``--until`` and the HTTP API.

    Accepts ISO 8601 dates and datetimes (``2026-01-31``, ``2026-01-31T12:00:00Z``; no zone
    means UTC), ``now``, and ages like ``90s``, ``30m``, ``12h``, ``7d``, ``2w``.

    Raises:
        InvalidInput: anything else.
    """
    text_ = value.strip() if isinstance(value, str) else ""
    now = now or datetime.now(UTC)
    if text_ == "now":
        return now
    shown = str(value)[:40].encode("ascii", "backslashreplace").decode()
    rel = _RELATIVE.fullmatch(text_)
    try:
        if rel:
            return now - timedelta(seconds=int(rel.group(1)) * _UNITS[rel.group(2)])
        parsed = datetime.fromisoformat(text_)
    except ValueError:
        raise InvalidInput(
            f"invalid time {shown!r}: use ISO 8601 (2026-01-31, 2026-01-31T12:00:00Z) "
            "or an age like 30m, 12h, 7d"
        ) from None
    except OverflowError:  # an age past year 1, or a time whose UTC falls outside years 1-9999
        raise InvalidInput(f"time {shown!r} is out of range (years 1-9999 in UTC)") from None
    try:
        return utc(parsed)
    except OverflowError:
        raise InvalidInput(f"time {shown!r} is out of range (years 1-9999 in UTC)") from None


def check_event_type(value: str) -> str:
    """Validate an event type name (for filters).

    Raises:
        InvalidInput: not one of :data:`EVENT_TYPES`.
    """
    if value not in EVENT_TYPES:
        shown = str(value)[:40].encode("ascii", "backslashreplace").decode()
        raise InvalidInput(f"unknown event type {shown!r}: use one of {', '.join(EVENT_TYPES)}")
    return value


@dataclass(frozen=True, slots=True)
class AuditQuery:
    """A filter over the log, read in keyset pages ordered by id.

    ``scope`` is exact, or a prefix pattern ``tenant-42/*`` (or ``*``: any). Times are
    inclusive (``since``) and exclusive (``until``).
    """

    event: str | None = None
    scope: str | None = None
    actor: str | None = None
    since: datetime | None = None
    until: datetime | None = None
    after_id: int = 0
    limit: int = 100

    @classmethod
    def parse(
        cls,
        *,
        event: str | None = None,
        scope: str | None = None,
        actor: str | None = None,
        since: str | None = None,
        until: str | None = None,
        after_id: str | int | None = None,
        limit: str | int | None = None,
    ) -> AuditQuery:
        """Build a query from user input (CLI options, HTTP parameters).

        Raises:
            InvalidInput: an unknown event type, a malformed time or number.
        """
        now = datetime.now(UTC)
        return cls(
            event=check_event_type(event) if event else None,
            scope=check_pattern(scope) if scope else None,
            actor=_actor_filter(actor) if actor else None,
            since=parse_time(since, now=now) if since else None,
            until=parse_time(until, now=now) if until else None,
            after_id=_int(after_id, "after_id", 0, 0, INT8 - 1),
            limit=_int(limit, "limit", 100, 1, MAX_QUERY_LIMIT),
        )

    def filters(self) -> dict[str, Any]:
        """The filters as :func:`keyrotor.store.audit.find_events` takes them."""
        exact = prefix = None
        if self.scope and self.scope != "*":
            if self.scope.endswith("/*"):
                prefix = self.scope[:-1]
            else:
                exact = self.scope
        return {
            "event": self.event,
            "scope": exact,
            "scope_prefix": prefix,
            "actor": self.actor,
            "since": self.since,
            "until": self.until,
        }


def _actor_filter(actor: str) -> str:
    # PostgreSQL text cannot hold NUL: the query would fail in the driver (a 500 over HTTP),
    # and no recorded actor can contain one.
    if "\x00" in actor:
        raise InvalidInput("an actor filter cannot contain a NUL character")
    return actor


def _int(value: str | int | None, name: str, default: int, low: int, high: int) -> int:
    if value is None or value == "":
        return default
    try:
        number = int(value)
    except (TypeError, ValueError):
        raise InvalidInput(f"{name} must be a whole number") from None
    if not low <= number <= high:
        raise InvalidInput(f"{name} must be between {low} and {high}")
    return number


def row_dict(row: Sequence[Any]) -> dict[str, Any]:
    """A row of the log as JSON-able data."""
    return {
        "id": row[0],
        "event_type": row[1],
        "scope": row[2],
        "key_version": row[3],
        "success": row[4],
        "actor": row[5],
        "ip_address": row[6],
        "user_agent": row[7],
        "error_message": row[8],
        "metadata": row[9],
        "created_at": row[10].isoformat(),
        "prev_hash": bytes(row[11]).hex(),
        "row_hash": bytes(row[12]).hex(),
    }


async def query_events(session: AsyncSession, query: AuditQuery) -> list[dict[str, Any]]:
    """Events matching ``query`` with ``id > query.after_id``, oldest first, at most ``query.limit``.

    The last event's id is the next page's ``after_id``.
    """
    rows = await store.find_events(session, after_id=query.after_id, limit=query.limit, **query.filters())
    return [row_dict(r) for r in rows]


async def tail_events(session: AsyncSession, n: int) -> list[dict[str, Any]]:
    """The newest ``n`` events, oldest first."""
    return [row_dict(r) for r in await store.newest_events(session, n)]
