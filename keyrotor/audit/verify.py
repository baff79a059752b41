"""Verify the audit chain, and prune old rows without breaking it.

:func:`verify_chain` walks the whole log in id order, in keyset pages (memory stays flat), and
stops at the first row that is wrong, saying what is wrong with it:

``edited``
    the row's content no longer matches its ``row_hash`` (or its ``row_hash`` was recomputed
    after an edit, so the next row's ``prev_hash`` no longer matches it);
``deleted``
    ids jump (rows were removed from the middle), or the oldest rows are missing, and no
    ``anchor`` row vouches for a prune (the walk reads a page a transaction, so a prune that
    commits meanwhile deletes rows ahead of it: its anchor, after the head, vouches for that gap);
``reordered``
    the row's hash matches its content only at another position: rows were moved or swapped;
``downgraded``
    a row after the switch to the keyed format (``keyrotor.audit.key``) is unkeyed, a row
    claims a key the chain did not have yet, or the chain ends before an audit key's switch
    point (the rows up to it existed when the key was made: the keyed tail was cut off, and
    older rows with it, so that what is left looks like a log from before the key).

Rows after the switch point are HMAC-SHA256 under the audit key, so verifying them needs the
key (``keyrotor.audit.key.load_keys``, through the KEK), and a database writer without it
cannot rewrite them so that they verify. Rows up to the switch point are plain SHA-256.

What a chain cannot show by itself: the newest rows deleted. Signed checkpoints written
outside the database (``keyrotor.audit.checkpoint``) record the head; pass the latest back
(``keyrotor audit verify --checkpoint-file F`` or ``--checkpoint ID:HASH``): a head that is
gone or changed is reported.

:func:`prune` deletes the oldest rows (a prefix of the chain) and appends an ``anchor`` event
recording the id and hash of the last deleted row, so the remaining chain still verifies.
"""

from __future__ import annotations

import hashlib
import hmac
import json
from collections.abc import Callable, Mapping
from dataclasses import asdict, dataclass
from datetime import datetime
from typing import Any, Literal

from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from keyrotor.audit.chain import GENESIS, canonical
from keyrotor.audit.events import AuditEvent, utc
from keyrotor.audit.key import AuditKey, key_for, key_in_session
from keyrotor.audit.log import write_events
from keyrotor.errors import Conflict, InvalidInput
from keyrotor.store import audit as store
from keyrotor.store import db

Problem = Literal["edited", "deleted", "reordered", "downgraded"]
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
    switch_after: int | None = None  # rows after this id are keyed (None: no audit key yet)
    keyed: int = 0  # rows checked with the audit key
    checkpoint: str | None = None  # the signed checkpoint checked against: "ID:HASH at TIME"
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


def _hash(row: Any, keys: Mapping[int, AuditKey], row_id: int | None = None) -> bytes | None:
    """The row_hash a row should have (at position ``row_id``, default its own id); None if
    it names an audit key that is not known."""
    key_id = row[13]
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
        key_id,
    )
    if key_id is None:
        return hashlib.sha256(bytes(row[11]) + body).digest()
    key = keys.get(int(key_id))
    return None if key is None else key.mac(bytes(row[11]) + body)


