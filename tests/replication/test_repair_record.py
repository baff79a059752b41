"""A replica check's repairs are written in the regions' databases before its ``replica_check``
audit event commits in the primary's: a check that dies in between must not lose the record of
the repairs it made. The next check records them, exactly once (docs/replication.md)."""

from __future__ import annotations

import json
from typing import Any

import pytest

from keyrotor import KeyManager
from keyrotor.replication import check as check_module
from tests.replication.conftest import rep_of, settle, sql, statuses


class Crash(Exception):
    """The process dies after the repair committed, before its audit event did."""


async def _events(url: str) -> list[dict[str, Any]]:
    rows = await sql(
        url,
        "SELECT metadata::text AS m FROM encryption_audit_log WHERE event_type = 'replica_check' "
        "AND metadata->>'region' = 'eu-west-1' ORDER BY id",
    )
    return [json.loads(r["m"]) for r in rows]


async def test_a_check_that_dies_after_its_repair_is_recorded_by_the_next_exactly_once(
    rkm: KeyManager, renv: dict[str, str], region_urls: dict[str, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    for scope in ("anthropic", "openai", "mistral"):
        await rkm.encrypt(scope, "sk-repair-record-value", context="c")
    await settle(rkm)
    primary = renv["DATABASE_URL"]
    before = await _events(primary)
    await sql(region_urls["eu-west-1"], "DELETE FROM replica_keys")

    async def crash(*_: Any, **__: Any) -> None:
        raise Crash

    monkeypatch.setattr(check_module, "write_event", crash)
    with pytest.raises(Crash):
        await rep_of(rkm).check(repair=True)
    monkeypatch.undo()
    # The copies were written; nothing recorded them.
    assert (await sql(region_urls["eu-west-1"], "SELECT count(*) FROM replica_keys"))[0][0] == 3
    assert await _events(primary) == before

    # The check runs again (the next hour's, or arq's retry): it finds the region in sync, and
    # records the repair the dead one made, once.
    for _ in range(2):
        report = await rep_of(rkm).check(repair=True)
        assert statuses(report)["eu-west-1"] == "in_sync"
    interrupted = [e for e in (await _events(primary))[len(before) :] if e["repaired"]]
    assert len(interrupted) == 1
    assert interrupted[0]["status"] == "interrupted" and interrupted[0]["repaired"] == 3
