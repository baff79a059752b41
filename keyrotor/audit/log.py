"""The audit log: who did what to which key, chained and keyed so that edits are detectable.

Each row of ``encryption_audit_log`` has an ``id`` that is its position in the chain (1, 2, 3,
... with no gaps; a gap means a deleted row) and

    row_hash = HMAC-SHA256(audit key, prev_hash || canonical(row))   prev_hash = row_hash of id - 1

where ``canonical`` (below) is the row's other columns as one line of PostgreSQL's COPY text
format (which the writer sends anyway, so one string per row is both hashed and sent), and
the first row's ``prev_hash`` is 32 zero bytes (or, after ``keyrotor audit prune``, the hash of
the last pruned row, vouched for by an ``anchor`` row). The audit key is wrapped by the KEK
(:mod:`keyrotor.audit.key`); rows written before it existed are plain SHA-256 (format ``kra1``)
and stay valid up to its switch point. Appends are serialised by a
transaction-scoped advisory lock, so writers in many processes keep one unbroken chain: take
the lock, read the head, hash and insert the new rows, commit.

Public API (KeyManager, the jobs, the scheduler and the CLI use it):

- :class:`AuditEvent` - one event;
- :func:`write_event` - append events inside the caller's transaction, so an audit row commits
  or rolls back together with the change it records;
- :func:`record_config_change` - the ``config_change`` event for grants and policies;
- :func:`actor_context` - who is calling, for every KeyManager call inside the block;
- :class:`AuditQuery`, :func:`query_events`, :func:`tail_events` - reading the log.

Batched background writing (what KeyManager uses) is :mod:`keyrotor.audit.writer`; chain
verification and pruning are :mod:`keyrotor.audit.verify`.
"""

from __future__ import annotations

import contextlib
import contextvars
import hashlib
import json
import math
import re
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any, Literal

from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncSession

from keyrotor.audit import key as audit_key
from keyrotor.audit.key import AuditKey
from keyrotor.errors import InvalidInput

EventType = Literal[
    "encrypt",
    "decrypt",
    "failed_decrypt",
    "rotate",
    "rewrap",
    "retire",
    "unauthorized",
    "config_change",
    "replica_check",
    "failover",
    "retired_key_use",  # a decrypt needed a retired DEK version (keyrotor.keys)
    "anchor",  # written by `keyrotor audit prune` only
]
EVENT_TYPES: tuple[str, ...] = EventType.__args__  # type: ignore[attr-defined]

TABLE = "encryption_audit_log"
# Serialises chain appends across processes, for the duration of the appending transaction.
CHAIN_LOCK = 0x6B72_6175_6469_74  # "kraudit"
GENESIS = b"\x00" * 32
# Bumped if the canonical form ever changes; it is the first element of every hashed document.
# kra1: SHA-256, rows written before the audit key existed; kra2: HMAC-SHA256 under the audit
# key (keyrotor.audit.key), the key's id following the tag.
CHAIN_FORMAT = "kra1"
KEYED_FORMAT = "kra2"

# Column limits: longer values are cut (and marked), never refused, so that one odd event
# can never block the writer's queue.
MAX_ACTOR_CHARS = 200
MAX_SHORT_CHARS = 512  # scope, ip address, user agent
MAX_ERROR_CHARS = 2_000
_INT8 = 2**63

# The one JSON encoder of the chain: sorted keys, no spaces, ASCII only, no NaN.
_ENC = json.JSONEncoder(sort_keys=True, separators=(",", ":"), ensure_ascii=True, allow_nan=False)
_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
_ONE_US = timedelta(microseconds=1)
_sha256 = hashlib.sha256


@dataclass(frozen=True, slots=True)
class AuditEvent:
    """One audit event. Never put plaintext, key bytes or wrapped keys in any field."""

    event_type: EventType
    scope: str | None = None
    key_version: int | None = None
    success: bool = True
    actor: str | None = None
    ip_address: str | None = None
    user_agent: str | None = None
    error_message: str | None = None
    metadata: dict[str, Any] = field(default_factory=dict)
    created_at: datetime = field(default_factory=lambda: datetime.now(UTC))


# (event_type, scope, key_version, success, actor, ip, user_agent, error, metadata JSON text,
# created_at in microseconds since 1970 UTC): an event as the writer queues it, normalised.
# A plain tuple of plain values: KeyManager builds one on every call (a frozen dataclass costs
# ten times more, a datetime three times more than ``time.time_ns() // 1000``).
Row = tuple[
    str,
    str | None,
    int | None,
    bool,
    str | None,
    str | None,
    str | None,
    str | None,
    str,
    int,
]