class _Walk:
    """The state of one walk along the chain, row by row, oldest first."""

    def __init__(
        self,
        keys: Mapping[int, AuditKey],
        switch_after: int | None,
        checkpoint: tuple[int, bytes] | None,
        *,
        head_floor: int | None = None,
        concurrent_prunes: bool = False,
    ) -> None:
        self.report = ChainReport(switch_after=switch_after)
        self.keys = keys
        self.checkpoint = checkpoint
        # The highest switch point of the audit keys: the chain had reached it when that key was
        # made, and appends and prunes only ever move the head forward.
        self.head_floor = head_floor
        self.expected_id: int | None = None
        self.prev_hash = b""
        # (first id, its prev_hash): what an anchor must vouch for when rows 1..first-1 are gone
        self.needs_anchor: tuple[int, bytes] | None = None
        # A walk in many transactions (verify_chain) may see prunes that committed between two
        # pages: the rows one deleted ahead of the walk are a gap that its anchor, appended after
        # the head, must vouch for. Pending gaps: (row after it, its prev_hash, first missing id,
        # what is missing).
        self.concurrent_prunes = concurrent_prunes
        self.gaps: list[tuple[int, bytes, int, str]] = []

    def check(self, row: Any) -> bool:
        """Check the next row; False (and the report failed) at a problem."""
        row_id = int(row[0])
        stored_hash = bytes(row[12])
        if not self._in_place(row_id, bytes(row[11])):
            return False
        report = self.report
        bad_format = _format_problem(row, report.switch_after, self.keys)
        if bad_format is not None:
            self._fail(row_id, *bad_format)
            return False
        expected = _hash(row, self.keys)
        content_ok = expected is not None and hmac.compare_digest(expected, stored_hash)
        link_ok = self.expected_id is None or hmac.compare_digest(bytes(row[11]), self.prev_hash)
        if not content_ok:
            self._fail(row_id, *_explain(row, self.keys, link_ok))
            return False
        if not link_ok:
            self._fail(
                row_id - 1,
                "edited",
                f"row {row_id - 1} was changed and re-hashed: row {row_id} recorded another hash for it",
            )
            return False
        if row[1] == "anchor":
            if self.needs_anchor is not None and _vouches(row[9], self.needs_anchor):
                report.anchored = True
            self.gaps = [g for g in self.gaps if not _vouches(row[9], (g[0], g[1]))]
        if self.checkpoint is not None and row_id == self.checkpoint[0] and stored_hash != self.checkpoint[1]:
            self._fail(row_id, "edited", f"row {row_id} no longer has the checkpoint's hash")
            return False
        self.prev_hash, self.expected_id = stored_hash, row_id + 1
        report.checked += 1
        report.keyed += row[13] is not None
        return True

    def _in_place(self, row_id: int, stored_prev: bytes) -> bool:
        """Whether the row starts the chain rightly or follows the previous one without a gap."""
        expected_id = self.expected_id
        if expected_id is None:
            self.report.first_id = row_id
            if row_id != 1:
                self.needs_anchor = (row_id, stored_prev)
            elif stored_prev != GENESIS:
                self.report.fail(row_id, "edited", "row 1 does not start from the genesis hash")
                return False
        elif row_id != expected_id:
            missing = f"{expected_id}" if row_id == expected_id + 1 else f"{expected_id}..{row_id - 1}"
            detail = f"row(s) {missing} are missing: ids jump from {expected_id - 1} to {row_id}"
            if self.concurrent_prunes:
                self.gaps.append((row_id, stored_prev, expected_id, detail))
                self.prev_hash = stored_prev  # the link to the deleted row is the anchor's to vouch for
                return True
            self._fail(expected_id, "deleted", detail)
            return False
        return True

    def _fail(self, row_id: int, problem: Problem, detail: str) -> ChainReport:
        """Fail the report at the first problem: a gap no anchor has vouched for yet comes first."""
        if self.gaps:
            gap = self.gaps[0]
            return self.report.fail(gap[2], "deleted", f"{gap[3]}, and no anchor row records pruning them")
        return self.report.fail(row_id, problem, detail)

    def finish(self) -> ChainReport:
        """The report once every row is checked: the head, and what the chain's ends must show."""
        report = self.report
        if self.expected_id is not None:
            report.head_id, report.head_hash = self.expected_id - 1, self.prev_hash.hex()
        if self.gaps:
            return self._fail(0, "deleted", "")
        if self.needs_anchor is not None and not report.anchored:
            first = self.needs_anchor[0]
            return report.fail(
                first,
                "deleted",
                f"rows 1..{first - 1} are missing and no anchor row records pruning them",
            )
        if self.checkpoint is not None:
            cp_id = self.checkpoint[0]
            if report.head_id is None or cp_id > report.head_id:
                return report.fail(
                    cp_id,
                    "deleted",
                    f"the log ends at id {report.head_id or 0}, before the checkpoint's id {cp_id}: "
                    "the newest rows were deleted",
                )
        head = report.head_id or 0
        if self.head_floor is not None and head < self.head_floor:
            return report.fail(
                head + 1,
                "downgraded",
                f"the log ends at id {head}, before the audit key's switch point {self.head_floor}: "
                "rows the key vouches for were deleted (the keyed tail cut off)",
            )
        return report


async def verify_chain(
    sessions: async_sessionmaker[AsyncSession],
    *,
    keys: Mapping[int, AuditKey] | None = None,
    checkpoint: tuple[int, bytes] | None = None,
    page_rows: int = PAGE_ROWS,
    on_progress: Callable[[int], None] | None = None,
) -> ChainReport:
    """Check every row's hash and link, oldest first; stop at the first problem.

    Args:
        keys: the audit keys by id (``keyrotor.audit.key.load_keys``); by default the key this
            process loaded for the database, if any. A keyed row whose key is not given fails.
        checkpoint: ``(id, row_hash)`` of a head recorded earlier: that row must still be
            there with that hash (unless it was pruned away).
        on_progress: called with the number of rows of each page checked.
    """
    if keys is None:
        loaded = key_for(sessions.kw["bind"].url) if sessions.kw.get("bind") is not None else None
        keys = {} if loaded is None else {loaded.key_id: loaded}
    async with db.transaction(sessions) as session:
        switch = await store.key_switch_point(session)
    # The switch points the KEK vouches for (each is bound into its key's wrap) win over the table's.
    walk = _Walk(
        keys,
        min((k.switch_after for k in keys.values()), default=switch),
        checkpoint,
        head_floor=max((k.switch_after for k in keys.values()), default=switch),
        concurrent_prunes=True,
    )
    after = 0
    while True:
        async with db.transaction(sessions) as session:
            page = await store.chain_page(session, after, page_rows)
        if not page:
            break
        for row in page:
            if not walk.check(row):
                return walk.report
        after = int(page[-1][0])
        if on_progress is not None:
            on_progress(len(page))
    return walk.finish()


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


