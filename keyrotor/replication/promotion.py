"""Promotion of a secondary region to primary, for a lasting outage of the primary.

The region's verified DEK copies become its own ``key_scopes`` and ``data_keys`` (the regional
wrapping key becomes that store's KEK), in the old primary's states and with its dates, and
``replica_promotions`` fences it: replication never writes to it again. See docs/replication.md,
"Promotion".

A promotion must neither bring back a DEK the old primary destroyed nor lose one that values
still need. With the primary reachable, the region is in sync with it: its copies are exactly
the primary's DEKs that still decrypt. With the primary down, a copy says what the primary had
when the copy was last proven current (written, or its region found fully in sync), and that
proof rules destruction out only for so long:

- a copy not proven within :data:`~keyrotor.replication.failover.FAILOVER_MAX_PROOF_AGE_S` may
  be of a DEK destroyed since (a ``pending``/``active``/``grace`` one too: the region may never
  have been told it was retired), yet may as well be a DEK values need: the region is refused;
- a ``retired`` copy whose ``destroy_after`` has passed may be of a DEK the primary destroyed,
  or of one whose destruction a use (a value still read with it) or the proof (a value still on
  it) cancelled after the region lost touch: the copy cannot tell. Leaving it out would be a
  destruction without proof, which may lose those values for good; it is adopted like every
  other copy, and its destruction is put off by a whole window from the promotion
  (:func:`keyrotor.store.promotion.insert_promoted_dek`), after which the new primary destroys
  it only if its own proof holds.
  A shredded key may so live one more window on the new primary: the price of never destroying
  one that values need.
"""

from __future__ import annotations

import hmac
import logging
from typing import Any

from sqlalchemy.ext.asyncio import AsyncSession

from keyrotor.audit import key as audit_key
from keyrotor.audit.log import AuditEvent, write_event
from keyrotor.census.locations import UNRECORDED, second_phase_location
from keyrotor.errors import Conflict, KekError, KekUnavailable, StoreUnavailable
from keyrotor.kek.base import WrapContext, WrappedDek
from keyrotor.replication.failover import FAILOVER_MAX_PROOF_AGE_S
from keyrotor.replication.grading import grade_region
from keyrotor.replication.primary import PrimaryKeys
from keyrotor.replication.regions import Region, fingerprint
from keyrotor.settings import Settings
from keyrotor.store import census as census_store
from keyrotor.store import db
from keyrotor.store import promotion as store
from keyrotor.store import replication as copies_store
from keyrotor.store.promotion import CopyProof
from keyrotor.store.replication import ReplicaCopy

log = logging.getLogger("keyrotor.replication.check")

# A retired copy whose destroy_after is this close is treated as due: the old primary's clock
# may run ahead of the region database's.
DESTRUCTION_DUE_MARGIN_S = 3_600.0


