"""Migration of legacy (old Node backend) ciphertexts to ``kr1`` envelope values, online.

Where: keyrotor's ``secrets`` and every registered application column (:mod:`keyrotor.census.columns`).
What, a batch at a time (``KEYROTOR_LEGACY_BATCH_ROWS`` rows in keyset order of the key)::

    SELECT pk, value, scope FROM t WHERE value <> '' AND value NOT LIKE 'kr1:%' AND pk > :cursor
      ORDER BY pk LIMIT :n   -- NULL and '' hold no key: skipped
    -- no row locks while scrypt runs (30-80 ms a value): the application keeps reading and writing
    decrypt in a process pool (keyrotor.crypto.legacy_format.decrypt_many; scrypt never runs on the
event loop)
    check: valid UTF-8 (decrypt's own check); provider key shape (reported, not enforced)
    seal under the scope's active DEK with the row's context; open it again and compare
    UPDATE t SET value = u.new FROM unnest(ids, olds, news, scopes) u
      WHERE t.pk = u.id AND t.value = u.old AND t.scope = u.scope RETURNING pk  -- compare-and-swap
    + the run's cursor and counters, in the same transaction

A row the application changed, deleted or moved to another scope (its scope column) meanwhile
is not overwritten (reported as ``changed``; it is migrated by the next run if it is still
legacy). A value that does not decrypt (tampered, or another master key) is left as it was and
reported with its row id and reason, never its value.
Every batch commits with the run's cursor (``rotations`` row of kind ``legacy``), so a killed or
cancelled run resumes after its last committed batch; running it again is harmless.
"""

from __future__ import annotations

import concurrent.futures
import os
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, cast

import structlog
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from keyrotor import runs
from keyrotor.crypto import legacy_format as legacy
from keyrotor.errors import ConfigurationError, KeyrotorError, PermanentError
from keyrotor.keys import KeyManager
from keyrotor.legacy import events
from keyrotor.legacy.batch import KeyEvidence, decrypt_batch, make_executor, open_batch, shape_warning
from keyrotor.legacy.report import ColumnReport, LegacyReport, known_failures, report_after, report_of
from keyrotor.legacy.second_phase import (
    ImportedDek,
    decrypt_second_phase,
    encrypt_second_phase,
    import_dek,
    try_second_phase,
)
from keyrotor.legacy.sources import column_source, sources
from keyrotor.rotation.context import run_to_commit
from keyrotor.runs import RunInfo
from keyrotor.store import db
from keyrotor.store import legacy as store
from keyrotor.store.key_ranges import Key
from keyrotor.store.legacy import SealedBatch, Source
from keyrotor.store.targets import raw_connection

log = structlog.get_logger("keyrotor.legacy.migration")


async def migrate_legacy(
    km: KeyManager,
    *,
    executor: concurrent.futures.Executor | None = None,
    workers: int = 0,
    dry_run: bool = False,
    run_id: int | None = None,
    trigger: str = "api",
    job_id: str | None = None,
    batch_rows: int = 64,
    on_progress: Callable[[int, int], None] | None = None,
) -> LegacyReport:
    """Migrate every legacy value to ``kr1`` (or, with ``dry_run``, decrypt and report only).

    Args:
        km: an open KeyManager (its settings give the legacy master key).
        executor: where scrypt runs; default a new process pool of ``workers`` (0: one a core).
        dry_run: decrypt, check and seal (under a throwaway key), but write nothing: no run row,
            scope, DEK, encryption reservation or census location either.
        run_id: resume this run (a ``legacy`` run); default open or join the open one.
        batch_rows: rows a batch (one transaction, one pool round).
        on_progress: ``on_progress(done, total)`` after each batch.

    Returns:
        The report: per source, migrated / already migrated / changed / failed (ids and reasons).

    Raises:
        ConfigurationError: no legacy master key, or it is the wrong one (every value fails).
        RunFailed: ``run_id`` is not a legacy run.
    """
    key = km.settings.legacy_key
    if key is None:
        raise ConfigurationError("legacy migration needs ENCRYPTION_KEY (or KEYROTOR_LEGACY_KEY)")
    legacy._password(key)  # a blank key fails here, once
    own = executor is None
    n_workers = workers or os.cpu_count() or 1
    pool = executor or make_executor(n_workers)
    try:
        return await _migrate(
            km, key, pool, n_workers, dry_run, run_id, trigger, job_id, batch_rows, on_progress
        )
    finally:
        if own:
            pool.shutdown(wait=False, cancel_futures=True)


async def open_legacy_run(
    km: KeyManager, *, trigger: str, request_id: str | None = None
) -> tuple[RunInfo, bool]:
    """Open the legacy migration run, or join the open one, recording ``request_id`` on it.

    Raises:
        InvalidRequestId: ``request_id`` is not valid.
    """
    async with db.transaction(km.sessions) as session:
        return await runs.open_run(session, cast(Any, "legacy"), None, trigger=trigger, request_id=request_id)


async def _migrate(
    km: KeyManager,
    key: str,
    pool: concurrent.futures.Executor,
    workers: int,
    dry_run: bool,
    run_id: int | None,
    trigger: str,
    job_id: str | None,
    batch_rows: int,
    on_progress: Callable[[int, int], None] | None,
) -> LegacyReport:
    m = _Migration(km, key, pool, workers, batch_rows, on_progress, LegacyReport(dry_run=dry_run))
    if not dry_run:
        ended = await m.resume(run_id, trigger, job_id)
        if ended is not None:
            return ended
    srcs = await sources(km)
    await m.count(srcs)
    try:
        for src in srcs:
            await m.migrate_source(src)
    except PermanentError as exc:
        if m.run is not None and isinstance(exc, KeyrotorError):
            async with db.transaction(km.sessions) as session:
                await events.fail(session, m.run.id, exc)
        raise
    await m.finish()
    return m.report