def _format_problem(
    row: Any, switch_after: int | None, keys: Mapping[int, AuditKey]
) -> tuple[Problem, str] | None:
    """A row in the wrong format for its position: unkeyed after the switch (a downgrade), keyed
    before it, or keyed with a key that is not known."""
    row_id, key_id = int(row[0]), row[13]
    if key_id is None:
        if switch_after is not None and row_id > switch_after:
            return (
                "downgraded",
                f"row {row_id} is unkeyed, but every row after {switch_after} must carry the audit key's MAC",
            )
        return None
    if switch_after is None or row_id <= switch_after:
        return "downgraded", f"row {row_id} claims audit key {key_id} before the chain was keyed"
    if int(key_id) not in keys:
        return "edited", f"row {row_id} names audit key {key_id}, which is not known (or not loaded)"
    return None


def _explain(row: Any, keys: Mapping[int, AuditKey], link_ok: bool) -> tuple[Problem, str]:
    row_id = int(row[0])
    if not link_ok:
        # Hashed at another position? Then the row was moved (swapped, renumbered).
        stored = bytes(row[12])
        for delta in range(1, REORDER_WINDOW + 1):
            for candidate in (row_id + delta, row_id - delta):
                moved = _hash(row, keys, candidate) if candidate > 0 else None
                if moved is not None and hmac.compare_digest(moved, stored):
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

    The rows to delete are verified first (with the audit key, as :func:`verify_chain` does,
    and, when older rows are already gone, the anchor that vouches for that): an anchor vouches
    for what it follows, so pruning an edited row, a gap or an unanchored start would erase the
    evidence and make the chain verify again.

    Raises:
        Conflict: the rows to delete do not verify; nothing was deleted.
    """
    before = utc(before)
    async with db.transaction(sessions) as session:
        await key_in_session(session)  # loaded (a KEK call) before the lock bounds idling
        await store.lock_chain(session)
        first_young = await store.first_id_since(session, before)
        bounds = await store.id_bounds(session)
        if bounds is None:
            return PruneResult(0, None, None)
        through = bounds[1] if first_young is None else first_young - 1
        if through < bounds[0]:
            return PruneResult(0, None, None)
        await _check_prunable(session, bounds[0], through)
        head_hash = await store.row_hash_of(session, through)
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
                        "pruned_head_hash": head_hash.hex(),
                        "pruned_rows": through - bounds[0] + 1,
                        "before": before.isoformat(),
                    },
                )
            ],
        )
        deleted = await store.delete_through(session, through)
    return PruneResult(deleted, through, anchor_id)


async def _check_prunable(session: AsyncSession, first: int, through: int) -> None:
    """Verify rows ``first..through`` (the ones prune deletes) in the session, under the chain lock.

    Raises:
        Conflict: a row is edited, missing or moved, or the oldest rows are gone and no valid
            anchor vouches for it.
    """
    key = await key_in_session(session)
    keys = {} if key is None else {key.key_id: key}
    switch = min((k.switch_after for k in keys.values()), default=await store.key_switch_point(session))
    walk = _Walk(keys, switch, None)
    after = first - 1
    while after < through:
        page = await store.chain_page(session, after, min(PAGE_ROWS, through - after))
        if not page:
            break
        for row in page:
            if not walk.check(row):
                report = walk.report
                raise Conflict(
                    f"the audit chain is broken at row {report.bad_id} ({report.problem}): "
                    "prune refused, nothing deleted (see `keyrotor audit verify`)"
                )
        after = int(page[-1][0])
    needs = walk.needs_anchor
    if needs is None or walk.report.anchored:
        return
    # The anchor of the prune that removed the older rows comes after the rows deleted now.
    if not any(
        _vouches(row[9], needs)
        and _format_problem(row, switch, keys) is None
        and (expected := _hash(row, keys)) is not None
        and hmac.compare_digest(expected, bytes(row[12]))
        for row in await store.anchor_rows(session, through)
    ):
        raise Conflict(
            f"rows 1..{needs[0] - 1} are missing and no anchor row records pruning them: "
            "prune refused, nothing deleted (see `keyrotor audit verify`)"
        )
