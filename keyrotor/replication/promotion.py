"""Promotion of a secondary region to primary, for a lasting outage of the primary.

The region's verified DEK copies become its own ``key_scopes`` and ``data_keys`` (the regional
wrapping key becomes that store's KEK), and ``replica_promotions`` fences it: replication never
writes to it again. See docs/replication.md, "Promotion".
"""

from __future__ import annotations

import hmac
import logging
from typing import TYPE_CHECKING, Any

from sqlalchemy import text

from keyrotor.audit.log import AuditEvent, write_event
from keyrotor.errors import Conflict, KekError, KekUnavailable, StoreUnavailable
from keyrotor.kek.base import WrapContext, WrappedDek
from keyrotor.replication.regions import ReplicaCopy, fingerprint
from keyrotor.store import db

if TYPE_CHECKING:
    from keyrotor.replication.check import Replication

log = logging.getLogger("keyrotor.replication.check")


async def promote(rep: Replication, name: str, *, by: str = "system") -> dict[str, Any]:
    """Make secondary ``name`` a primary store: its verified copies become its ``data_keys``.

    The region's database then holds ``key_scopes`` and ``data_keys`` wrapped under the
    region's own key, so a keyrotor configured with ``DATABASE_URL`` = the region's database
    and the region's provider variables serves every DEK the old primary had. The region is
    fenced (``replica_promotions``): replication never writes to it again.

    If the primary is reachable, the region must be ``in_sync`` first; if not, every copy
    must prove itself (unwrap to the bytes its fingerprint names).

    Raises:
        NotFound: no such region.
        Conflict: the region is not in sync, holds corrupt copies, was promoted already,
            or already has scopes of its own.
        StoreUnavailable, KekUnavailable: the region cannot be used now.
    """
    region = rep.region(name)
    if await region.promotion() is not None:
        raise Conflict(f"region {name} was promoted already")
    try:
        sources = await rep.sources(None)
    except (StoreUnavailable, KekUnavailable):
        sources = None
    if sources is not None:
        graded = await rep.grade_region(region, sources, None)
        if graded.status != "in_sync":
            raise Conflict(
                f"region {name} is {graded.status} ({graded.detail}): "
                "run `keyrotor replicas check --repair` first"
            )
    copies = await region.copies()
    kek = await region.kek()
    for c in copies.values():
        try:
            dek = await kek.unwrap(
                WrappedDek(c.region_kek_id, c.region_kek_version, c.wrapped),
                WrapContext(c.scope, c.version),
            )
        except KekUnavailable:
            raise
        except KekError as exc:
            raise Conflict(
                f"region {name}: the copy of {c.scope} v{c.version} is corrupt; not promoted"
            ) from exc
        if not hmac.compare_digest(fingerprint(dek), c.fingerprint):
            raise Conflict(f"region {name}: the copy of {c.scope} v{c.version} is corrupt; not promoted")
    by_scope: dict[str, list[ReplicaCopy]] = {}
    for c in copies.values():
        by_scope.setdefault(c.scope, []).append(c)
    async with db.transaction(region.sessions) as session:
        if (await session.execute(text("SELECT count(*) FROM key_scopes"))).scalar_one():
            raise Conflict(f"region {name} already has scopes of its own; not promoted")
        scopes = 0
        for scope, cs in sorted(by_scope.items()):
            active = [c.version for c in cs if c.state == "active"]
            latest = max(c.version for c in cs)
            scope_id = (
                await session.execute(
                    text(
                        "INSERT INTO key_scopes (name, active_version, latest_version, rotation_enabled, "
                        "interval_days, grace_period_days, next_rotation_at) VALUES "
                        "(:n, :a, :l, :e, :i, :g, "
                        "now() + make_interval(days => :i)) RETURNING id"
                    ),
                    {
                        "n": scope,
                        "a": active[0] if active else latest,
                        "l": latest,
                        "e": rep.settings.default_rotation_enabled,
                        "i": rep.settings.default_interval_days,
                        "g": min(rep.settings.default_grace_days, rep.settings.default_interval_days),
                    },
                )
            ).scalar_one()
            for c in cs:
                await session.execute(
                    text(
                        "INSERT INTO data_keys (scope_id, version, state, "
                        "encrypted_dek, kek_id, kek_version, "
                        "activated_at, grace_until) VALUES (:sid, :v, :st, :blob, :kid, :kv, "
                        "CASE WHEN :st IN ('active', 'grace') THEN now() END, "
                        "CASE WHEN :st = 'grace' THEN now() + make_interval(days => :g) END)"
                    ),
                    {
                        "sid": scope_id,
                        "v": c.version,
                        "st": c.state,
                        "blob": c.wrapped,
                        "kid": c.region_kek_id,
                        "kv": c.region_kek_version,
                        "g": rep.settings.default_grace_days,
                    },
                )
            scopes += 1
        await session.execute(
            text(
                "INSERT INTO replica_promotions (region, previous_primary, promoted_by, keys) "
                "VALUES (:r, :p, :b, :k)"
            ),
            {"r": name, "p": rep.primary, "b": by, "k": len(copies)},
        )
        await write_event(
            session,
            AuditEvent(
                "failover",
                actor=by,
                metadata={
                    "state": "promoted",
                    "region": name,
                    "previous_primary": rep.primary,
                    "keys": len(copies),
                },
            ),
        )
    log.warning("region %s promoted to primary (%d scopes, %d DEKs)", name, scopes, len(copies))
    return {
        "region": name,
        "previous_primary": rep.primary,
        "scopes": scopes,
        "deks": len(copies),
        "primary_reachable": sources is not None,
        "next": (
            f"set KEYROTOR_PRIMARY_REGION={name}, DATABASE_URL to its database and its "
            f"{region.cfg.prefix}* provider variables as the primary's (SECRETS_PROVIDER, ...)"
        ),
    }
