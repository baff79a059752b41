"""Migration of legacy (old Node backend) ciphertexts to ``kr1`` envelope values, online.

Where: keyrotor's ``secrets`` and every registered application column (:mod:`keyrotor.census.columns`).
What, a batch at a time (``KEYROTOR_LEGACY_BATCH_ROWS`` rows in keyset order of the key)::

    SELECT pk, value, scope FROM t WHERE value NOT LIKE 'kr1:%' AND pk > :cursor ORDER BY pk LIMIT :n
    -- no row locks while scrypt runs (30-80 ms a value): the application keeps reading and writing
    decrypt in a process pool (keyrotor.crypto.legacy_format.decrypt_many; scrypt never runs on the
event loop)
    check: valid UTF-8 (decrypt's own check); provider key shape (reported, not enforced)
    seal under the scope's active DEK with the row's context; open it again and compare
    UPDATE t SET value = u.new FROM unnest(ids, olds, news) u
      WHERE t.pk = u.id AND t.value = u.old RETURNING pk       -- compare-and-swap
    + the run's cursor and counters, in the same transaction

A row the application changed or deleted meanwhile is not overwritten (reported as ``changed``;
it is migrated by the next run if it is still legacy). A value that does not decrypt (tampered, or
another master key) is left as it was and reported with its row id and reason, never its value.
Every batch commits with the run's cursor (``rotations`` row of kind ``legacy``), so a killed or
cancelled run resumes after its last committed batch; running it again is harmless.
"""

from __future__ import annotations

import asyncio
import base64
import concurrent.futures
import multiprocessing
import os
import re
import threading
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, cast

import structlog
from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncSession

from keyrotor import runs
from keyrotor.audit.log import AuditEvent, write_event
from keyrotor.census.columns import ManagedColumn, list_columns
from keyrotor.census.locations import location_of
from keyrotor.crypto import envelope
from keyrotor.crypto import legacy_format as legacy
from keyrotor.errors import (
    ConfigurationError,
    Conflict,
    DecryptionFailed,
    KeyrotorError,
    MalformedCiphertext,
    PermanentError,
)
from keyrotor.kek.base import WrapContext, WrappedDek
from keyrotor.keys import KeyManager
from keyrotor.rotation.context import run_to_commit
from keyrotor.runs import RunInfo
from keyrotor.schedule.rules import check_scope
from keyrotor.store import db
from keyrotor.store.key_ranges import INTEGER_KEY, MAX_ID, MIN_ID, Key, KeyType, key_bounds
from keyrotor.store.targets import quote_ident as _quote
from keyrotor.store.targets import raw_connection

log = structlog.get_logger("keyrotor.legacy.migration")

MAX_LISTED = 1_000  # failures (and warnings) kept by id in the run's detail
# This many failures in a row, none migrated yet: the master key is wrong, not the values.
WRONG_KEY_THRESHOLD = 8

# Provider key shapes: reported when a scope's name suggests a provider and the key does not fit.
_SHAPES: tuple[tuple[str, re.Pattern[str]], ...] = (
    ("anthropic", re.compile(r"sk-ant-[A-Za-z0-9_\-]{16,}")),
    ("openai", re.compile(r"sk-[A-Za-z0-9_\-]{16,}")),
    ("google", re.compile(r"AIza[A-Za-z0-9_\-]{30,}")),
    ("gemini", re.compile(r"AIza[A-Za-z0-9_\-]{30,}")),
)


def shape_warning(scope: str, plaintext: str) -> str | None:
    """Why ``plaintext`` does not look like a key of the provider ``scope`` names (None if it does)."""
    lowered = scope.lower()
    for provider, pattern in _SHAPES:
        if provider in lowered:
            if pattern.fullmatch(plaintext.strip()) is None:
                return f"does not look like a {provider} key"
            return None
    return None


