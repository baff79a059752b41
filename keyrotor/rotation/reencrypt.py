"""Batched re-encryption of ciphertext columns under a scope's new DEK.

Rotation re-encrypts every value of a scope wherever it lives: in every :class:`Target` (a
column of ``kr1`` ciphertexts, :mod:`keyrotor.store.targets`). keyrotor's own ``secrets`` table
is the first target (:data:`SECRETS`); applications register their own columns with
:func:`register_target` (e.g. ``settings.api_key`` with context ``settings.api_key:<pk>``) and
rotation covers them alike. Both names, and :data:`SECRETS`, are importable from here.

One batch is one transaction (DESIGN.md, steps 3-5): lock a keyset page of rows still on one
old version (``FOR UPDATE``), decrypt each with the old DEK, encrypt with the new, decrypt the
new and compare, then write them with a compare-and-swap against the old values, so an
application write in between wins. A value that fails to decrypt raises :class:`RowFailed`
naming the table and row key, and nothing of its batch commits.

Within a batch this process and the server work side by side (a software pipeline, slices of
:data:`PIPELINE_ROWS`): the rest of the batch is locked and read while its first slice is
re-sealed, and each slice's UPDATE runs while the next slice is re-sealed. The connection still
runs one statement at a time; what overlaps is the crypto here with the statement there.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Coroutine, Sequence
from dataclasses import dataclass
from typing import Any

from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from sqlalchemy.ext.asyncio import AsyncSession

from keyrotor import metrics
from keyrotor.census.locations import count_locations, record_batch
from keyrotor.crypto import envelope
from keyrotor.errors import DecryptionFailed, KeyrotorError, KeyVersionTooOld, PermanentError
from keyrotor.kek.base import WrappedDek
from keyrotor.store import rotation as store
from keyrotor.store.key_ranges import Key, PlannedRange, ranges_from_buckets, show_key
from keyrotor.store.targets import SECRETS as SECRETS
from keyrotor.store.targets import Target as Target
from keyrotor.store.targets import count_older, key_buckets, lock_batch, swap_values, versions_in_range
from keyrotor.store.targets import default_targets as default_targets
from keyrotor.store.targets import register_target as register_target

# A batch is re-sealed and written in slices of this many rows: the server reads the rest of the
# batch, or runs the compare-and-swap UPDATE of one slice, while this process re-seals the next
# (a few ms of crypto between two turns of the event loop, never tens).
PIPELINE_ROWS = 500


class RowFailed(DecryptionFailed):
    """A stored value could not be re-encrypted (tampered, or under a key that no longer decrypts)."""

    def __init__(self, target: str, row_id: Key, cause: KeyrotorError | str) -> None:
        reason = f"{type(cause).__name__}: {cause}" if isinstance(cause, KeyrotorError) else cause
        super().__init__(f"{target} row id={show_key(row_id)} could not be re-encrypted: {reason}")
        self.target = target
        self.row_id = row_id
        self.reason = reason

    def __reduce__(self) -> tuple[type[RowFailed], tuple[str, Key, str]]:
        # arq pickles a failed job's exception into its result; keep it loadable.
        return (type(self), (self.target, self.row_id, self.reason))


class UpdateNotApplied(PermanentError):
    """Updates of rows this batch had locked were not applied: the table itself (a trigger,
    a rule, a policy) kept the old values, so keyrotor cannot re-encrypt them."""

    def __init__(self, target: str, missing: int, rows: int) -> None:
        super().__init__(
            f"{target}: {missing} of {rows} updates of locked rows were not applied (a BEFORE UPDATE "
            "trigger, rule or row-level security policy on the table keeps the old value); "
            "nothing of the batch was written"
        )
        self.target, self.missing, self.rows = target, missing, rows

    def __reduce__(self) -> tuple[type[UpdateNotApplied], tuple[str, int, int]]:
        # arq pickles a failed job's exception into its result; keep it loadable.
        return (type(self), (self.target, self.missing, self.rows))


# --- the keys of one rotation -------------------------------------------------------------


@dataclass
class RotationKeys:
    """The DEKs one re-encryption uses: the new one and every older version of the scope.

    ``old`` maps each older version to its cipher, or to None when it no longer decrypts
    (destroyed): rows still on such a version fail, naming their id.
    """

    scope: str
    scope_id: int
    new_version: int
    new_cipher: AESGCM
    old: dict[int, AESGCM | None]

    @property
    def old_versions(self) -> list[int]:
        return sorted(self.old)


async def load_keys(
    session: AsyncSession,
    cipher_of: Callable[[str, int, WrappedDek], Any],
    scope: str,
    scope_id: int,
    new_version: int,
    *,
    only: Sequence[int] | None = None,
) -> RotationKeys:
    """Read the scope's DEK rows and unwrap the new version and the older ones (``only`` those)."""
    ciphers: dict[int, AESGCM | None] = {}
    new_cipher: AESGCM | None = None
    for version, state, blob, kek_id, kek_version in await store.dek_rows(session, scope_id, new_version):
        if version != new_version and only is not None and version not in only:
            continue
        cipher = None
        if blob is not None and state != "destroyed":
            cipher = await cipher_of(scope, version, WrappedDek(kek_id, kek_version, bytes(blob)))
        if version == new_version:
            new_cipher = cipher
        else:
            ciphers[version] = cipher
    if new_cipher is None:
        raise KeyVersionTooOld(f"{scope}: DEK v{new_version} is not available to re-encrypt with")
    return RotationKeys(scope, scope_id, new_version, new_cipher, ciphers)


