"""Due dates across a daylight-saving change: a policy's days are days of 24 hours, whatever
the database's TimeZone, as the policy commands and dry runs (Python timedeltas) count them."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from zoneinfo import ZoneInfo

from keyrotor.schedule.rules import RotationPolicy
from keyrotor.store import db
from keyrotor.store import retire as retire_store
from keyrotor.store import rotation as rotation_store
from tests.scheduler.conftest import seed_scopes, sql

ZONE = "America/New_York"


def days_across_next_dst_change(now: datetime) -> int:
    """A number of days whose span from ``now`` holds exactly one of ZONE's offset changes."""
    zone = ZoneInfo(ZONE)
    offset = now.astimezone(zone).utcoffset()
    for days in range(1, 366):
        if (now + timedelta(days=days)).astimezone(zone).utcoffset() != offset:
            # The next change is at least four months after this one: one change, not two.
            return days + 1
    raise AssertionError(f"{ZONE} changed no offset in a year")


async def test_due_dates_count_days_of_24_hours_across_a_dst_change(database_url: str) -> None:
    days = days_across_next_dst_change(datetime.now(UTC))
    span = timedelta(days=days)
    # A server whose TimeZone observes DST (initdb takes the host's zone).
    await sql(database_url, f"ALTER DATABASE {database_url.rsplit('/', 1)[1]} SET timezone TO '{ZONE}'")
    await seed_scopes(database_url, 1, due_at=datetime.now(UTC), interval_days=days)
    (ids,) = await sql(
        database_url,
        "WITH s AS (UPDATE key_scopes SET grace_period_days = $1, latest_version = 2 RETURNING id) "
        "INSERT INTO data_keys (scope_id, version, state, encrypted_dek, kek_id, kek_version) "
        "SELECT id, 2, 'pending', '\\x00'::bytea, 'test', 1 FROM s RETURNING scope_id, "
        "(SELECT id FROM data_keys WHERE version = 1) AS v1",
        days,
    )
    scope_id, v1 = int(ids["scope_id"]), int(ids["v1"])
    engine = db.create_engine(database_url, pool_size=1)
    try:
        sessions = db.sessionmaker(engine)
        async with db.transaction(sessions) as session:  # a rotation's promotion and completion
            await rotation_store.promote_dek(session, scope_id, 2)
            await rotation_store.record_rotation(session, scope_id, 2, 0)
        (rotated,) = await sql(
            database_url,
            "SELECT s.last_rotation_at, s.next_rotation_at, d.activated_at, o.grace_until "
            "FROM key_scopes s JOIN data_keys d ON d.scope_id = s.id AND d.version = 2 "
            "JOIN data_keys o ON o.scope_id = s.id AND o.version = 1",
        )
        async with db.transaction(sessions) as session:
            destroy_after = await retire_store.retire_dek(session, v1, days)
        (retired,) = await sql(database_url, "SELECT retired_at FROM data_keys WHERE id = $1", v1)
        before = datetime.now(UTC)
        async with db.transaction(sessions) as session:
            restored_until = await retire_store.restore_to_grace(session, v1, days)
    finally:
        await engine.dispose()
    print(f"{days} days in {ZONE}: {rotated['next_rotation_at'] - rotated['last_rotation_at']}")
    policy = RotationPolicy(True, days, days)
    assert rotated["next_rotation_at"] == policy.next_rotation_after(rotated["last_rotation_at"])
    assert rotated["next_rotation_at"] - rotated["last_rotation_at"] == span
    assert rotated["grace_until"] - rotated["activated_at"] == span
    assert destroy_after - retired["retired_at"] == span
    assert abs(restored_until - before - span) < timedelta(minutes=1)