@dataclass(frozen=True)
class Source:
    """One place legacy values may live: ``secrets`` or a registered column."""

    name: str
    # -> (id, value, scope name, context text); ``{bounds}`` (see :meth:`select_sql`), ``{limit}``
    # and ``{scope}`` (a fixed scope) are the parameter placeholders.
    select: str
    update: str  # unnest($1 ids, $2 olds, $3 news[, $4 versions]) ... RETURNING id
    count: str  # -> (legacy candidates, kr1 values)
    plan: str  # $1 buckets -> (first id, last id, legacy rows) of equal-sized id ranges
    has_version: bool
    key_column: str = "s.id"
    key_type: KeyType = INTEGER_KEY

    def select_sql(self, *, after: bool, upper: bool) -> str:
        """The batch SELECT with the bounds given (``$1``, ``$2``), then the limit and the scope.

        An integer key binds both bounds always (``MIN_ID``/``MAX_ID`` when open).
        """
        if self.key_type.integer:
            after = upper = True
        bounds, n = key_bounds(self.key_column, self.key_type, 1, after=after, upper=upper)
        return self.select.format(bounds=bounds, limit=f"${n}", scope=f"${n + 1}::text")


_LEGACY = "NOT LIKE 'kr1:%'"

SECRETS_SOURCE = Source(
    name="secrets",
    select=(
        "SELECT s.id, s.ciphertext, k.name, 'secret:' || s.name FROM secrets s "
        f"JOIN key_scopes k ON k.id = s.scope_id WHERE s.ciphertext {_LEGACY}{{bounds}} "
        "ORDER BY s.id LIMIT {limit}"
    ),
    update=(
        "UPDATE secrets AS t SET ciphertext = u.new, dek_version = u.ver, updated_at = now() "
        "FROM unnest($1::bigint[], $2::text[], $3::text[], $4::int[]) AS u(id, old, new, ver) "
        "WHERE t.id = u.id AND t.ciphertext = u.old RETURNING t.id"
    ),
    count=(
        f"SELECT count(*) FILTER (WHERE ciphertext {_LEGACY}), "
        "count(*) FILTER (WHERE ciphertext LIKE 'kr1:%') FROM secrets"
    ),
    plan=(
        "SELECT min(id), max(id), count(*) FROM (SELECT id, ntile($1) OVER (ORDER BY id) AS b "
        f"FROM secrets WHERE ciphertext {_LEGACY}) q GROUP BY b ORDER BY b"
    ),
    has_version=True,
)


@dataclass(frozen=True)
class ColumnSource(Source):
    """A registered column: a fixed scope (or None: the row's scope column) and a context template."""

    fixed_scope: str | None = None
    template: str | None = None


def column_source(col: ManagedColumn) -> ColumnSource:
    """The legacy source of a registered column (its identifiers quoted)."""
    table, pk, val = _quote(col.table), _quote(col.pk_column), _quote(col.column)
    kt = col.key_type
    # Braces of identifiers are impossible (plain identifiers only), so the template is safe to format.
    scope = f"{_quote(col.scope_column)}::text" if col.scope_column else "{scope}"
    template = col.context_template
    return ColumnSource(
        name=col.name,
        select=(
            f"SELECT {kt.select(pk)}, {val}, {scope}, NULL::text FROM {table} "
            f"WHERE {val} IS NOT NULL AND {val} {_LEGACY}{{bounds}} ORDER BY {pk} LIMIT {{limit}}"
        ),
        update=(
            f"UPDATE {table} AS t SET {val} = u.new FROM unnest($1::{kt.sql}[], $2::text[], $3::text[]) "
            f"AS u(id, old, new) WHERE t.{pk} = u.id AND t.{val} = u.old RETURNING {kt.select(f't.{pk}')}"
        ),
        count=(
            f"SELECT count(*) FILTER (WHERE {val} {_LEGACY}), count(*) FILTER (WHERE {val} LIKE 'kr1:%') "
            f"FROM {table}"
        ),
        plan=(
            f"SELECT {kt.aggregate('min', 'id')}, {kt.aggregate('max', 'id')}, count(*) FROM "
            f"(SELECT {pk} AS id, ntile($1) OVER (ORDER BY {pk}) AS b "
            f"FROM {table} WHERE {val} IS NOT NULL AND {val} {_LEGACY}) q GROUP BY b ORDER BY b"
        ),
        has_version=False,
        key_column=pk,
        key_type=kt,
        fixed_scope=col.scope,
        template=template,
    )