# --- one batch ----------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Batch:
    """What one batch did: rows locked, rows written (compare-and-swap hits), last id seen."""

    selected: int
    written: int
    last_id: Key | None


def _resealer(keys: RotationKeys, version: int) -> envelope.Resealer:
    """What re-seals a batch of values on ``version`` under the new DEK, verifying each."""
    old = keys.old.get(version)
    if old is None:
        raise KeyVersionTooOld(f"{keys.scope}: DEK v{version} no longer decrypts")
    return envelope.Resealer(
        scope=keys.scope, old=old, old_version=version, new=keys.new_cipher, new_version=keys.new_version
    )


async def reencrypt_batch(
    apg: Any,
    target: Target,
    keys: RotationKeys,
    version: int,
    *,
    after: Key | None,
    hi: Key | None = None,
    limit: int,
    skip_locked: bool = True,
) -> Batch:
    """Re-encrypt up to ``limit`` rows of ``target`` still on ``version`` with ``after < id <= hi``.

    ``after`` None: from the first key; ``hi`` None: to the last.

    Runs inside the caller's transaction (``apg`` from
    :func:`keyrotor.store.targets.raw_connection`); the caller commits it together with its
    progress counters.

    Raises:
        RowFailed: a value did not decrypt (or did not verify after re-encryption); nothing of
            the batch may commit: slices written before it are undone by the caller's rollback.
        UpdateNotApplied: the table kept the old value of a locked row; likewise.
    """
    rows = await lock_batch(
        apg, target, keys.scope_id, version, after=after, hi=hi, limit=min(limit, PIPELINE_ROWS),
        skip_locked=skip_locked,
    )  # fmt: skip
    if not rows:
        return Batch(0, 0, None)
    try:
        resealer = _resealer(keys, version)
    except KeyVersionTooOld as exc:
        metrics.decrypt_failed(exc)
        raise RowFailed(target.name, rows[0][0], exc) from exc
    ids, contexts, written = await _pipeline(
        apg, target, keys, version, resealer, rows, hi=hi, limit=limit, skip_locked=skip_locked
    )
    if written != len(ids):
        # Every row was locked (FOR UPDATE) with the value read, so no other writer can have
        # changed it: a missed compare-and-swap is the table's doing. Going on would leave the
        # rows behind for ever (a range would wait for them as if locked); the caller's rollback
        # undoes the slices written.
        raise UpdateNotApplied(target.name, len(ids) - written, len(ids))
    # Where the new values go (keyrotor.census.locations), in the same transaction. After the
    # rows: every range of a run upserts this one row, and its lock is held until the commit,
    # so taking it last keeps parallel ranges from queueing behind each other's UPDATE.
    locations = count_locations(contexts, prefix=target.context_prefix)
    await record_batch(apg, keys.scope_id, keys.new_version, locations)
    metrics.ROWS_REENCRYPTED.labels(metrics.scope_label(keys.scope)).inc(written)
    return Batch(len(ids), written, ids[-1])


async def _pipeline(
    apg: Any,
    target: Target,
    keys: RotationKeys,
    version: int,
    resealer: envelope.Resealer,
    rows: list[Any],
    *,
    hi: Key | None,
    limit: int,
    skip_locked: bool,
) -> tuple[list[Key], list[str], int]:
    """Re-seal and write the batch whose first slice is ``rows``, reading the rest of it (up to
    ``limit`` rows in all) while that slice is re-sealed: ``(ids, contexts, rows written)``."""
    flight = _InFlight()
    try:
        if len(rows) == PIPELINE_ROWS < limit:
            # The rest of the batch is locked and read while its first slice is re-sealed.
            rest = lock_batch(
                apg, target, keys.scope_id, version, after=rows[-1][0], hi=hi,
                limit=limit - PIPELINE_ROWS, skip_locked=skip_locked,
            )  # fmt: skip
            await flight.send(rest)
        ids: list[Key] = [row[0] for row in rows]
        olds: list[str] = [row[1] for row in rows]
        # A target whose contexts are a prefix and the key text builds them, and their locations
        # are counted, per batch (Target.contexts, count_locations) rather than per row.
        contexts = target.contexts(rows)
        news = _reseal(resealer, target, ids, olds, contexts, 0)
        if flight.busy:
            more: list[Any] = await flight.result()
            ids += [row[0] for row in more]
            olds += [row[1] for row in more]
            contexts += target.contexts(more)
        written = await _swap_slices(
            flight, apg, target, keys.new_version, resealer, ids, olds, contexts, news
        )
    finally:
        await flight.drain()
    return ids, contexts, written