def now_us() -> int:
    """The current time as a :data:`Row` holds it."""
    return time.time_ns() // 1000


def to_us(value: datetime) -> int:
    """A datetime (naive means UTC) in microseconds since 1970-01-01 UTC."""
    return (utc(value) - _EPOCH) // _ONE_US


def from_us(micros: int) -> datetime:
    """The aware UTC datetime of :func:`to_us`."""
    return _EPOCH + timedelta(microseconds=micros)


# --- who is calling ----------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Caller:
    """Who makes a KeyManager call: the actor (a user id, a service name) and, optionally,
    the client's IP address and user agent."""

    actor: str
    ip: str | None = None
    user_agent: str | None = None
    who: tuple[str, str | None, str | None] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        # The tuple KeyManager records, built once rather than on every call.
        object.__setattr__(self, "who", (self.actor, self.ip, self.user_agent))


# The ContextVar behind actor_context (KeyManager reads it directly on every call).
CALLER: contextvars.ContextVar[Caller | None] = contextvars.ContextVar("keyrotor_audit_caller", default=None)


@contextlib.contextmanager
def actor_context(actor: str, *, ip: str | None = None, user_agent: str | None = None) -> Iterator[Caller]:
    """Make ``actor`` (and ``ip``, ``user_agent``) the caller of every KeyManager call in the block.

    A ContextVar: it follows the current task (and tasks it starts), so concurrent requests in
    one process each keep their own caller. Keyword arguments of a call override it::

        with actor_context("user:42", ip=request.remote, user_agent=request.headers.get("User-Agent")):
            key = await km.decrypt("openai", token)

    Raises:
        InvalidInput: ``actor`` is empty, too long, not printable, or ``*``.
    """
    caller = Caller(check_actor(actor), clean_short(ip), clean_short(user_agent))
    token = CALLER.set(caller)
    try:
        yield caller
    finally:
        CALLER.reset(token)


def current_caller() -> Caller | None:
    """The caller set by the innermost :func:`actor_context`, if any."""
    return CALLER.get()


def check_actor(actor: str, *, wildcard: bool = False) -> str:
    """Validate an actor name and return it.

    Actors are 1-200 printable characters without surrounding spaces. ``*`` is the wildcard
    of grants (``wildcard=True``), never a caller.

    Raises:
        InvalidInput: anything else.
    """
    if (
        not isinstance(actor, str)
        or not 0 < len(actor) <= MAX_ACTOR_CHARS
        or not actor.isprintable()
        or actor != actor.strip()
    ):
        raise InvalidInput(f"an actor is 1-{MAX_ACTOR_CHARS} printable characters without surrounding spaces")
    if actor == "*" and not wildcard:
        raise InvalidInput("'*' is the wildcard of grants, not an actor")
    return actor


# --- normalisation: what is stored is exactly what is hashed ----------------------------------


def clean_text(value: str, limit: int) -> str:
    """A string Postgres accepts and that reads back unchanged: no NUL, no lone surrogates,
    at most ``limit`` characters (longer values are cut and end in ``…``)."""
    if len(value) > limit:
        value = value[: limit - 1] + "…"
    if "\x00" in value:
        value = value.replace("\x00", "\ufffd")
    try:
        value.encode()
    except UnicodeEncodeError:
        value = value.encode("utf-8", "replace").decode()
    return value


def clean_short(value: str | None) -> str | None:
    """:func:`clean_text` for short optional fields (scope, ip, user agent)."""
    return None if value is None else clean_text(str(value), MAX_SHORT_CHARS)


def normalize_metadata(value: Any) -> Any:
    """Turn ``value`` into JSON that JSONB stores and returns unchanged.

    JSONB rewrites some values (``1e16`` comes back as ``10000000000000000``, ``-0.0`` as
    ``0``) and refuses others (NaN, ``\\u0000``); the hash must cover what will be read back,
    so those are normalised first. Dict keys become strings; unknown types become ``str()``.
    """
    if value is None or isinstance(value, bool | int):
        return value
    if isinstance(value, str):
        return clean_text(value, 65_536)
    if isinstance(value, float):
        if not math.isfinite(value):
            return str(value)
        if value == 0:
            return 0.0
        if abs(value) >= 1e16:
            return int(value)
        return value
    if isinstance(value, dict):
        return {clean_text(str(k), 256): normalize_metadata(v) for k, v in value.items()}
    if isinstance(value, list | tuple | set | frozenset):
        return [normalize_metadata(v) for v in value]
    if isinstance(value, datetime):
        return value.isoformat()
    return clean_text(str(value), 65_536)


