"""An audit event and its normal form: what is stored is exactly what is hashed.

:class:`AuditEvent` is what callers build; :func:`event_row` validates and normalises it into a
:data:`Row`, the plain tuple the writers queue and the chain (:mod:`keyrotor.audit.chain`) hashes.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any, Literal

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

# Column limits: longer values are cut (and marked), never refused, so that one odd event
# can never block the writer's queue.
MAX_ACTOR_CHARS = 200
MAX_SHORT_CHARS = 512  # scope, ip address, user agent
MAX_ERROR_CHARS = 2_000
INT8 = 2**63

# The one JSON encoder of the chain: sorted keys, no spaces, ASCII only, no NaN.
_ENC = json.JSONEncoder(sort_keys=True, separators=(",", ":"), ensure_ascii=True, allow_nan=False)
_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
_ONE_US = timedelta(microseconds=1)


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
# A plain tuple of plain values: KeyManager builds one on every call, and a frozen dataclass or
# a datetime would cost several times more than ``time.time_ns() // 1000``.
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


def utc(value: datetime) -> datetime:
    """``value`` as an aware UTC datetime (naive values are taken to be UTC already)."""
    if value.tzinfo is None:
        return value.replace(tzinfo=UTC)
    return value if value.tzinfo is UTC else value.astimezone(UTC)


def to_us(value: datetime) -> int:
    """A datetime (naive means UTC) in microseconds since 1970-01-01 UTC."""
    return (utc(value) - _EPOCH) // _ONE_US


def from_us(micros: int) -> datetime:
    """The aware UTC datetime of :func:`to_us`."""
    return _EPOCH + timedelta(microseconds=micros)


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


def printable(value: str) -> str:
    """``value`` with every character that is not printable (a newline, an ANSI escape, a lone
    surrogate) written as its Python escape (``\\n``, ``\\x1b``), so that it stays legible."""
    if value.isprintable():
        return value
    return "".join(c if c.isprintable() else c.encode("unicode_escape").decode("ascii") for c in value)


def clean_short(value: str | None) -> str | None:
    """:func:`clean_text` for short optional fields (scope, ip, user agent), printable only.

    These come from the network (a client's address, its User-Agent): escaped, a newline or a
    terminal escape in one can neither forge a line of ``audit tail`` nor drive a terminal.
    """
    return None if value is None else clean_text(printable(str(value)), MAX_SHORT_CHARS)


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


def metadata_json(metadata: dict[str, Any]) -> str:
    """Metadata as the chain encodes (and the table stores) it: sorted-key ASCII JSON."""
    return _ENC.encode(metadata) if metadata else "{}"


def event_row(event: AuditEvent) -> Row:
    """Validate and normalise an :class:`AuditEvent` into a queueable :data:`Row`.

    Raises:
        InvalidInput: unknown event type.
    """
    if event.event_type not in EVENT_TYPES:
        raise InvalidInput(f"unknown audit event type {str(event.event_type)[:40]!r}")
    metadata = normalize_metadata(dict(event.metadata)) if event.metadata else {}
    key_version = event.key_version
    if key_version is not None and (not isinstance(key_version, int) or not -INT8 <= key_version < INT8):
        metadata["key_version"] = str(key_version)
        key_version = None
    return (
        event.event_type,
        clean_short(event.scope),
        key_version,
        bool(event.success),
        None if event.actor is None else clean_text(printable(str(event.actor)), MAX_ACTOR_CHARS),
        clean_short(event.ip_address),
        clean_short(event.user_agent),
        None if event.error_message is None else clean_text(str(event.error_message), MAX_ERROR_CHARS),
        metadata_json(metadata),
        to_us(event.created_at),
    )
