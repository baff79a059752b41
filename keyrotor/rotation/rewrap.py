"""The rewrap loop that KEK rotation and KEK provider migration share.

Both walk ``data_keys`` by id in batches, resumably (the run's cursor):

1. read a batch of DEKs still to rewrap, in a short transaction of its own (no transaction is
   held across a provider call);
2. rewrap the batch with the provider(s) and verify every new wrapping, outside any transaction;
3. in one transaction: write each new wrapping with compare-and-swap on ``encrypted_dek`` (a DEK
   rotated or rewrapped meanwhile is left alone for a later pass), one ``rewrap`` audit event
   per written DEK, and the run's progress and cursor.

A pass ends when no DEK is left after the cursor; further passes start from the first id until
the caller says the run is done. What differs between the two (which DEKs, how they are
rewrapped, what the CAS also compares, what the audit event records) is a :class:`Rewrap`.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import Any, cast

import structlog
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from keyrotor import runs
from keyrotor.audit.log import AuditEvent, write_events
from keyrotor.errors import Conflict
from keyrotor.kek.base import WrapContext, WrappedDek
from keyrotor.rotation.context import run_to_commit
from keyrotor.rotation.hang import hang_point
from keyrotor.runs import RunInfo
from keyrotor.store import db
from keyrotor.store import kek as kek_store
from keyrotor.store.kek import DekToRewrap

log = structlog.get_logger("keyrotor.rotation.rewrap")

Item = tuple[WrappedDek, WrapContext]
SelectBatch = Callable[[AsyncSession, int, int], Awaitable[list[DekToRewrap]]]
"""``(session, after, limit)`` -> the next DEKs to rewrap, by id."""
RewrapItems = Callable[[list[Item]], Awaitable[list[WrappedDek]]]
"""New, verified wrappings of the items, in order; raises KekError if any does not verify."""
Metadata = Callable[[WrappedDek, WrappedDek], dict[str, Any]]
"""``(old, new)`` -> the audit event's metadata between ``run_id`` and the request ids."""


@dataclass(frozen=True)
class Rewrap:
    """One run's rewrap: the batches it reads, rewraps and writes, and the passes over them.

    ``match_kek_id``: the compare-and-swap also compares the old ``kek_id`` (a migration must
    not overwrite a DEK that another process moved to another provider meanwhile).
    """

    sessions: async_sessionmaker[AsyncSession]
    run: RunInfo
    select: SelectBatch
    rewrap: RewrapItems
    metadata: Metadata
    batch_size: int
    progress_event: str
    progress_fields: dict[str, Any]
    match_kek_id: bool = False

    async def all_passes(self, finished: Callable[[int, int], Awaitable[bool]]) -> int:
        """Rewrap batch after batch from the run's cursor; returns the DEKs written.

        At the end of each pass ``finished(passes before this one, last id seen)`` says whether
        the run is done; if not, another pass starts from the first id.
        """
        written, after, passes = 0, self.run.cursor, 0
        while True:
            n, last_id = await run_to_commit(self.batch(after))
            if last_id is not None:
                written += n
                after = last_id
                log.info(self.progress_event, rows=n, **self.progress_fields)
                await hang_point("rewrap_between_batches")
                continue
            if await finished(passes, after):
                return written
            after, passes = 0, passes + 1

    async def batch(self, after: int) -> tuple[int, int | None]:
        """Rewrap the next batch after id ``after``: (DEKs written, last id), or (0, None) at the end."""
        async with db.transaction(self.sessions) as session:
            rows = await self.select(session, after, self.batch_size)
        if not rows:
            return 0, None
        items = [
            (WrappedDek(row.kek_id, row.kek_version, bytes(row.blob)), WrapContext(row.scope, row.version))
            for row in rows
        ]
        fresh = await self.rewrap(items)
        await hang_point("rewrap_before_commit")
        async with db.transaction(self.sessions) as session:
            # Locked first: an attempt that stalled past its lease (arq runs the job again) may
            # wake after another ended the run; it then writes nothing of its batch and the pass
            # ends (the caller's completion is a no-op on an ended run).
            if (await runs.require_run(session, self.run.id, for_update=True)).terminal:
                log.warning("run_ended_meanwhile", rows=0, **self.progress_fields)
                return 0, None
            written = await self._swap(session, rows, items, fresh)
            await runs.add_progress(session, self.run.id, written, cursor=rows[-1].id)
        return written, rows[-1].id

    async def _swap(
        self, session: AsyncSession, rows: Sequence[DekToRewrap], items: list[Item], fresh: list[WrappedDek]
    ) -> int:
        events: list[AuditEvent] = []
        for row, (old, _ctx), new in zip(rows, items, fresh, strict=True):
            swapped = await kek_store.swap_wrapped_dek(
                session,
                row.id,
                old_blob=old.blob,
                new_blob=new.blob,
                kek_id=new.kek_id,
                kek_version=new.kek_version,
                old_kek_id=old.kek_id if self.match_kek_id else None,
            )
            if swapped:
                events.append(
                    AuditEvent(
                        event_type="rewrap",
                        scope=row.scope,
                        key_version=row.version,
                        success=True,
                        metadata={
                            "run_id": self.run.id,
                            **self.metadata(old, new),
                            **runs.request_context(self.run.request_ids),
                        },
                    )
                )
        await write_events(session, events)
        return len(events)


async def refuse_if_open(session: AsyncSession, kind: str, what: str) -> None:
    """Raise Conflict if a run of ``kind`` (``kek`` or ``kek_migrate``) is open.

    Takes a transaction-scoped advisory lock first, so a rotation and a migration requested at
    the same moment cannot both open.
    """
    await kek_store.lock_kek_runs(session)
    other = await runs.find_open_run(session, cast(runs.RunKind, kind), None)
    if other is not None:
        raise Conflict(f"{what} (run {other.id}) is open: let it finish (or fail) first")