async def promote(
    primary: PrimaryKeys, region: Region, settings: Settings, *, by: str = "system"
) -> dict[str, Any]:
    """Make secondary ``region`` a primary store: its verified copies become its ``data_keys``.

    The region's database then holds ``key_scopes`` and ``data_keys`` wrapped under the
    region's own key, so a keyrotor configured with ``DATABASE_URL`` = the region's database
    and the region's provider variables serves every DEK the old primary had. The region is
    fenced (``replica_promotions``): replication never writes to it again.

    If the primary is reachable, the region must be ``in_sync`` first, with no destruction
    due; if not, every copy must prove itself (unwrap to the bytes its fingerprint names) and
    have been proven current recently (see the module docstring). Adopted DEKs keep the old
    primary's states and dates, but a pending destruction is a whole window away at least.

    The promotion's audit event starts the region's own audit chain, keyed with an audit key
    wrapped under the region's key (what the promoted deployment's KEK will be).

    Raises:
        Conflict: the region is not in sync, holds corrupt copies or copies not proven
            current recently (primary down), holds a DEK due for destruction (primary up), was
            promoted already, or already has scopes of its own.
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
        scopes, deks = await _fence_and_adopt(
            session, region, primary.name, settings, by, reachable=reachable
        )
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
    session: AsyncSession, region: Region, previous: str, settings: Settings, by: str, *, reachable: bool
) -> tuple[int, int]:
    """In the promotion's transaction: adopt the region's verified copies, fence it, audit it.
    Returns ``(scopes, DEKs)`` adopted.

    Raises:
        Conflict: promoted already, scopes of its own, a corrupt copy, or copies that may be
            of destroyed DEKs (see :func:`_adoptable`).
    """
    # No repair writes from here to the commit, so the copies adopted are the copies fenced.
    await store.lock_copies_for_promotion(session)
    if await copies_store.promotion_record(session) is not None:
        raise Conflict(f"region {region.name} was promoted already")
    if await store.count_scopes(session):
        raise Conflict(f"region {region.name} already has scopes of its own; not promoted")
    every = list((await copies_store.region_copies(session, None)).values())
    proofs = await store.copy_proofs(session, region.name, due_within_s=DESTRUCTION_DUE_MARGIN_S)
    copies = _adoptable(region.name, every, proofs, reachable=reachable)
    active = _active_versions(region.name, every)
    await _verify(region, copies)
    scopes = await _adopt(session, copies, settings, latest=_latest(every), active=active)
    await store.record_promotion(session, region.name, previous_primary=previous, by=by, keys=len(copies))
    meta = {
        "state": "promoted",
        "region": region.name,
        "previous_primary": previous,
        "keys": len(copies),
    }
    await write_event(session, AuditEvent("failover", actor=by, metadata=meta))
    return scopes, len(copies)


def _adoptable(
    name: str, copies: list[ReplicaCopy], proofs: dict[tuple[str, int], CopyProof], *, reachable: bool
) -> list[ReplicaCopy]:
    """The copies a promotion makes DEKs of the new primary (see the module docstring).

    Raises:
        Conflict: a copy may be of a destroyed DEK and as well of one values need (primary
            down: not proven current recently, or retired with its dates unknown); or, with the
            primary reachable, a destruction is due there (it may yet be cancelled by a use).
    """
    due = [c for c in copies if c.state == "retired" and proofs[(c.scope, c.version)].destruction_due]
    if reachable:
        if due:
            raise Conflict(
                f"region {name}: {len(due)} retired DEKs are due for destruction on the primary "
                f"(e.g. {due[0].scope} v{due[0].version}): let the destruction run (it may be "
                "cancelled by a use), then `keyrotor replicas check --repair`; not promoted"
            )
        return copies
    unproven = [
        c
        for c in copies
        if proofs[(c.scope, c.version)].proven_age_s > FAILOVER_MAX_PROOF_AGE_S
        # written before copies carried their dates (0015): its destruction date is unknown
        or (c.state == "retired" and c.dates.retired_at is None)
    ]
    if unproven:
        oldest = max(proofs[(c.scope, c.version)].proven_age_s for c in unproven) / 86_400
        raise Conflict(
            f"region {name}: {len(unproven)} DEK copies not proven current within "
            f"{FAILOVER_MAX_PROOF_AGE_S / 86_400:g} days (e.g. {unproven[0].scope} v{unproven[0].version}, "
            f"{oldest:.1f} days): the primary may have destroyed their keys since, or values may need "
            "them; not promoted. Bring the primary back, or promote a region checked in sync recently"
        )
    return copies


def _latest(copies: list[ReplicaCopy]) -> dict[str, int]:
    """Each scope's highest version among the region's copies (every one of them is adopted, a
    retired copy past its ``destroy_after`` too: :func:`_adoptable` refuses the promotion rather
    than leave one out), so that the new primary numbers its next DEK after every version the
    region knows the old one issued."""
    out: dict[str, int] = {}
    for c in copies:
        out[c.scope] = max(out.get(c.scope, 0), c.version)
    return out


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


def _active_versions(name: str, copies: list[ReplicaCopy]) -> dict[str, int]:
    """Each scope's active version after the promotion: its newest ``active`` copy, if no newer
    copy is past active (``grace`` or ``retired``). ``copies``: every copy of the region.

    On the primary a version becomes active once, after every older one (a rotation promotes a
    new, higher version and moves the active one to grace; nothing makes an older one active
    again). So of two ``active`` copies (a repair cut off between its batches) the older is
    stale and was in grace by the time the newer was copied; and a grace or retired copy newer
    than every active one means the scope's current DEK has no copy here. Except an imported
    one: ``legacy import-dek`` adds the old backend's DEK as the newest version, in grace, and
    it is never active, so it says nothing of the active line (a copy without the mark, from
    before migration 0019, is not taken for one here: refusing is the safe side).

    Raises:
        Conflict: a scope has no current active copy: making a grace or retired DEK active
            would encrypt new values with a key a rotation superseded.
    """
    by_scope: dict[str, list[ReplicaCopy]] = {}
    for c in copies:
        by_scope.setdefault(c.scope, []).append(c)
    out: dict[str, int] = {}
    for scope, cs in sorted(by_scope.items()):
        active = max((c.version for c in cs if c.state == "active"), default=None)
        past = max(
            (c.version for c in cs if c.state in ("grace", "retired") and c.imported is not True), default=0
        )
        if active is None or past > active:
            raise Conflict(
                f"region {name}: scope {scope} has no current active DEK copy (its newest copies: "
                f"{_describe(cs)}), so new values would go to a superseded key; not promoted. "
                "Bring the primary back and run `keyrotor replicas check --repair`, or promote "
                "another region"
            )
        out[scope] = active
    return out


def _describe(copies: list[ReplicaCopy]) -> str:
    newest = sorted(copies, key=lambda c: c.version, reverse=True)[:3]
    return ", ".join(f"v{c.version} {c.state}" for c in newest)


def _promoted_state(c: ReplicaCopy, active: int) -> str:
    """An ``active`` or ``pending`` copy older than the scope's active version was superseded on
    the primary (see :func:`_active_versions`): it decrypts, in grace, and never encrypts."""
    if c.state in ("active", "pending") and c.version < active:
        return "grace"
    return c.state


async def _adopt(
    session: AsyncSession,
    copies: list[ReplicaCopy],
    settings: Settings,
    *,
    latest: dict[str, int],
    active: dict[str, int],
) -> int:
    """Write the copies as the region's own scopes and DEKs; returns the scopes written."""
    by_scope: dict[str, list[ReplicaCopy]] = {}
    for c in copies:
        by_scope.setdefault(c.scope, []).append(c)
    for scope, cs in sorted(by_scope.items()):
        scope_id = await store.insert_promoted_scope(
            session,
            scope,
            active=active[scope],
            latest=latest[scope],
            enabled=settings.default_rotation_enabled,
            interval_days=settings.default_interval_days,
            grace_days=min(settings.default_grace_days, settings.default_interval_days),
        )
        for c in cs:
            state = _promoted_state(c, active[scope])
            if state != c.state:
                log.warning("promotion: %s v%d was superseded; adopted in grace", scope, c.version)
            await store.insert_promoted_dek(
                session,
                scope_id,
                c,
                state=state,
                # A copy written before migration 0019 cannot say: taken for imported, so the
                # new primary's proof scans every table for values the old backend sealed.
                imported=c.imported is not False,
                grace_days=settings.default_grace_days,
                destroy_after_days=settings.destroy_after_days,
            )
            # The old primary's census stays behind: where this version's values were sealed is
            # not known here, and an empty census would let the new primary's proof retire and
            # destroy a key whose values sit in a table nobody registered here. Like the versions
            # that existed before locations were recorded (migration 0008), each gets the
            # `(unrecorded)` location, which keeps it until an operator acknowledges it here
            # (once every table holding its values is registered).
            await census_store.record_location(session, scope_id, c.version, UNRECORDED, 0)
            if c.imported:
                # And the location its import recorded: the old backend's values, in any table.
                await census_store.record_location(
                    session, scope_id, c.version, second_phase_location(scope, c.version), 0
                )
    return len(by_scope)
