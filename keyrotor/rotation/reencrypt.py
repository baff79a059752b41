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
naming the table and row key, and nothing of its batch is written.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from sqlalchemy.ext.asyncio import AsyncSession

from keyrotor import metrics
from keyrotor.census.locations import count_locations, record_batch
from keyrotor.crypto import envelope
from keyrotor.errors import DecryptionFailed, KeyrotorError, KeyVersionTooOld
from keyrotor.kek.base import WrappedDek
from keyrotor.store import rotation as store
from keyrotor.store.key_ranges import Key, PlannedRange, ranges_from_buckets, show_key
from keyrotor.store.targets import SECRETS as SECRETS
from keyrotor.store.targets import Target as Target
from keyrotor.store.targets import count_older, key_buckets, lock_batch, swap_values, versions_in_range
from keyrotor.store.targets import default_targets as default_targets
from keyrotor.store.targets import register_target as register_target


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
            the batch has been written.
    """
    rows = await lock_batch(
        apg, target, keys.scope_id, version, after=after, hi=hi, limit=limit, skip_locked=skip_locked
    )
    if not rows:
        return Batch(0, 0, None)
    try:
        resealer = _resealer(keys, version)
    except KeyVersionTooOld as exc:
        metrics.decrypt_failed(exc)
        raise RowFailed(target.name, rows[0][0], exc) from exc
    ids: list[Key] = [row[0] for row in rows]
    olds: list[str] = [row[1] for row in rows]
    # A target whose contexts are a prefix and the key text builds them, and their locations
    # are counted, per batch (Target.contexts, count_locations) rather than per row.
    contexts = target.contexts(rows)
    try:
        news = resealer.reseal_all(olds, contexts)
    except DecryptionFailed as exc:
        metrics.decrypt_failed(exc)
        failed = resealer.failed_at
        raise RowFailed(target.name, ids[failed if failed is not None else 0], exc) from exc
    written = await swap_values(apg, target, ids, olds, news, keys.new_version)
    # Where the new values go (keyrotor.census.locations), in the same transaction. After the
    # rows: every range of a run upserts this one row, and its lock is held until the commit,
    # so taking it last keeps parallel ranges from queueing behind each other's UPDATE.
    locations = count_locations(contexts, prefix=target.context_prefix)
    await record_batch(apg, keys.scope_id, keys.new_version, locations)
    metrics.ROWS_REENCRYPTED.labels(metrics.scope_label(keys.scope)).inc(written)
    return Batch(len(rows), written, ids[-1])


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