@dataclass
class _Migration:
    """A single-worker migration (or dry run) under way: its run, cursors and counters."""

    km: KeyManager
    key: str
    pool: concurrent.futures.Executor
    workers: int
    batch_rows: int
    on_progress: Callable[[int, int], None] | None
    report: LegacyReport
    run: RunInfo | None = None  # None: a dry run
    cursors: dict[str, Key] = field(default_factory=dict)  # source -> last key done
    done: int = 0
    total: int = 0
    second: dict[str, list[AESGCM]] = field(default_factory=dict)  # scope -> second-phase ciphers
    evidence: KeyEvidence = field(default_factory=KeyEvidence)  # of this attempt's key (check_wrong_key)

    async def resume(self, run_id: int | None, trigger: str, job_id: str | None) -> LegacyReport | None:
        """Open (or join) the run, or take ``run_id``, and pick up where it stopped.

        Returns the run's report if it has ended already (nothing to do).
        """
        if run_id is None:
            run, _ = await open_legacy_run(self.km, trigger=trigger)
        else:
            async with db.transaction(self.km.sessions) as session:
                run = await runs.require_run(session, run_id)
            if run.kind != "legacy":
                raise runs.RunFailed(f"run {run_id} is not a legacy migration")
        self.report.run_id = run.id
        if run.terminal:
            return report_of(run)
        async with db.transaction(self.km.sessions) as session:
            self.run = run = await runs.start_attempt(session, run.id, job_id)
        self.cursors = {k: v for k, v in run.detail.get("cursors", {}).items() if isinstance(v, int | str)}
        for d in run.detail.get("columns", []):
            self.report.columns[d["column"]] = ColumnReport.from_dict(d)
        structlog.contextvars.bind_contextvars(run_id=run.id)
        return None

    async def count(self, srcs: list[Source]) -> None:
        """Count what is left to do (and, on a first attempt at a source, what it holds)."""
        async with db.transaction(self.km.sessions) as session:
            self.evidence = KeyEvidence(await known_failures(session, self.run.id if self.run else None))
        for rep in self.report.columns.values():  # failures of earlier attempts (resume)
            self.evidence.ignore(rep.column, rep.failed)
        total = 0
        for src in srcs:
            async with db.transaction(self.km.sessions) as session:
                legacy_n, kr1_n = await store.count_values(await raw_connection(session), src)
            rep = self.report.column(src.name)
            if src.name not in self.cursors:  # first attempt at this source
                rep.already_migrated = kr1_n
                rep.legacy_found = legacy_n
            total += legacy_n
        self.done = self.run.rows_done if self.run else 0
        self.total = total + self.done
        if self.run is not None:
            async with db.transaction(self.km.sessions) as session:
                await runs.add_progress(session, self.run.id, 0, total=self.total)

    async def migrate_source(self, src: Source) -> None:
        """Migrate ``src`` a batch at a time, after its cursor."""
        rep = self.report.column(src.name)
        after: Key | None = self.cursors.get(src.name)  # None: from the first key
        while True:
            async with db.transaction(self.km.sessions) as session:
                rows = await store.fetch_rows(await raw_connection(session), src, after, self.batch_rows)
            if not rows:
                return
            sealed = await open_batch(
                self.km,
                self.key,
                self.pool,
                self.workers,
                src,
                rows,
                rep,
                self.second,
                dry_run=self.report.dry_run,
            )
            self.evidence.check(
                ((c.column, f) for c in self.report.columns.values() for f in c.failed), len(sealed.ids)
            )
            after = rows[-1][0]
            self.cursors[src.name] = after
            if self.run is None:
                rep.migrated += len(sealed.ids)
            else:
                written = await run_to_commit(self._write(self.run.id, src, sealed))
                rep.migrated += len(written)
                rep.changed.extend(i for i in sealed.ids if i not in written)
            self.done += len(rows)
            if self.on_progress is not None:
                self.on_progress(self.done, self.total)

    async def _write(self, run_id: int, src: Source, sealed: SealedBatch) -> set[Key]:
        """One batch's compare-and-swap write and the run's cursor, in one transaction."""
        async with db.transaction(self.km.sessions) as session:
            written = await store.swap_values(await raw_connection(session), src, sealed)
            # The report as it will stand after this batch, so a resumed run reports the whole run.
            rep = self.report.column(src.name)
            snapshot = [c.as_dict() for c in self.report.columns.values() if c.column != src.name]
            after = report_after(rep, sealed, written)
            await runs.update_detail(session, run_id, cursors=self.cursors, columns=[*snapshot, after])
            await runs.add_progress(session, run_id, len(written))
        return written

    async def finish(self) -> None:
        """Record the final report and complete the run."""
        if self.run is None:
            return
        async with db.transaction(self.km.sessions) as session:
            await runs.update_detail(
                session,
                self.run.id,
                cursors=self.cursors,
                columns=[c.as_dict() for c in self.report.columns.values()],
            )
            await events.complete(session, self.run.id, self.report.columns.values())
        self.km.invalidate()
        log.info("legacy_migration_completed", migrated=self.report.migrated, failed=self.report.failed)


# Names applications and tests reach through this module.
__all__ = [
    "ColumnReport",
    "ImportedDek",
    "LegacyReport",
    "column_source",
    "decrypt_batch",
    "decrypt_second_phase",
    "encrypt_second_phase",
    "import_dek",
    "make_executor",
    "migrate_legacy",
    "open_legacy_run",
    "report_of",
    "shape_warning",
    "try_second_phase",
]
