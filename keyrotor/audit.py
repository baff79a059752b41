"""The audit log: who did what to which key, hash-chained so edits are detectable.

Every row carries ``row_hash = SHA-256(prev_hash || canonical JSON of the row)``; appends
are serialised by a transaction-scoped advisory lock, so concurrent writers from many
processes keep one unbroken chain.

This module's public API (used by KeyManager, the jobs, the scheduler and the CLI):

- :class:`AuditEvent` - one event;
- :func:`write_event` - append events inside the caller's transaction, so an audit row commits
  or rolls back together with the change it records.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, Literal

from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncSession

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
]
EVENT_TYPES: tuple[str, ...] = EventType.__args__  # type: ignore[attr-defined]

# Serialises chain appends across processes, for the duration of the appending transaction.
_CHAIN_LOCK = 0x6B72_6175_6469_74  # "kraudit"
GENESIS = b"\x00" * 32


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


def canonical(event: AuditEvent, seq: int) -> bytes:
    """The bytes a row's hash covers (sorted-key JSON, UTC microsecond timestamps)."""
    doc = {
        "seq": seq,
        "event_type": event.event_type,
        "scope": event.scope,
        "key_version": event.key_version,
        "success": event.success,
        "actor": event.actor,
        "ip_address": event.ip_address,
        "user_agent": event.user_agent,
        "error_message": event.error_message,
        "metadata": event.metadata,
        "created_at": event.created_at.astimezone(UTC).isoformat(timespec="microseconds"),
    }
    return json.dumps(doc, sort_keys=True, separators=(",", ":"), default=str).encode()


def chain_hash(prev_hash: bytes, event: AuditEvent, seq: int) -> bytes:
    """``SHA-256(prev_hash || canonical(event, seq))``."""
    return hashlib.sha256(prev_hash + canonical(event, seq)).digest()


async def write_event(session: AsyncSession, *events: AuditEvent) -> None:
    """Append events to the chain inside the caller's transaction."""
    await write_events(session, events)


async def write_events(session: AsyncSession, events: Sequence[AuditEvent]) -> None:
    """Append many events in order, inside the caller's transaction, with one lock and one read."""
    if not events:
        return
    await session.execute(text("SELECT pg_advisory_xact_lock(:k)"), {"k": _CHAIN_LOCK})
    last = text("SELECT seq, row_hash FROM encryption_audit_log ORDER BY seq DESC LIMIT 1")
    head = (await session.execute(last)).first()
    seq, prev = (int(head[0]), bytes(head[1])) if head else (0, GENESIS)
    rows = []
    for event in events:
        seq += 1
        row_hash = chain_hash(prev, event, seq)
        rows.append(
            {
                "seq": seq,
                "event_type": event.event_type,
                "scope": event.scope,
                "key_version": event.key_version,
                "success": event.success,
                "actor": event.actor,
                "ip_address": event.ip_address,
                "user_agent": event.user_agent,
                "error_message": event.error_message,
                "metadata": json.dumps(event.metadata, default=str),
                "created_at": event.created_at,
                "prev_hash": prev,
                "row_hash": row_hash,
            }
        )
        prev = row_hash
    await session.execute(
        text(
            "INSERT INTO encryption_audit_log (seq, event_type, scope, key_version, success, actor, "
            "ip_address, user_agent, error_message, metadata, created_at, prev_hash, row_hash) VALUES "
            "(:seq, :event_type, :scope, :key_version, :success, :actor, :ip_address, :user_agent, "
            ":error_message, CAST(:metadata AS jsonb), :created_at, :prev_hash, :row_hash)"
        ),
        rows,
    )