class _InFlight:
    """The one statement a batch has in flight on its connection while this process re-seals.

    An asyncpg connection runs one statement at a time; the pipeline overlaps this process's
    work with the server's, never two statements.
    """

    __slots__ = ("_task",)

    def __init__(self) -> None:
        self._task: asyncio.Future[Any] | None = None

    @property
    def busy(self) -> bool:
        return self._task is not None

    async def send(self, statement: Coroutine[Any, Any, Any]) -> None:
        """Start ``statement``: one turn of the event loop runs it up to its wait for the
        server, so its bytes are sent and the server works while the caller goes on."""
        self._task = asyncio.ensure_future(statement)
        await asyncio.sleep(0)

    async def result(self) -> Any:
        """The statement's result, once the server has answered."""
        task, self._task = self._task, None
        assert task is not None
        return await task

    async def drain(self) -> None:
        """Wait for a statement left in flight by an error (a slice that did not re-seal, a
        cancellation): the rollback that follows needs the connection."""
        task, self._task = self._task, None
        if task is None:
            return
        if not task.done():
            await asyncio.wait([task])
        if not task.cancelled():
            task.exception()  # retrieved: the error already being raised is the one that counts


def _reseal(
    resealer: envelope.Resealer,
    target: Target,
    ids: list[Key],
    olds: list[str],
    contexts: list[str],
    start: int,
) -> list[str]:
    """The new values of ``olds`` (the slice of the batch ``ids`` from ``start``); RowFailed
    naming the row if one does not re-seal."""
    try:
        return resealer.reseal_all(olds, contexts)
    except DecryptionFailed as exc:
        metrics.decrypt_failed(exc)
        failed = resealer.failed_at
        raise RowFailed(target.name, ids[start + (failed if failed is not None else 0)], exc) from exc


async def _swap_slices(
    flight: _InFlight,
    apg: Any,
    target: Target,
    new_version: int,
    resealer: envelope.Resealer,
    ids: list[Key],
    olds: list[str],
    contexts: list[str],
    news: list[str],
) -> int:
    """Write the batch a slice of :data:`PIPELINE_ROWS` at a time (compare-and-swap), each
    slice's UPDATE running on the server while the next slice is re-sealed here; ``news`` are
    the first slice's new values. Returns the rows written (the swaps' hits).

    Raises:
        RowFailed: as :func:`reencrypt_batch`; slices already written are in the caller's
            transaction, which the error rolls back.
    """
    written = 0
    for start in range(0, len(ids), PIPELINE_ROWS):
        end = start + PIPELINE_ROWS
        if start:
            news = _reseal(resealer, target, ids, olds[start:end], contexts[start:end], start)
            hits: int = await flight.result()
            written += hits
        await flight.send(swap_values(apg, target, ids[start:end], olds[start:end], news, new_version))
    hits = await flight.result()
    return written + hits


async def sweep(
    apg: Any, target: Target, keys: RotationKeys, *, limit: int, versions: Sequence[int] | None = None
) -> int:
    """Re-encrypt every row of ``target`` still on an older version, waiting for locked rows.

    Used inside one transaction: for a small scope (all of it) and when a run completes
    (stragglers written by processes whose cache still named the old DEK). Returns rows written.
    """
    if versions is None:
        # One read of the scope finds the least old version its rows still hold, if any: usually
        # none at all, when a run completes, and no pass is spent on versions nobody holds.
        _, least = await versions_in_range(apg, target, keys.scope_id, keys.old_versions, 0, None, None)
        versions = [] if least is None else [v for v in keys.old_versions if v >= least]
    written = 0
    for version in versions:
        after: Key | None = None
        while True:
            batch = await reencrypt_batch(
                apg, target, keys, version, after=after, limit=limit, skip_locked=False
            )
            if batch.last_id is None:
                break
            written += batch.written
            after = batch.last_id
    return written


async def plan_ranges(
    apg: Any, target: Target, scope_id: int, new_version: int, *, range_rows: int, total: int | None = None
) -> list[PlannedRange]:
    """Split the rows still to do into contiguous key ranges of about ``range_rows`` rows each.

    ``total``: those rows' count, if the caller counted them in this transaction (else counted
    here). See :func:`ranges_from_buckets` for how the ranges cover every key.
    """
    if total is None:
        total = await count_older(apg, target, scope_id, new_version)
    if total == 0:
        return []
    k = max(1, -(-total // range_rows))
    return ranges_from_buckets(target.key_type, await key_buckets(apg, target, scope_id, new_version, k))
