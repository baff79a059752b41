"""Statements of a region's promotion to primary: its copies (``replica_keys``) locked and
graded for the promotion, then made the region's own ``key_scopes`` and ``data_keys``, and the
fence (``replica_promotions``) that keeps replication from writing to it again.

Every function takes the session of the promotion's transaction, in the region's database.
"""

from __future__ import annotations

from typing import NamedTuple

from sqlalchemy import text
from sqlalchemy.ext.asyncio import AsyncSession

from keyrotor.store.dates import days_from_now
from keyrotor.store.replication import ReplicaCopy


async def lock_copies_for_promotion(session: AsyncSession) -> None:
    """Lock ``replica_keys`` against every write until the promotion's transaction ends."""
    await session.execute(text("LOCK TABLE replica_keys IN SHARE MODE"))


class CopyProof(NamedTuple):
    """What a promotion with the primary down knows of one copy, on the region's clock."""

    proven_age_s: float  # since the copy was last written or its region last proven in sync
    destruction_due: bool  # retired, and its destroy_after passed (or falls within the margin)


async def copy_proofs(
    session: AsyncSession, region: str, *, due_within_s: float
) -> dict[tuple[str, int], CopyProof]:
    """Every copy's :class:`CopyProof`, by ``(scope, version)``: ``proven_age_s`` as in
    :func:`region_copy`; ``destruction_due`` if its ``destroy_after`` is at most
    ``due_within_s`` seconds from now (the margin covers clock skew between the databases)."""
    rows = await session.execute(
        text(
            "SELECT r.scope, r.dek_version, EXTRACT(EPOCH FROM now() - GREATEST(r.replicated_at, "
            "(SELECT k.last_ok_at FROM kek_replicas k WHERE k.region = :r))), "
            "COALESCE(r.destroy_after <= now() + CAST(:due AS double precision) "
            "* interval '1 second', false) "
            "FROM replica_keys r"
        ),
        {"r": region, "due": due_within_s},
    )
    return {(r[0], r[1]): CopyProof(float(r[2]), bool(r[3])) for r in rows.all()}


async def count_scopes(session: AsyncSession) -> int:
    """How many scopes the database holds."""
    return int((await session.execute(text("SELECT count(*) FROM key_scopes"))).scalar_one())


async def insert_promoted_scope(
    session: AsyncSession,
    name: str,
    *,
    active: int,
    latest: int,
    enabled: bool,
    interval_days: int,
    grace_days: int,
) -> int:
    """Create a scope of a promoted region (its next rotation an interval from now); returns its id."""
    return int(
        (
            await session.execute(
                text(
                    "INSERT INTO key_scopes (name, active_version, latest_version, rotation_enabled, "
                    "interval_days, grace_period_days, next_rotation_at) VALUES "
                    "(:n, :a, :l, :e, :i, :g, "
                    f"{days_from_now(':i')}) RETURNING id"
                ),
                {"n": name, "a": active, "l": latest, "e": enabled, "i": interval_days, "g": grace_days},
            )
        ).scalar_one()
    )


async def insert_promoted_dek(
    session: AsyncSession,
    scope_id: int,
    copy: ReplicaCopy,
    *,
    state: str,
    imported: bool,
    grace_days: int,
    destroy_after_days: int,
) -> None:
    """Make a region's copy a DEK of its own store (wrapped under the region's key), in ``state``
    and with the primary's dates; a date it lacks (copied before migration 0015, or a superseded
    ``active`` copy adopted in grace) is that of a DEK that entered its state now. A pending
    destruction gets at least a full window from now: the old primary's uses (which cancel it)
    are not carried over, so uses get a whole window here. A cancelled one stays cancelled.
    ``imported``: the DEK's mark (the caller decides what a copy without one is)."""
    await session.execute(
        text(
            "INSERT INTO data_keys (scope_id, version, state, "
            "encrypted_dek, kek_id, kek_version, imported, "
            "activated_at, grace_until, retired_at, destroy_after) "
            "VALUES (:sid, :v, :st, :blob, :kid, :kv, :imp, "
            "COALESCE(CAST(:act AS timestamptz), CASE WHEN :st IN ('active', 'grace') THEN now() END), "
            "CASE WHEN :st = 'grace' THEN COALESCE(CAST(:gu AS timestamptz), "
            f"{days_from_now(':g')}) ELSE CAST(:gu AS timestamptz) END, "
            "CAST(:ra AS timestamptz), "
            "GREATEST(CAST(:da AS timestamptz), CASE WHEN CAST(:da AS timestamptz) IS NOT NULL "
            f"THEN {days_from_now(':dd')} END))"
        ),
        {
            "sid": scope_id,
            "v": copy.version,
            "st": state,
            "imp": imported,
            "blob": copy.wrapped,
            "kid": copy.region_kek_id,
            "kv": copy.region_kek_version,
            "g": grace_days,
            "dd": destroy_after_days,
            "act": copy.dates.activated_at,
            "gu": copy.dates.grace_until,
            "ra": copy.dates.retired_at,
            "da": copy.dates.destroy_after,
        },
    )


async def record_promotion(
    session: AsyncSession, region: str, *, previous_primary: str, by: str, keys: int
) -> None:
    """Fence a promoted region: replication never writes to it again."""
    await session.execute(
        text(
            "INSERT INTO replica_promotions (region, previous_primary, promoted_by, keys) "
            "VALUES (:r, :p, :b, :k)"
        ),
        {"r": region, "p": previous_primary, "b": by, "k": keys},
    )