def try_second_phase(value: str, ciphers: Sequence[AESGCM]) -> str | None:
    """The plaintext if ``value`` is a second-phase value of one of ``ciphers`` (cheap: AES only)."""
    for cipher in ciphers:
        try:
            return decrypt_second_phase(value, cipher)
        except DecryptionFailed:
            continue
    return None


def _context(src: Source, row_id: Key, row_context: str | None) -> str:
    if isinstance(src, ColumnSource) and src.template is not None:
        return src.template.replace("{pk}", str(row_id))
    return row_context or ""


@dataclass
class ColumnReport:
    """What a migration did to one source."""

    column: str
    legacy_found: int = 0
    migrated: int = 0
    already_migrated: int = 0
    changed: list[Key] = field(default_factory=list)  # changed or deleted meanwhile: left alone
    failed: list[dict[str, Any]] = field(default_factory=list)  # {"id", "reason"}
    warnings: list[dict[str, Any]] = field(default_factory=list)  # {"id", "warning"}
    failed_count: int = 0

    def as_dict(self) -> dict[str, Any]:
        return {
            "column": self.column,
            "legacy_found": self.legacy_found,
            "migrated": self.migrated,
            "already_migrated": self.already_migrated,
            "changed": self.changed[:MAX_LISTED],
            "failed_count": self.failed_count,
            "failed": self.failed[:MAX_LISTED],
            "warnings": self.warnings[:MAX_LISTED],
        }

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ColumnReport:
        return cls(
            column=d["column"],
            legacy_found=d.get("legacy_found", 0),
            migrated=d.get("migrated", 0),
            already_migrated=d.get("already_migrated", 0),
            changed=list(d.get("changed", [])),
            failed=list(d.get("failed", [])),
            warnings=list(d.get("warnings", [])),
            failed_count=d.get("failed_count", 0),
        )


@dataclass
class LegacyReport:
    """The outcome of a migration (or a dry run): counts and row ids, never values."""

    dry_run: bool
    columns: dict[str, ColumnReport] = field(default_factory=dict)
    run_id: int | None = None
    state: str = "completed"

    @property
    def migrated(self) -> int:
        return sum(c.migrated for c in self.columns.values())

    @property
    def failed(self) -> int:
        return sum(c.failed_count for c in self.columns.values())

    def column(self, name: str) -> ColumnReport:
        return self.columns.setdefault(name, ColumnReport(name))

    def as_dict(self) -> dict[str, Any]:
        return {
            "run_id": self.run_id,
            "dry_run": self.dry_run,
            "state": self.state,
            "migrated": self.migrated,
            "already_migrated": sum(c.already_migrated for c in self.columns.values()),
            "changed": sum(len(c.changed) for c in self.columns.values()),
            "failed": self.failed,
            "columns": [c.as_dict() for c in self.columns.values()],
        }


def make_executor(workers: int = 0) -> concurrent.futures.ProcessPoolExecutor:
    """A process pool sized to the machine (``workers`` 0: one a core) for scrypt.

    ``spawn``: a forked child of a process with an event loop and driver threads may inherit
    their locks held; spawned ones start clean and import only :mod:`keyrotor.crypto.legacy_format`.
    """
    n = workers or os.cpu_count() or 1
    spawn = multiprocessing.get_context("spawn")
    return concurrent.futures.ProcessPoolExecutor(
        max_workers=n, mp_context=spawn, initializer=_exit_with_parent, initargs=(os.getpid(),)
    )


def _exit_with_parent(parent: int) -> None:
    # A pool child whose parent is SIGKILLed never sees EOF on the call queue (its siblings
    # hold the pipe's other end), so it would sleep forever: three leaked processes per
    # killed worker. A daemon thread ends it once it has been re-parented.
    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(1.0)
        os._exit(0)

    threading.Thread(target=watch, name="keyrotor-parent-watch", daemon=True).start()


