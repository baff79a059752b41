"""Verify the audit chain, and prune old rows without breaking it.

:func:`verify_chain` walks the whole log in id order, in keyset pages (memory stays flat), and
stops at the first row that is wrong, saying what is wrong with it:

``edited``
    the row's content no longer matches its ``row_hash`` (or its ``row_hash`` was recomputed
    after an edit, so the next row's ``prev_hash`` no longer matches it);
``deleted``
    ids jump (rows were removed from the middle), or the oldest rows are missing and no
    ``anchor`` row vouches for a prune;
``reordered``
    the row's hash matches its content only at another position: rows were moved or swapped.

What a chain cannot show by itself: the newest rows deleted, or the whole log rewritten with
fresh hashes. Keep the head that ``verify`` prints (``id`` and ``row_hash``) somewhere else
and pass it back as a checkpoint (``keyrotor audit verify --checkpoint ID:HASH``): a head that
is gone or changed is reported.

:func:`prune` deletes the oldest rows (a prefix of the chain) and appends an ``anchor`` event
recording the id and hash of the last deleted row, so the remaining chain still verifies.
"""

from __future__ import annotations

import hashlib
import hmac
import json
from collections.abc import Callable
from dataclasses import asdict, dataclass
from datetime import datetime
from typing import Any, Literal

from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from keyrotor.audit import (
    CHAIN_LOCK,
    GENESIS,
    TABLE,
    AuditEvent,
    canonical,
    utc,
    write_events,
)
from keyrotor.errors import InvalidInput
from keyrotor.store import db

Problem = Literal["edited", "deleted", "reordered"]
PAGE_ROWS = 5_000
# How far a moved row is looked for (hash recomputations, only once a row is already wrong).
REORDER_WINDOW = 1_000


@dataclass
class ChainReport:
    """The outcome of :func:`verify_chain`. ``ok`` is False at the first problem found."""

    ok: bool = True
    checked: int = 0
    first_id: int | None = None
    head_id: int | None = None
    head_hash: str | None = None
    anchored: bool = False  # the oldest rows were pruned, and an anchor vouches for it
    bad_id: int | None = None
    problem: Problem | None = None
    detail: str | None = None

    def as_dict(self) -> dict[str, Any]:
        return asdict(self)

    def fail(self, row_id: int, problem: Problem, detail: str) -> ChainReport:
        self.ok, self.bad_id, self.problem, self.detail = False, row_id, problem, detail
        return self


def parse_checkpoint(value: str) -> tuple[int, bytes]:
    """Parse ``ID:HEX`` (a head printed by an earlier ``verify``).

    Raises:
        InvalidInput: not of that form.
    """
    row_id, sep, hex_hash = value.partition(":")
    try:
        if not sep or not row_id.isdigit():
            raise ValueError
        digest = bytes.fromhex(hex_hash)
        if len(digest) != 32:
            raise ValueError
    except ValueError:
        raise InvalidInput("a checkpoint is ID:HASH, the id and 64-hex-digit row_hash of a row") from None
    return int(row_id), digest


def _hash(row: Any, row_id: int | None = None) -> bytes:
    """The row_hash a row should have (at position ``row_id``, default its own id)."""
    body = canonical(
        row[0] if row_id is None else row_id,
        row[1],
        row[2],
        row[3],
        row[4],
        row[5],
        row[6],
        row[7],
        row[8],
        row[10],
        row[9],
    )
    return hashlib.sha256(bytes(row[11]) + body).digest()


_PAGE_SQL = text(
    "SELECT id, event_type, scope, key_version, success, actor, ip_address, user_agent, error_message, "
    f"metadata::text, created_at, prev_hash, row_hash FROM {TABLE} WHERE id > :after ORDER BY id LIMIT :n"
)


