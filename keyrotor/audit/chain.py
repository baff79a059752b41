"""The chain: how audit rows are numbered and hashed.

Each row's ``id`` is its position in the chain (1, 2, 3, ... with no gaps; a gap means a deleted
row), and

    row_hash = HMAC-SHA256(audit key, prev_hash || canonical(row))   prev_hash = row_hash of id - 1

where :func:`canonical` is the row's other columns as one line of PostgreSQL's COPY text format
(which the writer sends anyway, so one string per row is both hashed and sent), and the first
row's ``prev_hash`` is :data:`GENESIS` (or, after ``keyrotor audit prune``, the hash of the last
pruned row, vouched for by an ``anchor`` row). Rows written before the audit key existed
(:mod:`keyrotor.audit.key`) are plain SHA-256 (format ``kra1``). Pure: no I/O.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable, Sequence
from datetime import UTC, datetime
from typing import Any

from keyrotor.audit.events import AuditEvent, Row, event_row, from_us, to_us
from keyrotor.audit.key import AuditKey

GENESIS = b"\x00" * 32
# Bumped if the canonical form ever changes; it is the first element of every hashed document.
# kra1: SHA-256, rows written before the audit key existed; kra2: HMAC-SHA256 under the audit
# key (keyrotor.audit.key), the key's id following the tag.
CHAIN_FORMAT = "kra1"
KEYED_FORMAT = "kra2"
_sha256 = hashlib.sha256


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


def chain_hash(prev_hash: bytes, event: AuditEvent, seq: int, key: AuditKey | None = None) -> bytes:
    """``SHA-256(prev_hash || canonical(event at position seq))``, or its HMAC under ``key``."""
    r = event_row(event)
    if key is None:
        return _sha256(prev_hash + canonical(seq, *r[:8], from_us(r[9]), r[8])).digest()
    return key.mac(prev_hash + canonical(seq, *r[:8], from_us(r[9]), r[8], key.key_id))


# A chained record, in the column order of keyrotor.store.audit.COLUMNS (created_at in microseconds).
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
_TAG = CHAIN_FORMAT.encode() + b"\t"
# The COPY fields event_type .. error_message of rows seen, by their values (see _chain).
_HEADS: dict[tuple[Any, ...], str] = {}


def _head(values: tuple[Any, ...]) -> str:
    event_type, scope, key_version, success, actor, ip, agent, error = values
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
        )
    )


def _chain(
    last_id: int,
    prev_hash: bytes,
    rows: Sequence[Row],
    records: list[Record] | None,
    key: AuditKey | None,
    hex_prefix: str = "\\\\x",  # bytea in COPY text: \\x<hex>
) -> tuple[str, int, bytes]:
    # The writer's hot loop: one f-string a row is both what is hashed and what is sent. The
    # fields between id and the metadata repeat from event to event (the same caller decrypting
    # the same scope), so their COPY spelling is looked up by the row's values, built once. The
    # metadata is not part of that key: it holds the call's context, which a service decrypting
    # for many users rarely repeats, and it needs no escape unless it holds a backslash (ASCII
    # JSON has no tab or newline but as an escape).
    lines: list[str] = []
    append = lines.append
    heads = _HEADS
    clock = _Clock()
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
        row_key = row[:8]
        head = heads.get(row_key)
        if head is None:
            head = _head(row_key)
            if len(heads) < _COPIED_MAX:
                heads[row_key] = head
        meta = row[8]
        if "\\" in meta or "\t" in meta or "\n" in meta or "\r" in meta:
            meta = copy_field(meta)
        last_id += 1
        fields = f"{last_id}\t{head}\t{meta}\t{clock.text(row[9])}"
        row_hash = digest(prev_hash + tag + fields.encode())
        row_hex = row_hash.hex()
        append(f"{fields}\t{hex_prefix}{prev_hex}\t{hex_prefix}{row_hex}\t{key_field}\n")
        if records is not None:
            records.append((last_id, *row, prev_hash, row_hash, key_id))
        prev_hash, prev_hex = row_hash, row_hex
    return "".join(lines), last_id, prev_hash


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
    data, last_id, last_hash = _chain(last_id, prev_hash, rows, None, key)
    return data.encode(), last_id, last_hash


def chain_lines(
    last_id: int, prev_hash: bytes, rows: Sequence[Row], key: AuditKey | None = None
) -> tuple[str | None, int, bytes]:
    """Number and hash ``rows`` after the chain head, as one text for
    ``keyrotor.store.audit.insert_lines_on_head``: the rows' COPY lines with the two hashes in
    plain hex, split on the server by ``string_to_array`` (``\\N`` the NULL marker).

    One text parameter, because asyncpg encodes the fourteen arrays of the column-wise insert
    element by element in Python (about 8 us a row, more than the rest of the writer's work).
    The split cannot undo COPY's backslash escapes, so when any field needed one (a tab or a
    newline in a value, a backslash in metadata JSON: a context outside ASCII, say) the text is
    None and the caller inserts the rows column-wise instead.

    Returns:
        ``(text or None, id of the last row, row_hash of the last row)``.
    """
    text, last_id, last_hash = _chain(last_id, prev_hash, rows, None, key, hex_prefix="")
    # Unescaped, every backslash starts a NULL marker; an escape adds one that does not.
    if text.count("\\") != text.count("\\N"):
        return None, last_id, last_hash
    return text[:-1], last_id, last_hash  # no empty element after the last newline