def utc(value: datetime) -> datetime:
    """``value`` as an aware UTC datetime (naive values are taken to be UTC already)."""
    if value.tzinfo is None:
        return value.replace(tzinfo=UTC)
    return value if value.tzinfo is UTC else value.astimezone(UTC)


def event_row(event: AuditEvent) -> Row:
    """Validate and normalise an :class:`AuditEvent` into a queueable :data:`Row`.

    Raises:
        InvalidInput: unknown event type.
    """
    if event.event_type not in EVENT_TYPES:
        raise InvalidInput(f"unknown audit event type {str(event.event_type)[:40]!r}")
    metadata = normalize_metadata(dict(event.metadata)) if event.metadata else {}
    key_version = event.key_version
    if key_version is not None and (not isinstance(key_version, int) or not -_INT8 <= key_version < _INT8):
        metadata["key_version"] = str(key_version)
        key_version = None
    return (
        event.event_type,
        clean_short(event.scope),
        key_version,
        bool(event.success),
        None if event.actor is None else clean_text(str(event.actor), MAX_ACTOR_CHARS),
        clean_short(event.ip_address),
        clean_short(event.user_agent),
        None if event.error_message is None else clean_text(str(event.error_message), MAX_ERROR_CHARS),
        metadata_json(metadata),
        to_us(event.created_at),
    )


# --- the chain ---------------------------------------------------------------------------------


# The hashed form of a row is its line of PostgreSQL's COPY text format (what the writer sends
# anyway, so one string per row serves both): fields separated by tabs, \N for NULL, and
# backslash, tab, newline and carriage return escaped with a backslash, which makes the line
# an unambiguous encoding of the values. These caches hold the escaped spelling of the values
# seen most (event types, scopes, actors, metadata).
_COPIED: dict[str | None, str] = {None: "\\N"}
_COPIED_MAX = 10_000
_ESCAPED = ("\\", "\t", "\n", "\r")


def copy_field(value: str | None) -> str:
    """``value`` as a field of COPY's text format (``\\N`` for None)."""
    field_ = _COPIED.get(value)
    if field_ is None:
        field_ = value or ""
        if any(c in field_ for c in _ESCAPED):
            field_ = (
                field_.replace("\\", "\\\\").replace("\t", "\\t").replace("\n", "\\n").replace("\r", "\\r")
            )
        if len(_COPIED) < _COPIED_MAX:
            _COPIED[value] = field_
    return field_


class _Clock:
    """Microseconds to COPY timestamps (``2026-01-31 12:00:00.000123+00``), each second formatted once."""

    __slots__ = ("prefix", "second")

    def __init__(self) -> None:
        self.second = -(2**62)
        self.prefix = ""

    def text(self, micros: int) -> str:
        second, fraction = divmod(micros, 1_000_000)
        if second != self.second:
            self.second = second
            self.prefix = datetime.fromtimestamp(second, UTC).strftime("%Y-%m-%d %H:%M:%S")
        return f"{self.prefix}.{fraction:06d}+00"


def canonical(
    row_id: int,
    event_type: str,
    scope: str | None,
    key_version: int | None,
    success: bool,
    actor: str | None,
    ip_address: str | None,
    user_agent: str | None,
    error_message: str | None,
    created_at: datetime,
    metadata_json: str,
    key_id: int | None = None,
) -> bytes:
    """The bytes a row's hash covers: the chain format tag, then the row as COPY text.

    With ``key_id`` (a keyed row) the tag is ``kra2 TAB key_id`` and the row's hash is the
    HMAC-SHA256 of ``prev_hash || canonical`` under that audit key.

    ``kra1 TAB id TAB event_type TAB scope TAB key_version TAB t|f TAB actor TAB ip_address
    TAB user_agent TAB error_message TAB metadata TAB created_at`` in UTF-8, each field in
    PostgreSQL's COPY text format (``\\N`` for NULL; backslash, tab, newline and carriage
    return escaped), ``created_at`` as ``YYYY-MM-DD HH:MM:SS.ffffff+00`` in UTC and
    ``metadata`` as sorted-key ASCII JSON. Any language can rebuild it from a row's values.
    """
    kv = "\\N" if key_version is None else str(int(key_version))
    tag = CHAIN_FORMAT if key_id is None else f"{KEYED_FORMAT}\t{int(key_id)}"
    return (
        f"{tag}\t{row_id}\t{copy_field(event_type)}\t{copy_field(scope)}\t"
        f"{kv}\t{'t' if success else 'f'}\t"
        f"{copy_field(actor)}\t{copy_field(ip_address)}\t{copy_field(user_agent)}\t"
        f"{copy_field(error_message)}\t{copy_field(metadata_json)}\t{_Clock().text(to_us(created_at))}"
    ).encode()


