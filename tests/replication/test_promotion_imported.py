"""A DEK imported from the old backend stays imported in every region and on a promoted store.

The retirement proof tries an imported DEK on every value not yet ``kr1`` in every registered
table (the old backend sealed values with it that carry no version), and only an imported one:
the mark (``data_keys.imported``, migration 0019) must reach the copies and come back with a
promotion, or a promoted store would retire the key without looking for them.
"""

from __future__ import annotations

import base64
import os

from keyrotor import KeyManager, Settings
from keyrotor.crypto import legacy_format
from keyrotor.legacy import second_phase
from tests.conftest import MASTER_KEY
from tests.replication.conftest import PRIMARY, rep_of, settle, sql, statuses, unreachable
from tests.replication.proxy import PgProxy
from tests.replication.test_promotion_lifecycle import OLD, _env
from tests.rotation_helpers import cleanup_queue

MARKS = (
    "SELECT s.name, d.version, d.imported FROM data_keys d JOIN key_scopes s ON s.id = d.scope_id "
    "ORDER BY s.name, d.version"
)
COPIES = "SELECT scope, dek_version, imported FROM replica_keys ORDER BY scope, dek_version"


async def test_the_imported_mark_is_copied_and_carried_over_by_a_promotion(
    renv: dict[str, str], region_urls: dict[str, str], proxies: dict[str, PgProxy]
) -> None:
    wenv = _env(renv)
    s = Settings.from_env(wenv)
    old_dek = legacy_format.encrypt(base64.b64encode(os.urandom(32)).decode("ascii"), MASTER_KEY)
    try:
        async with KeyManager(s, environ=wenv) as km:
            await km.put_secret("anthropic", "prod", OLD)
            await settle(km)
            await second_phase.import_dek(km, "anthropic", old_dek)
            assert statuses(await rep_of(km).check(repair=True)) == dict.fromkeys(region_urls, "in_sync")
            expected = [("anthropic", 1, False), ("anthropic", 2, True)]
            assert [tuple(r) for r in await sql(s.database_url, MARKS)] == expected
            for url in region_urls.values():
                assert [tuple(r) for r in await sql(url, COPIES)] == expected

            # A copy without the mark (written before 0019, or edited) is stale: copied again.
            await sql(region_urls["eu-west-1"], "UPDATE replica_keys SET imported = NULL")
            report = await rep_of(km).check(repair=False)
            assert statuses(report)["eu-west-1"] == "stale"
            assert statuses(await rep_of(km).check(repair=True))["eu-west-1"] == "in_sync"
            assert [tuple(r) for r in await sql(region_urls["eu-west-1"], COPIES)] == expected

        async with KeyManager(s, environ=wenv) as km, unreachable(proxies[PRIMARY]):
            await rep_of(km).promote("eu-west-1", by="ops@example")
        promoted = region_urls["eu-west-1"]
        assert [tuple(r) for r in await sql(promoted, MARKS)] == expected
        # The old primary's census stays behind: every adopted version gets `(unrecorded)`, and
        # the import its own location, so the new primary, too, keeps the key until an operator
        # says no unregistered table holds its values.
        locations = await sql(promoted, "SELECT dek_version, location FROM key_locations ORDER BY 1, 2")
        assert [tuple(r) for r in locations] == [
            (1, "(unrecorded)"),
            (2, "(second phase: anthropic v2)"),
            (2, "(unrecorded)"),
        ]
    finally:
        await cleanup_queue(wenv["KEYROTOR_QUEUE_NAME"])


async def test_a_copy_whose_mark_is_unknown_is_promoted_as_imported(
    renv: dict[str, str], region_urls: dict[str, str], proxies: dict[str, PgProxy]
) -> None:
    """With the primary down, a copy written before 0019 cannot say whether its DEK was imported:
    the promoted store takes it for imported (its proof then scans every table), the safe side."""
    wenv = _env(renv)
    s = Settings.from_env(wenv)
    try:
        async with KeyManager(s, environ=wenv) as km:
            await km.put_secret("anthropic", "prod", OLD)
            await settle(km)
        await sql(region_urls["ap-south-1"], "UPDATE replica_keys SET imported = NULL")
        async with KeyManager(s, environ=wenv) as km, unreachable(proxies[PRIMARY]):
            await rep_of(km).promote("ap-south-1", by="ops@example")
        promoted = region_urls["ap-south-1"]
        assert [tuple(r) for r in await sql(promoted, MARKS)] == [("anthropic", 1, True)]
        # Only a copy that says it was imported brings the import's location: an unknown one
        # costs the proof a scan, not the operator an acknowledgement of its own for every key
        # (the one `(unrecorded)` every adopted version gets covers all of them at once).
        locations = await sql(promoted, "SELECT dek_version, location FROM key_locations")
        assert [tuple(r) for r in locations] == [(1, "(unrecorded)")]
    finally:
        await cleanup_queue(wenv["KEYROTOR_QUEUE_NAME"])
