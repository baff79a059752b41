"""What a promotion makes of each scope: a fresh destruction window for a retired DEK (its uses
on the old primary are not carried over), exactly one active DEK, and never a superseded DEK
active again (docs/replication.md, "Promotion")."""

from __future__ import annotations

import asyncio

import pytest

from keyrotor import KeyManager, Settings
from keyrotor.errors import Conflict
from tests.destruction_helpers import acknowledge
from tests.replication.conftest import PRIMARY, rep_of, settle, sql, statuses, unreachable
from tests.replication.proxy import PgProxy
from tests.replication.test_promotion_lifecycle import OLD, _env, _rotate, _rows
from tests.rotation_helpers import cleanup_queue

DAY_S = 86_400.0


async def test_a_promoted_retired_key_gets_a_fresh_destruction_window(
    renv: dict[str, str], region_urls: dict[str, str], proxies: dict[str, PgProxy]
) -> None:
    """v1 was retired 29 days ago (a day of its window left) and a value needed it on the old
    primary since: a use that cancels its destruction there. The promoted store knows none of
    those uses, so it must not destroy v1 a day from now: its window starts again at the
    promotion, where uses are recorded from now on."""
    wenv = _env(renv)
    s = Settings.from_env(wenv)
    try:
        async with KeyManager(s, environ=wenv) as km:
            sealed = await km.encrypt("anthropic", OLD, context="row:1")
            await settle(km)
        # The value lives where the census cannot count it: its uses are the only evidence.
        await acknowledge(s.database_url, "row", "an application value outside registered columns")
        await _rotate(s, "anthropic", retire=True)
        await sql(
            s.database_url,
            "UPDATE data_keys SET retired_at = now() - interval '29 days', "
            "destroy_after = now() + interval '1 day' WHERE version = 1",
        )
        async with KeyManager(s, environ=wenv) as km:
            assert await km.decrypt("anthropic", sealed, context="row:1") == OLD  # a use, on the old primary
            async with asyncio.timeout(10):
                while not await sql(s.database_url, "SELECT 1 FROM retired_key_uses"):
                    await asyncio.sleep(0.05)
            report = await rep_of(km).check(repair=True)
            assert statuses(report) == {"eu-west-1": "in_sync", "ap-south-1": "in_sync"}
        async with KeyManager(s, environ=wenv) as km, unreachable(proxies[PRIMARY]):
            doc = await rep_of(km).promote("eu-west-1", by="ops@example")
        assert doc["deks"] == 2 and "left_out" not in doc
        (row,) = await sql(
            region_urls["eu-west-1"],
            "SELECT state, EXTRACT(EPOCH FROM destroy_after - now()) AS left_s, "
            "EXTRACT(EPOCH FROM now() - retired_at) AS retired_s FROM data_keys WHERE version = 1",
        )
        assert row["state"] == "retired"
        assert float(row["left_s"]) > s.destroy_after_days * DAY_S - 600
        assert float(row["retired_s"]) > 28 * DAY_S  # when it was retired stays true
    finally:
        await cleanup_queue(wenv["KEYROTOR_QUEUE_NAME"])


async def test_two_active_copies_promote_the_newest_and_the_older_to_grace(
    renv: dict[str, str], region_urls: dict[str, str], proxies: dict[str, PgProxy]
) -> None:
    """A repair cut off between its batches wrote v2 (active) but not v1's change to grace. v1
    was superseded by v2 on the primary (a version only ever becomes active once, after every
    older one), so it is adopted in grace and v2 is the scope's active DEK."""
    wenv = _env(renv)
    s = Settings.from_env(wenv)
    try:
        async with KeyManager(s, environ=wenv) as km:
            await km.put_secret("anthropic", "prod", OLD)
            await settle(km)
        await _rotate(s, "anthropic", retire=False)
        eu = region_urls["eu-west-1"]
        await sql(eu, "UPDATE replica_keys SET state = 'active', grace_until = NULL WHERE dek_version = 1")
        async with KeyManager(s, environ=wenv) as km, unreachable(proxies[PRIMARY]):
            doc = await rep_of(km).promote("eu-west-1", by="ops@example")
        assert doc["deks"] == 2 and "left_out" not in doc
        assert [r[:3] for r in await _rows(eu)] == [("anthropic", 1, "grace"), ("anthropic", 2, "active")]
        assert [tuple(r) for r in await sql(eu, "SELECT active_version, latest_version FROM key_scopes")] == [
            (2, 2)
        ]
        (grace,) = await sql(eu, "SELECT grace_until > now() AS later FROM data_keys WHERE version = 1")
        assert grace["later"]
    finally:
        await cleanup_queue(wenv["KEYROTOR_QUEUE_NAME"])


@pytest.mark.parametrize(
    "edit",
    [
        # v2's copy never landed: only the retired v1 is left
        "DELETE FROM replica_keys WHERE dek_version = 2",
        # v1 says active, but a newer version is already past active: v1 was superseded
        "UPDATE replica_keys SET state = CASE dek_version WHEN 1 THEN 'active' ELSE 'grace' END",
    ],
)
async def test_a_scope_without_a_current_active_copy_refuses_the_promotion(
    renv: dict[str, str], region_urls: dict[str, str], proxies: dict[str, PgProxy], edit: str
) -> None:
    """A scope whose newest copy is not the active one lacks the DEK new values go to: making a
    grace or retired DEK active would encrypt with a key a rotation superseded. Refused, typed,
    nothing written."""
    wenv = _env(renv)
    s = Settings.from_env(wenv)
    try:
        async with KeyManager(s, environ=wenv) as km:
            await km.put_secret("anthropic", "prod", OLD)
            await km.encrypt("openai", "sk-proj-promotion-scopes-0123456789", context="row:1")
            await settle(km)
        await _rotate(s, "anthropic", retire=True)
        eu = region_urls["eu-west-1"]
        await sql(eu, edit.replace("WHERE", "WHERE scope = 'anthropic' AND") if "WHERE" in edit else edit)
        async with KeyManager(s, environ=wenv) as km, unreachable(proxies[PRIMARY]):
            with pytest.raises(Conflict, match=r"anthropic has no current active DEK"):
                await rep_of(km).promote("eu-west-1", by="ops@example")
        assert await _rows(eu) == []
        assert (await sql(eu, "SELECT count(*) FROM replica_promotions"))[0][0] == 0
    finally:
        await cleanup_queue(wenv["KEYROTOR_QUEUE_NAME"])