def metadata_json(metadata: dict[str, Any]) -> str:
    """Metadata as the chain encodes (and the table stores) it: sorted-key ASCII JSON."""
    return _ENC.encode(metadata) if metadata else "{}"


def chain_hash(prev_hash: bytes, event: AuditEvent, seq: int, key: AuditKey | None = None) -> bytes:
    """``SHA-256(prev_hash || canonical(event at position seq))``, or its HMAC under ``key``."""
    r = event_row(event)
    if key is None:
        return _sha256(prev_hash + canonical(seq, *r[:8], from_us(r[9]), r[8])).digest()
    return key.mac(prev_hash + canonical(seq, *r[:8], from_us(r[9]), r[8], key.key_id))


# A chained record, in the column order of COLUMNS (created_at in microseconds).
Record = tuple[
    int,
    str,
    str | None,
    int | None,
    bool,
    str | None,
    str | None,
    str | None,
    str | None,
    str,
    int,
    bytes,
    bytes,
    int | None,
]
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
_TAG = CHAIN_FORMAT.encode() + b"\t"
# The COPY fields event_type .. metadata of rows seen, by their values (see _chain).
_MIDDLES: dict[tuple[Any, ...], str] = {}


def _middle(values: tuple[Any, ...]) -> str:
    event_type, scope, key_version, success, actor, ip, agent, error, meta = values
    return "\t".join(
        (
            copy_field(event_type),
            copy_field(scope),
            "\\N" if key_version is None else str(int(key_version)),
            "t" if success else "f",
            copy_field(actor),
            copy_field(ip),
            copy_field(agent),
            copy_field(error),
            copy_field(meta),
        )
    )


def _chain(
    last_id: int, prev_hash: bytes, rows: Sequence[Row], records: list[Record] | None, key: AuditKey | None
) -> tuple[bytes, int, bytes]:
    # The writer's hot loop: one f-string a row is both what is hashed and what is sent. The
    # fields between id and created_at repeat from event to event (the same caller decrypting
    # the same scope), so their COPY spelling is looked up by the row's values, built once.
    lines: list[str] = []
    append = lines.append
    middles = _MIDDLES
    clock = _Clock()
    hex_prefix = "\\\\x"  # bytea in COPY text: \\x<hex>
    digest: Callable[[bytes], bytes]
    if key is None:
        tag, key_id, key_field = _TAG, None, "\\N"

        def digest(data: bytes) -> bytes:
            return _sha256(data).digest()

    else:
        key_id = key.key_id
        tag, key_field = f"{KEYED_FORMAT}\t{key_id}\t".encode(), str(key_id)
        digest = key.mac
    prev_hex = prev_hash.hex()
    for row in rows:
        row_key = row[:9]
        middle = middles.get(row_key)
        if middle is None:
            middle = _middle(row_key)
            if len(middles) < _COPIED_MAX:
                middles[row_key] = middle
        last_id += 1
        fields = f"{last_id}\t{middle}\t{clock.text(row[9])}"
        row_hash = digest(prev_hash + tag + fields.encode())
        row_hex = row_hash.hex()
        append(f"{fields}\t{hex_prefix}{prev_hex}\t{hex_prefix}{row_hex}\t{key_field}\n")
        if records is not None:
            records.append((last_id, *row, prev_hash, row_hash, key_id))
        prev_hash, prev_hex = row_hash, row_hex
    return "".join(lines).encode(), last_id, prev_hash


def chain_records(
    last_id: int, prev_hash: bytes, rows: Sequence[Row], key: AuditKey | None = None
) -> list[Record]:
    """Number and hash ``rows`` after the chain head ``(last_id, prev_hash)``, as records.

    With ``key`` the rows are keyed (``kra2``: HMAC-SHA256 under the audit key); without, they
    are ``kra1`` rows, valid only before the audit key exists (``keyrotor.audit.key``).
    """
    records: list[Record] = []
    _chain(last_id, prev_hash, rows, records, key)
    return records


def chain_copy(
    last_id: int, prev_hash: bytes, rows: Sequence[Row], key: AuditKey | None = None
) -> tuple[bytes, int, bytes]:
    """Number and hash ``rows`` after the chain head, straight into COPY text data.

    Returns:
        ``(COPY data, id of the last row, row_hash of the last row)``.
    """
    return _chain(last_id, prev_hash, rows, None, key)