async def decrypt_batch(
    values: Sequence[str], master_key: str, executor: concurrent.futures.Executor, workers: int
) -> list[str | DecryptionFailed]:
    """Decrypt ``values`` in ``workers`` chunks on ``executor``; results in order."""
    if not values:
        return []
    loop = asyncio.get_running_loop()
    size = -(-len(values) // max(1, workers))
    chunks = [list(values[i : i + size]) for i in range(0, len(values), size)]
    parts = await asyncio.gather(
        *(loop.run_in_executor(executor, legacy.decrypt_many, chunk, master_key) for chunk in chunks)
    )
    return [r for part in parts for r in part]


async def sources(km: KeyManager) -> list[Source]:
    """``secrets`` and every registered column."""
    async with db.transaction(km.sessions) as session:
        cols = await list_columns(session)
    return [SECRETS_SOURCE, *(column_source(c) for c in cols)]


async def fetch_rows(
    session: AsyncSession, src: Source, after: Key | None, limit: int, hi: Key | None = None
) -> list[Any]:
    """The next ``limit`` legacy rows of ``src`` with ``after < id <= hi``, in key order.

    ``after`` None: from the first key; ``hi`` None: to the last.
    """
    apg = await raw_connection(session)
    if src.key_type.integer:
        bounds: list[Key] = [MIN_ID if after is None else after, MAX_ID if hi is None else hi]
    else:
        bounds = [b for b in (after, hi) if b is not None]
    sql = src.select_sql(after=after is not None, upper=hi is not None)
    if isinstance(src, ColumnSource) and src.fixed_scope is not None:
        return list(await apg.fetch(sql, *bounds, limit, src.fixed_scope))
    return list(await apg.fetch(sql, *bounds, limit))


async def open_batch(
    km: KeyManager,
    key: str,
    pool: concurrent.futures.Executor,
    workers: int,
    src: Source,
    rows: list[Any],
    rep: ColumnReport,
    second: dict[str, list[AESGCM]],
) -> SealedBatch:
    """Decrypt one batch of legacy rows (scrypt in ``pool``) and seal each under its scope's DEK.

    Failures are counted and named (by row id) in ``rep``; ``second`` caches each scope's
    second-phase DEKs.
    """
    candidates: list[Any] = []
    known: dict[int, str] = {}  # row index in candidates -> second-phase plaintext
    for r in rows:
        scope_name = r[2] or ""
        if scope_name and scope_name not in second:
            second[scope_name] = await second_ciphers(km, scope_name)
        plain = try_second_phase(r[1], second.get(scope_name, []))
        if plain is not None:
            known[len(candidates)] = plain
            candidates.append(r)
        elif legacy.is_legacy(r[1]):
            candidates.append(r)
        else:
            rep.failed_count += 1
            if len(rep.failed) < MAX_LISTED:
                rep.failed.append({"id": r[0], "reason": "neither a kr1 nor a legacy value (malformed)"})
    # scrypt: in the pool, never on the event loop.
    first = [r[1] for i, r in enumerate(candidates) if i not in known]
    opened = iter(await decrypt_batch(first, key, pool, workers))
    results = [known[i] if i in known else next(opened) for i in range(len(candidates))]
    return await seal_batch(km, src, candidates, results, rep)


async def _counts(km: KeyManager, src: Source) -> tuple[int, int]:
    async with db.transaction(km.sessions) as session:
        apg = await raw_connection(session)
        row = await apg.fetchrow(src.count)
    return int(row[0]), int(row[1])


@dataclass
class SealedBatch:
    """One batch's compare-and-swap arguments: ids, old values, new kr1 values, DEK versions."""

    ids: list[Key] = field(default_factory=list)
    olds: list[str] = field(default_factory=list)
    news: list[str] = field(default_factory=list)
    versions: list[int] = field(default_factory=list)


async def seal_batch(
    km: KeyManager, src: Source, rows: list[Any], results: list[str | DecryptionFailed], rep: ColumnReport
) -> SealedBatch:
    """Seal each decrypted row under its scope's active DEK and verify it (failures go to ``rep``)."""
    out = SealedBatch()
    keys: dict[str, tuple[int, int, AESGCM]] = {}
    for row, result in zip(rows, results, strict=True):
        row_id, value, scope, row_context = row[0], row[1], row[2], row[3]
        if isinstance(result, DecryptionFailed):
            rep.failed_count += 1
            if len(rep.failed) < MAX_LISTED:
                rep.failed.append({"id": row_id, "reason": f"{type(result).__name__}: {result}"})
            continue
        if not scope:
            rep.failed_count += 1
            rep.failed.append({"id": row_id, "reason": "the row has no scope (scope column is empty)"})
            continue
        warning = shape_warning(scope, result)
        if warning is not None and len(rep.warnings) < MAX_LISTED:
            rep.warnings.append({"id": row_id, "warning": warning})
        context = _context(src, row_id, row_context)
        try:
            if scope not in keys:
                check_scope(scope)  # a row naming no valid scope fails, named; no scope is created
                # The active DEK (the scope is created with v1 if it does not exist yet).
                keys[scope] = await km._encryption_key(scope)
            scope_id, version, cipher = keys[scope]
            if not km.usage.take(scope_id, version):  # reserved before use (keyrotor.census.usage)
                await km.usage.acquire(scope_id, version, scope=scope)
            plaintext = result.encode("utf-8")
            sealed = envelope.seal(
                plaintext, cipher=cipher, scope=scope, dek_version=version, context=context
            )
            _, raw = envelope.split(sealed)
            if envelope.open_raw(raw, cipher=cipher, scope=scope, dek_version=version, context=context) != (
                plaintext
            ):
                raise DecryptionFailed("the new kr1 value did not verify")
        except PermanentError as exc:
            rep.failed_count += 1
            if len(rep.failed) < MAX_LISTED:
                rep.failed.append({"id": row_id, "reason": f"{type(exc).__name__}: {exc}"})
            continue
        location = location_of(context)  # recorded (committed) before the value is written
        if not km.usage.count(scope_id, version, location):
            await km.usage.record(scope_id, version, location)
        out.ids.append(row_id)
        out.olds.append(value)
        out.news.append(sealed)
        out.versions.append(version)
    return out


def check_wrong_key(failed: Iterable[Mapping[str, Any]], *, decrypted: int) -> None:
    """Refuse to go on when nothing has decrypted and the first values all failed authentication.

    A run (or range) with the wrong master key would otherwise record every value as failed;
    ``WRONG_KEY_THRESHOLD`` such failures and no success mean the key is not the old backend's.

    Raises:
        ConfigurationError: the legacy master key is wrong; nothing has been written.
    """
    if decrypted:
        return
    auth_failures = sum(1 for f in failed if "failed authentication" in f["reason"])
    if auth_failures >= WRONG_KEY_THRESHOLD:
        raise ConfigurationError(
            f"the first {auth_failures} legacy values all failed authentication and none decrypted: "
            "ENCRYPTION_KEY (or KEYROTOR_LEGACY_KEY) is not the old backend's master key; nothing was written"
        )


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
        dry_run: decrypt, check and seal, but write nothing (no run row either).
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
    report = LegacyReport(dry_run=dry_run)
    run: RunInfo | None = None
    cursors: dict[str, Key] = {}
    migrated_before = 0
    if not dry_run:
        if run_id is None:
            run, _ = await open_legacy_run(km, trigger=trigger)
        else:
            async with db.transaction(km.sessions) as session:
                run = await runs.require_run(session, run_id)
            if run.kind != "legacy":
                raise runs.RunFailed(f"run {run_id} is not a legacy migration")
        report.run_id = run.id
        if run.terminal:
            return _report_of(run)
        async with db.transaction(km.sessions) as session:
            run = await runs.start_attempt(session, run.id, job_id)
        cursors = {k: v for k, v in run.detail.get("cursors", {}).items() if isinstance(v, int | str)}
        for d in run.detail.get("columns", []):
            report.columns[d["column"]] = ColumnReport.from_dict(d)
        migrated_before = run.rows_done - report.migrated
        structlog.contextvars.bind_contextvars(run_id=run.id)
    srcs = await sources(km)
    second: dict[str, list[AESGCM]] = {}
    total = 0
    for src in srcs:
        legacy_n, kr1_n = await _counts(km, src)
        rep = report.column(src.name)
        if src.name not in cursors:  # first attempt at this source
            rep.already_migrated = kr1_n
            rep.legacy_found = legacy_n
        total += legacy_n
    done = run.rows_done if run else 0
    total += done
    if run is not None:
        async with db.transaction(km.sessions) as session:
            await runs.add_progress(session, run.id, 0, total=total)
    try:
        for src in srcs:
            rep = report.column(src.name)
            after: Key | None = cursors.get(src.name)  # None: from the first key
            while True:
                async with db.transaction(km.sessions) as session:
                    rows = await fetch_rows(session, src, after, batch_rows)
                if not rows:
                    break
                sealed = await open_batch(km, key, pool, workers, src, rows, rep, second)
                check_wrong_key(
                    (f for c in report.columns.values() for f in c.failed),
                    decrypted=report.migrated + migrated_before + len(sealed.ids),
                )
                after = rows[-1][0]
                cursors[src.name] = after
                if dry_run:
                    rep.migrated += len(sealed.ids)
                    done += len(rows)
                else:
                    assert run is not None
                    written = await run_to_commit(_write(km, run.id, src, sealed, cursors, report))
                    rep.migrated += len(written)
                    rep.changed.extend(i for i in sealed.ids if i not in written)
                    done += len(rows)
                if on_progress is not None:
                    on_progress(done, total)
    except PermanentError as exc:
        if run is not None and isinstance(exc, KeyrotorError):
            async with db.transaction(km.sessions) as session:
                await runs.fail_run(session, run.id, exc)
        raise
    if run is not None:
        async with db.transaction(km.sessions) as session:
            await runs.update_detail(
                session, run.id, cursors=cursors, columns=[c.as_dict() for c in report.columns.values()]
            )
            await runs.complete_run(session, run.id)
        km.invalidate()
        log.info("legacy_migration_completed", migrated=report.migrated, failed=report.failed)
    return report


async def _write(
    km: KeyManager,
    run_id: int,
    src: Source,
    sealed: SealedBatch,
    cursors: dict[str, Key],
    report: LegacyReport,
) -> set[Key]:
    """One batch's compare-and-swap write and the run's cursor, in one transaction."""
    async with db.transaction(km.sessions) as session:
        written = await swap_values(await raw_connection(session), src, sealed)
        # The report as it will stand after this batch, so a resumed run reports the whole run.
        rep = report.column(src.name)
        snapshot = [c.as_dict() for c in report.columns.values() if c.column != src.name]
        after = report_after(rep, sealed, written)
        await runs.update_detail(session, run_id, cursors=cursors, columns=[*snapshot, after])
        await runs.add_progress(session, run_id, len(written))
    return written


async def swap_values(apg: Any, src: Source, sealed: SealedBatch) -> set[Key]:
    """The batch's compare-and-swap UPDATE: the ids written (a row changed meanwhile is not)."""
    if not sealed.ids:
        return set()
    if src.has_version:
        rows = await apg.fetch(src.update, sealed.ids, sealed.olds, sealed.news, sealed.versions)
    else:
        rows = await apg.fetch(src.update, sealed.ids, sealed.olds, sealed.news)
    return {src.key_type.key(r[0]) for r in rows}


def report_after(rep: ColumnReport, sealed: SealedBatch, written: set[Key]) -> dict[str, Any]:
    """``rep`` as it will stand once the batch's write commits."""
    after = rep.as_dict()
    after["migrated"] = rep.migrated + len(written)
    after["changed"] = (rep.changed + [i for i in sealed.ids if i not in written])[:MAX_LISTED]
    return after


def _report_of(run: RunInfo) -> LegacyReport:
    report = LegacyReport(dry_run=False, run_id=run.id, state=run.state)
    if run.detail.get("mode") == MODE and run.state != "completed":  # completed: merged already
        columns = merged_columns(run.detail)
    else:
        columns = [ColumnReport.from_dict(d) for d in run.detail.get("columns", [])]
    for c in columns:
        report.columns[c.column] = c
    return report


# The run's detail.mode when keyrotor.legacy.ranges fanned it out across workers.
MODE = "ranges"


def merged_columns(detail: dict[str, Any]) -> list[ColumnReport]:
    """A fanned-out run's report per source: counts found at the start plus every range's part."""
    merged = {d["column"]: ColumnReport.from_dict(d) for d in detail.get("columns", [])}
    for key, part in sorted(detail.get("range_reports", {}).items()):
        rep = ColumnReport.from_dict(part)
        into = merged.setdefault(rep.column, ColumnReport(rep.column))
        if key.startswith(f"{rep.column}:"):
            into.migrated += rep.migrated
            into.failed_count += rep.failed_count
            into.changed = (into.changed + rep.changed)[:MAX_LISTED]
            into.failed = (into.failed + rep.failed)[:MAX_LISTED]
            into.warnings = (into.warnings + rep.warnings)[:MAX_LISTED]
    return list(merged.values())


def report_of(run: RunInfo) -> LegacyReport:
    """The report a (finished or running) legacy run has recorded so far."""
    return _report_of(run)


# --- the old second phase: DEKs and the values they encrypted ------------------------------

SECOND_PHASE_IV = 16
SECOND_PHASE_TAG = 16


def decrypt_second_phase(blob: str, cipher: AESGCM) -> str:
    """Decrypt a value the old backend's second phase encrypted directly with a DEK.

    ASSUMPTION (not covered by the shared vectors, which only hold a second-phase *wrapped DEK*):
    the old second phase stored ``base64(iv(16) || tag(16) || data)``, AES-256-GCM under the
    DEK with a 16-byte IV and no AAD -- the first phase's layout without the salt, as its DEKs
    were wrapped. GCM authentication makes a wrong guess fail loudly, never return garbage.

    Raises:
        MalformedCiphertext: not base64 of at least 32 bytes.
        DecryptionFailed: failed authentication, or the plaintext is not UTF-8.
    """
    try:
        raw = legacy._strict_b64decode(blob)
    except ValueError as exc:
        raise MalformedCiphertext("second-phase value is not canonical base64") from exc
    if len(raw) < SECOND_PHASE_IV + SECOND_PHASE_TAG:
        raise MalformedCiphertext("second-phase value is too short")
    iv, tag = raw[:SECOND_PHASE_IV], raw[SECOND_PHASE_IV : SECOND_PHASE_IV + SECOND_PHASE_TAG]
    data = raw[SECOND_PHASE_IV + SECOND_PHASE_TAG :]
    try:
        plaintext = cipher.decrypt(iv, data + tag, None)
    except InvalidTag as exc:
        raise DecryptionFailed("second-phase value failed authentication under this DEK") from exc
    try:
        return plaintext.decode("utf-8")
    except UnicodeDecodeError:
        raise DecryptionFailed("second-phase value decrypted, but it is not valid UTF-8") from None


def encrypt_second_phase(plaintext: str, dek: bytes) -> str:  # pragma: no cover - tests only
    """The inverse of :func:`decrypt_second_phase` (for tests of the assumed layout)."""
    iv = os.urandom(SECOND_PHASE_IV)
    sealed = AESGCM(dek).encrypt(iv, plaintext.encode("utf-8"), None)
    return base64.b64encode(iv + sealed[-SECOND_PHASE_TAG:] + sealed[:-SECOND_PHASE_TAG]).decode("ascii")


@dataclass(frozen=True)
class ImportedDek:
    """A legacy DEK adopted as a decrypt-only version of a scope."""

    scope: str
    version: int
    state: str
    grace_until: str | None

    def as_dict(self) -> dict[str, Any]:
        return {
            "scope": self.scope,
            "version": self.version,
            "state": self.state,
            "grace_until": self.grace_until,
        }


async def import_dek(km: KeyManager, scope: str, blob: str) -> ImportedDek:
    """Adopt the old backend's wrapped DEK (144 characters) as a new version of ``scope``.

    It becomes version ``latest + 1`` in state ``grace`` (decrypts, never encrypts) until now +
    the scope's grace period, wrapped under the current KEK: values the old second phase sealed
    with it open (:func:`decrypt_second_phase`) and ``keyrotor legacy migrate`` moves them to
    the active DEK. The scope is created (with a fresh DEK v1 as its active key) if needed.

    Raises:
        ConfigurationError: no legacy master key.
        MalformedCiphertext, DecryptionFailed: not a legacy wrapped DEK, or the wrong master key.
        Conflict: this DEK is already a version of the scope.
    """
    check_scope(scope)
    key = km.settings.legacy_key
    if key is None:
        raise ConfigurationError("importing a legacy DEK needs ENCRYPTION_KEY (or KEYROTOR_LEGACY_KEY)")
    blob = blob.strip()
    # scrypt off the event loop (a thread: it releases the GIL), then the same checks as decrypt_dek.
    dek_bytes = _dek_bytes(await legacy.decrypt_async(legacy_dek_text(blob), key))
    await km._encryption_key(scope)  # create the scope (v1 active) if it does not exist
    async with db.transaction(km.sessions) as session:
        sc = (
            await session.execute(
                text("SELECT id, latest_version FROM key_scopes WHERE name = :n FOR UPDATE"), {"n": scope}
            )
        ).one()
        scope_id, latest = int(sc[0]), int(sc[1])
        for version, state, wrapped_blob, kek_id, kek_version in (
            await session.execute(
                text(
                    "SELECT version, state, encrypted_dek, kek_id, kek_version FROM data_keys "
                    "WHERE scope_id = :s AND state <> 'destroyed'"
                ),
                {"s": scope_id},
            )
        ).all():
            existing = await km.kek.unwrap(
                WrappedDek(kek_id, kek_version, bytes(wrapped_blob)), WrapContext(scope, version)
            )
            if existing == dek_bytes:
                raise Conflict(f"{scope}: this legacy DEK is already v{version} ({state})")
        version = latest + 1
        wrapped = await km.kek.wrap(dek_bytes, WrapContext(scope, version))
        row = (
            await session.execute(
                text(
                    "INSERT INTO data_keys (scope_id, version, state, encrypted_dek, kek_id, kek_version, "
                    "grace_until) VALUES (:s, :v, 'grace', :blob, :kid, :kv, now() + make_interval(days => "
                    "(SELECT grace_period_days FROM key_scopes WHERE id = :s))) RETURNING grace_until"
                ),
                {
                    "s": scope_id,
                    "v": version,
                    "blob": wrapped.blob,
                    "kid": wrapped.kek_id,
                    "kv": wrapped.kek_version,
                },
            )
        ).one()
        await session.execute(
            text("UPDATE key_scopes SET latest_version = :v, updated_at = now() WHERE id = :s"),
            {"s": scope_id, "v": version},
        )
        await write_event(
            session,
            AuditEvent(
                event_type="config_change",
                scope=scope,
                key_version=version,
                metadata={"action": "import_legacy_dek", "state": "grace"},
            ),
        )
    km.invalidate(scope)
    return ImportedDek(scope, version, "grace", row[0].isoformat() if row[0] else None)


def legacy_dek_text(blob: str) -> str:
    """Check the shape of a legacy wrapped DEK (cheaply) and return it."""
    if not legacy.is_legacy(blob):
        raise MalformedCiphertext("not a legacy wrapped DEK (expected the 144-character encrypted_dek)")
    return blob


def _dek_bytes(text_value: str) -> bytes:
    try:
        dek = legacy._strict_b64decode(text_value)
    except ValueError as exc:
        raise DecryptionFailed("legacy wrapped DEK decrypted, but it is not base64 text") from exc
    if len(dek) != legacy.DEK_LEN:
        raise DecryptionFailed(f"legacy wrapped DEK decrypted to {len(dek)} bytes, expected {legacy.DEK_LEN}")
    return dek


async def second_ciphers(km: KeyManager, scope: str) -> list[AESGCM]:
    """The ciphers of every DEK of ``scope`` that still decrypts, imported ones included."""
    async with db.transaction(km.sessions) as session:
        rows = (
            await session.execute(
                text(
                    "SELECT d.version, d.encrypted_dek, d.kek_id, d.kek_version FROM data_keys d "
                    "JOIN key_scopes s ON s.id = d.scope_id WHERE s.name = :n AND d.state <> 'destroyed' "
                    "ORDER BY d.version DESC"
                ),
                {"n": scope},
            )
        ).all()
    out = []
    for version, blob, kek_id, kek_version in rows:
        dek = await km.kek.unwrap(WrappedDek(kek_id, kek_version, bytes(blob)), WrapContext(scope, version))
        out.append(AESGCM(dek))
    return out
