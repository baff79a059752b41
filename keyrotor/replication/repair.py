"""Repair of a region: fresh, verified copies of its faulty DEK copies, and the removal of
copies the primary no longer keeps.

A fresh copy is unwrapped again with the region's key and compared with the primary's DEK
before it is written, and it replaces the old copy by compare-and-swap (a row changed meanwhile
is left alone and graded at the next check).
"""

from __future__ import annotations

import hmac
import logging
from collections.abc import Sequence

from keyrotor.errors import Conflict, KekError, KekUnavailable, StoreUnavailable
from keyrotor.kek.base import KekProvider, WrapContext
from keyrotor.replication.grading import Sources, faults_of
from keyrotor.replication.primary import PrimaryKeys
from keyrotor.replication.regions import Region, bounded_map, error_text, fingerprint
from keyrotor.store import db
from keyrotor.store import repair_record as repair_log
from keyrotor.store import replication as store
from keyrotor.store.replication import CopyWrite, ReplicaCopy

log = logging.getLogger("keyrotor.replication.check")

_WRITE_BATCH = 1_000


async def repair_region(
    primary: PrimaryKeys, region: Region, sources: Sources, scope: str | None, repair_id: str | None = None
) -> int:
    """Re-replicate every faulty copy (verified before writing); drop copies the primary destroyed.

    Returns the copies written or removed. With ``repair_id``, each batch also counts them in
    the region's ``replica_repair_log`` (keyrotor.replication.record).

    Raises:
        Conflict: the region was promoted to primary.
        StoreUnavailable, KekUnavailable: the primary or the region cannot be used now.
    """
    if await region.promotion() is not None:
        raise Conflict(f"region {region.name} was promoted to primary; refusing to overwrite its keys")
    copies = await region.copies(scope)
    faults = await faults_of(region, sources, copies)
    kek = await region.kek()
    rewrite = [k for k in faults if k in sources]
    drop = [copies[k] for k in faults if k not in sources]
    if drop:
        # ``sources`` was read before these copies: a copy of a DEK made since (a new scope's,
        # a rotation's, replicated meanwhile) is not in it. A copy exists only after its DEK
        # does, so one the primary does not keep usable *now* is of a destroyed DEK.
        live = await primary.usable([(c.scope, c.version) for c in drop])
        drop = [c for c in drop if (c.scope, c.version) not in live]

    async def make(key: tuple[str, int]) -> CopyWrite:
        return await _fresh_copy(primary, region.name, kek, sources, key, copies.get(key))

    writes: list[CopyWrite] = []
    for res in await bounded_map(make, rewrite):
        if isinstance(res, KekUnavailable | StoreUnavailable):
            raise res
        if isinstance(res, BaseException):
            log.warning("replica copy not written for region %s: %s", region.name, error_text(res))
            continue
        writes.append(res)
    return await _write(region, writes, drop, repair_id)


async def _fresh_copy(
    primary: PrimaryKeys,
    region: str,
    kek: KekProvider,
    sources: Sources,
    key: tuple[str, int],
    old: ReplicaCopy | None,
) -> CopyWrite:
    """A copy of the primary's DEK ``key`` wrapped under the region's key, proven to round-trip."""
    src = sources[key]
    ctx = WrapContext(*key)
    dek = await primary.kek.unwrap(src.wrapped, ctx)
    if not hmac.compare_digest(fingerprint(dek), src.fingerprint):
        raise Conflict(f"primary DEK {key[0]} v{key[1]} changed during the check")
    new = await kek.wrap(dek, ctx)
    # Never write an unverified copy: it must unwrap, with the region's key, to this DEK.
    if not hmac.compare_digest(await kek.unwrap(new, ctx), dek):
        raise KekError(f"region {region}: a fresh copy of {key[0]} v{key[1]} does not round-trip")
    return CopyWrite(
        scope=key[0],
        version=key[1],
        state=src.state,
        kek_version=src.kek_version,
        source_kek_id=src.wrapped.kek_id,
        source_region=primary.name,
        wrapped=new.blob,
        region_kek_id=new.kek_id,
        region_kek_version=new.kek_version,
        fingerprint=src.fingerprint,
        dates=src.dates,
        imported=src.imported,
        old=old,
    )


async def _write(
    region: Region, writes: Sequence[CopyWrite], drop: Sequence[ReplicaCopy], repair_id: str | None
) -> int:
    """Write in batches, a transaction each: new copies, replaced copies and dropped ones.

    Raises:
        Conflict: the region was promoted since the repair began (nothing more is written).
    """
    inserts = [w for w in writes if w.old is None]
    updates = [w for w in writes if w.old is not None]
    written = 0
    for i in range(0, max(len(inserts), len(updates), len(drop)), _WRITE_BATCH):
        batch = [*inserts[i : i + _WRITE_BATCH], *updates[i : i + _WRITE_BATCH]]
        async with db.transaction(region.sessions) as session:
            # The fence is read under the lock a promotion must wait for: a promotion that
            # committed while the copies were being made is seen here, never written over.
            await store.lock_copies_for_write(session)
            if await store.promotion_record(session) is not None:
                raise Conflict(
                    f"region {region.name} was promoted to primary; refusing to overwrite its keys"
                )
            n = await store.write_copies(session, batch, drop[i : i + _WRITE_BATCH])
            if repair_id is not None and n:
                await repair_log.log_repair(session, repair_id, n)  # committed with the copies
            written += n
    return written