async def verify_chain(
    sessions: async_sessionmaker[AsyncSession],
    *,
    checkpoint: tuple[int, bytes] | None = None,
    page_rows: int = PAGE_ROWS,
    on_progress: Callable[[int], None] | None = None,
) -> ChainReport:
    """Check every row's hash and link, oldest first; stop at the first problem.

    Args:
        checkpoint: ``(id, row_hash)`` of a head recorded earlier: that row must still be
            there with that hash (unless it was pruned away).
        on_progress: called with the number of rows of each page checked.
    """
    report = ChainReport()
    after = 0
    expected_id: int | None = None
    prev_hash = b""
    # (first id, its prev_hash): what an anchor must vouch for when rows 1..first-1 are gone
    needs_anchor: tuple[int, bytes] | None = None
    while True:
        async with db.transaction(sessions) as session:
            page = (await session.execute(_PAGE_SQL, {"after": after, "n": page_rows})).all()
        if not page:
            break
        for row in page:
            row_id = int(row[0])
            stored_prev, stored_hash = bytes(row[11]), bytes(row[12])
            if expected_id is None:
                report.first_id = row_id
                if row_id == 1:
                    if stored_prev != GENESIS:
                        return report.fail(row_id, "edited", "row 1 does not start from the genesis hash")
                else:
                    needs_anchor = (row_id, stored_prev)
            elif row_id != expected_id:
                missing = f"{expected_id}" if row_id == expected_id + 1 else f"{expected_id}..{row_id - 1}"
                return report.fail(
                    expected_id,
                    "deleted",
                    f"row(s) {missing} are missing: ids jump from {expected_id - 1} to {row_id}",
                )
            content_ok = hmac.compare_digest(_hash(row), stored_hash)
            link_ok = expected_id is None or hmac.compare_digest(stored_prev, prev_hash)
            if not content_ok:
                return report.fail(row_id, *_explain(row, link_ok))
            if not link_ok:
                return report.fail(
                    row_id - 1,
                    "edited",
                    f"row {row_id - 1} was changed and re-hashed: row {row_id} recorded another hash for it",
                )
            if needs_anchor is not None and row[1] == "anchor" and _vouches(row[9], needs_anchor):
                report.anchored = True
            if checkpoint is not None and row_id == checkpoint[0] and stored_hash != checkpoint[1]:
                return report.fail(row_id, "edited", f"row {row_id} no longer has the checkpoint's hash")
            prev_hash, expected_id = stored_hash, row_id + 1
            report.checked += 1
        after = int(page[-1][0])
        if on_progress is not None:
            on_progress(len(page))
    if expected_id is not None:
        report.head_id, report.head_hash = expected_id - 1, prev_hash.hex()
    if needs_anchor is not None and not report.anchored:
        first = needs_anchor[0]
        return report.fail(
            first,
            "deleted",
            f"rows 1..{first - 1} are missing and no anchor row records pruning them",
        )
    if checkpoint is not None:
        cp_id = checkpoint[0]
        if report.head_id is None or cp_id > report.head_id:
            return report.fail(
                cp_id,
                "deleted",
                f"the log ends at id {report.head_id or 0}, before the checkpoint's id {cp_id}: "
                "the newest rows were deleted",
            )
    return report


def _vouches(metadata_text: str, needs: tuple[int, bytes]) -> bool:
    try:
        metadata = json.loads(metadata_text)
    except ValueError:
        return False
    if not isinstance(metadata, dict):
        return False
    return (
        metadata.get("pruned_through_id") == needs[0] - 1
        and metadata.get("pruned_head_hash") == needs[1].hex()
    )


def _explain(row: Any, link_ok: bool) -> tuple[Problem, str]:
    row_id = int(row[0])
    if not link_ok:
        # Hashed at another position? Then the row was moved (swapped, renumbered).
        stored = bytes(row[12])
        for delta in range(1, REORDER_WINDOW + 1):
            for candidate in (row_id + delta, row_id - delta):
                if candidate > 0 and hmac.compare_digest(_hash(row, candidate), stored):
                    return (
                        "reordered",
                        f"row {row_id} was written as row {candidate}: rows were moved or swapped",
                    )
    return "edited", f"row {row_id}'s content does not match its hash: it was edited"


@dataclass(frozen=True)
class PruneResult:
    """What :func:`prune` did."""

    deleted: int
    through_id: int | None
    anchor_id: int | None


async def prune(sessions: async_sessionmaker[AsyncSession], before: datetime, *, actor: str) -> PruneResult:
    """Delete the oldest rows created before ``before``, and record an ``anchor``.

    Deletes the longest prefix of the chain whose rows were all created before ``before`` (a
    row of a slow clock does not punch a hole in the chain), then appends an ``anchor`` event
    (by ``actor``) holding the id and hash of the last deleted row and the count, in one
    transaction under the chain lock.
    """
    before = utc(before)
    async with db.transaction(sessions) as session:
        await session.execute(text("SELECT pg_advisory_xact_lock(:k)"), {"k": CHAIN_LOCK})
        first_young = (
            await session.execute(
                text(f"SELECT min(id) FROM {TABLE} WHERE created_at >= :before"), {"before": before}
            )
        ).scalar_one()
        bounds = (await session.execute(text(f"SELECT min(id), max(id) FROM {TABLE}"))).one()
        if bounds[0] is None:
            return PruneResult(0, None, None)
        through = int(bounds[1]) if first_young is None else int(first_young) - 1
        if through < int(bounds[0]):
            return PruneResult(0, None, None)
        head_hash = (
            await session.execute(text(f"SELECT row_hash FROM {TABLE} WHERE id = :id"), {"id": through})
        ).scalar_one()
        # The anchor first: appended after the current head, it is never among the deleted rows,
        # and the chain continues from the head even when every older row goes.
        (anchor_id,) = await write_events(
            session,
            [
                AuditEvent(
                    "anchor",
                    actor=actor,
                    metadata={
                        "pruned_through_id": through,
                        "pruned_head_hash": bytes(head_hash).hex(),
                        "pruned_rows": through - int(bounds[0]) + 1,
                        "before": before.isoformat(),
                    },
                )
            ],
        )
        await session.execute(text("SELECT set_config('keyrotor.audit_prune', 'on', true)"))
        deleted = (
            await session.execute(text(f"DELETE FROM {TABLE} WHERE id <= :id"), {"id": through})
        ).rowcount  # type: ignore[attr-defined]
        await session.execute(text("SELECT set_config('keyrotor.audit_prune', 'off', true)"))
    return PruneResult(int(deleted), through, anchor_id)


async def count_rows(session: AsyncSession) -> int:
    """How many rows the log holds."""
    return int((await session.execute(text(f"SELECT count(*) FROM {TABLE}"))).scalar_one())