HEAD_SQL = f"SELECT id, row_hash FROM {TABLE} ORDER BY id DESC LIMIT 1"


async def write_event(session: AsyncSession, *events: AuditEvent) -> None:
    """Append events to the chain inside the caller's transaction.

    The rows commit or roll back with the caller's transaction. Taking the chain lock makes
    every other audit writer wait until that transaction ends, so call this as late as
    possible in a long transaction (just before it commits), not at its start.

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
    await session.execute(text("SELECT pg_advisory_xact_lock(:k)"), {"k": CHAIN_LOCK})
    key = await audit_key.key_in_session(session)
    head = (await session.execute(text(HEAD_SQL))).first()
    last_id, prev = (int(head[0]), bytes(head[1])) if head else (0, GENESIS)
    records = chain_records(last_id, prev, rows, key)
    await session.execute(
        text(
            f"INSERT INTO {TABLE} ({', '.join(COLUMNS)}) VALUES (:id, :event_type, :scope, "
            ":key_version, :success, :actor, :ip_address, :user_agent, :error_message, "
            "CAST(:metadata AS json), :created_at, :prev_hash, :row_hash, :audit_key_id)"
        ),
        [{**dict(zip(COLUMNS, r, strict=True)), "created_at": from_us(r[10])} for r in records],
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
    rel = _RELATIVE.fullmatch(text_)
    if rel:
        return now - timedelta(seconds=int(rel.group(1)) * _UNITS[rel.group(2)])
    try:
        parsed = datetime.fromisoformat(text_)
    except ValueError:
        shown = str(value)[:40].encode("ascii", "backslashreplace").decode()
        raise InvalidInput(
            f"invalid time {shown!r}: use ISO 8601 (2026-01-31, 2026-01-31T12:00:00Z) "
            "or an age like 30m, 12h, 7d"
        ) from None
    return utc(parsed)


def check_event_type(value: str) -> str:
    """Validate an event type name (for filters).

    Raises:
        InvalidInput: not one of :data:`EVENT_TYPES`.
    """
    if value not in EVENT_TYPES:
        shown = str(value)[:40].encode("ascii", "backslashreplace").decode()
        raise InvalidInput(f"unknown event type {shown!r}: use one of {', '.join(EVENT_TYPES)}")
    return value


def _like_prefix(prefix: str) -> str:
    return prefix.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_") + "%"


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
            scope=_check_scope_filter(scope) if scope else None,
            actor=actor or None,
            since=parse_time(since, now=now) if since else None,
            until=parse_time(until, now=now) if until else None,
            after_id=_int(after_id, "after_id", 0, 0, _INT8 - 1),
            limit=_int(limit, "limit", 100, 1, MAX_QUERY_LIMIT),
        )

    def where(self) -> tuple[str, dict[str, Any]]:
        """The SQL condition and its parameters."""
        parts = ["id > :after_id"]
        params: dict[str, Any] = {"after_id": self.after_id}
        if self.event:
            parts.append("event_type = :event")
            params["event"] = self.event
        if self.scope and self.scope != "*":
            if self.scope.endswith("/*"):
                parts.append("scope LIKE :scope_like")
                params["scope_like"] = _like_prefix(self.scope[:-1])
            else:
                parts.append("scope = :scope")
                params["scope"] = self.scope
        if self.actor:
            parts.append("actor = :actor")
            params["actor"] = self.actor
        if self.since:
            parts.append("created_at >= :since")
            params["since"] = self.since
        if self.until:
            parts.append("created_at < :until")
            params["until"] = self.until
        return " AND ".join(parts), params


def _check_scope_filter(value: str) -> str:
    from keyrotor.audit.grants import check_pattern

    return check_pattern(value)


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


_SELECT = (
    "SELECT id, event_type, scope, key_version, success, actor, ip_address, user_agent, "
    f"error_message, metadata, created_at, prev_hash, row_hash FROM {TABLE}"
)


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
    where, params = query.where()
    stmt = text(f"{_SELECT} WHERE {where} ORDER BY id LIMIT :limit")
    result = await session.execute(stmt, {**params, "limit": query.limit})
    return [row_dict(r) for r in result.all()]


async def tail_events(session: AsyncSession, n: int) -> list[dict[str, Any]]:
    """The newest ``n`` events, oldest first."""
    stmt = text(f"SELECT * FROM ({_SELECT} ORDER BY id DESC LIMIT :n) t ORDER BY id")
    return [row_dict(r) for r in (await session.execute(stmt, {"n": n})).all()]
