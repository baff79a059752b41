"""Promotion of a secondary region to primary, for a lasting outage of the primary.

The region's verified DEK copies become its own ``key_scopes`` and ``data_keys`` (the regional
wrapping key becomes that store's KEK), and ``replica_promotions`` fences it: replication never
writes to it again. See docs/replication.md, "Promotion".
"""

from __future__ import annotations

import hmac
import logging
from typing import Any

from sqlalchemy.ext.asyncio import AsyncSession

from keyrotor.audit import key as audit_key
from keyrotor.audit.log import AuditEvent, write_event
from keyrotor.errors import Conflict, KekError, KekUnavailable, StoreUnavailable
from keyrotor.kek.base import WrapContext, WrappedDek
from keyrotor.replication.grading import grade_region
from keyrotor.replication.primary import PrimaryKeys
from keyrotor.replication.regions import Region, fingerprint
from keyrotor.settings import Settings
from keyrotor.store import db
from keyrotor.store import replication as store
from keyrotor.store.replication import ReplicaCopy

log = logging.getLogger("keyrotor.replication.check")


async def promote(
    primary: PrimaryKeys, region: Region, settings: Settings, *, by: str = "system"
) -> dict[str, Any]:
    """Make secondary ``region`` a primary store: its verified copies become its ``data_keys``.

    The region's database then holds ``key_scopes`` and ``data_keys`` wrapped under the
    region's own key, so a keyrotor configured with ``DATABASE_URL`` = the region's database
    and the region's provider variables serves every DEK the old primary had. The region is
    fenced (``replica_promotions``): replication never writes to it again.

    If the primary is reachable, the region must be ``in_sync`` first; if not, every copy
    must prove itself (unwrap to the bytes its fingerprint names).

    The promotion's audit event starts the region's own audit chain, keyed with an audit key
    wrapped under the region's key (what the promoted deployment's KEK will be).

    Raises:
        Conflict: the region is not in sync, holds corrupt copies, was promoted already,
            or already has scopes of its own.
        StoreUnavailable, KekUnavailable: the region cannot be used now.
        KekError: the region's database holds an audit key its key does not unwrap.
    """
    name = region.name
    if await region.promotion() is not None:
        raise Conflict(f"region {name} was promoted already")
    reachable = await _in_sync_if_reachable(primary, region)
    # The region's key becomes the promoted store's KEK, so it wraps that store's audit key too:
    # loaded (or created) here, before the promotion's event, and never through the primary.
    await audit_key.ensure_key(region.sessions, await region.kek())
    async with db.transaction(region.sessions) as session:
        scopes, deks = await _fence_and_adopt(session, region, primary.name, settings, by)
    log.warning("region %s promoted to primary (%d scopes, %d DEKs)", name, scopes, deks)
    return {
        "region": name,
        "previous_primary": primary.name,
        "scopes": scopes,
        "deks": deks,
        "primary_reachable": reachable,
        "next": (
            f"set KEYROTOR_PRIMARY_REGION={name}, DATABASE_URL to its database and its "
            f"{region.cfg.prefix}* provider variables as the primary's (SECRETS_PROVIDER, ...)"
        ),
    }


async def _fence_and_adopt(
    session: AsyncSession, region: Region, previous: str, settings: Settings, by: str
) -> tuple[int, int]:
    """In the promotion's transaction: adopt the region's verified copies, fence it, audit it.
    Returns ``(scopes, DEKs)`` adopted.

    Raises:
        Conflict: promoted already, scopes of its own, or a corrupt copy.
    """
    # No repair writes from here to the commit, so the copies adopted are the copies fenced.
    await store.lock_copies_for_promotion(session)
    if await store.promotion_record(session) is not None:
        raise Conflict(f"region {region.name} was promoted already")
    if await store.count_scopes(session):
        raise Conflict(f"region {region.name} already has scopes of its own; not promoted")
    copies = list((await store.region_copies(session, None)).values())
    await _verify(region, copies)
    scopes = await _adopt(session, copies, settings)
    await store.record_promotion(session, region.name, previous_primary=previous, by=by, keys=len(copies))
    meta = {"state": "promoted", "region": region.name, "previous_primary": previous, "keys": len(copies)}
    await write_event(session, AuditEvent("failover", actor=by, metadata=meta))
    return scopes, len(copies)


async def _in_sync_if_reachable(primary: PrimaryKeys, region: Region) -> bool:
    """Whether the primary could be read; if it could, the region must be in sync with it.

    Raises:
        Conflict: the primary is reachable and the region is not in sync.
    """
    try:
        sources = await primary.sources(None)
    except (StoreUnavailable, KekUnavailable):
        return False
    graded = await grade_region(region, sources, None)
    if graded.status != "in_sync":
        raise Conflict(
            f"region {region.name} is {graded.status} ({graded.detail}): "
            "run `keyrotor replicas check --repair` first"
        )
    return True


async def _verify(region: Region, copies: list[ReplicaCopy]) -> None:
    """Every copy must unwrap with the region's key to the DEK its fingerprint names.

    Raises:
        Conflict: a copy is corrupt.
        KekUnavailable: the region's key provider cannot be reached.
    """
    kek = await region.kek()
    for c in copies:
        corrupt = Conflict(
            f"region {region.name}: the copy of {c.scope} v{c.version} is corrupt; not promoted"
        )
        try:
            dek = await kek.unwrap(
                WrappedDek(c.region_kek_id, c.region_kek_version, c.wrapped),
                WrapContext(c.scope, c.version),
            )
        except KekUnavailable:
            raise
        except KekError as exc:
            raise corrupt from exc
        if not hmac.compare_digest(fingerprint(dek), c.fingerprint):
            raise corrupt


async def _adopt(session: AsyncSession, copies: list[ReplicaCopy], settings: Settings) -> int:
    """Write the copies as the region's own scopes and DEKs; returns the scopes written."""
    by_scope: dict[str, list[ReplicaCopy]] = {}
    for c in copies:
        by_scope.setdefault(c.scope, []).append(c)
    for scope, cs in sorted(by_scope.items()):
        active = [c.version for c in cs if c.state == "active"]
        latest = max(c.version for c in cs)
        scope_id = await store.insert_promoted_scope(
            session,
            scope,
            active=active[0] if active else latest,
            latest=latest,
            enabled=settings.default_rotation_enabled,
            interval_days=settings.default_interval_days,
            grace_days=min(settings.default_grace_days, settings.default_interval_days),
        )
        for c in cs:
            await store.insert_promoted_dek(session, scope_id, c, settings.default_grace_days)
    return len(by_scope)
