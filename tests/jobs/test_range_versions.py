"""A range passes only over the old versions its rows hold, however many the scope has."""

from __future__ import annotations

from typing import Any

import pytest

from keyrotor import KeyManager
from keyrotor.rotation import dek as rotation
from keyrotor.rotation import reencrypt
from keyrotor.rotation.context import RotationContext
from keyrotor.settings import Settings
from keyrotor.store import targets
from tests.jobs.conftest import settings_of
from tests.rotation_helpers import check_values, fetch, seed

SCOPE = "tenant-9/anthropic"


async def _rotate(s: Settings, *, plan_only: bool = False) -> Any:
    async with KeyManager(s) as km:
        rc = RotationContext(km.sessions, km.kek, s)
        progress = await rotation.rotate_dek(rc, SCOPE)
        if not plan_only:
            for r in progress.ranges:
                await rotation.reencrypt_range(rc, r.run_id, r.lo, r.hi, target=r.target)
        return progress


async def test_ranges_skip_versions_no_row_holds(
    wenv: dict[str, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    s = settings_of(
        wenv,
        KEYROTOR_SMALL_SCOPE_ROWS="100",
        KEYROTOR_REENCRYPT_RANGE_ROWS="200",
        KEYROTOR_REENCRYPT_BATCH_ROWS="50",
    ).model_copy(update={"listen_key_changes": False})
    values = await seed(s, SCOPE, 600)
    stale = await fetch(
        s.database_url, "SELECT name, ciphertext FROM secrets WHERE name < 'k000050' ORDER BY name"
    )
    await _rotate(s)
    await _rotate(s)  # every row on v3; v1 and v2 in grace
    # Values written by a process whose cache still held v1: 50 rows back on v1, none on v2.
    for name, ciphertext in stale:
        await fetch(
            s.database_url,
            "UPDATE secrets SET ciphertext = $2, dek_version = 1 WHERE name = $1",
            name,
            ciphertext,
        )
    assert await check_values(s, SCOPE, values) == {1: 50, 3: 550}

    passes: list[int] = []
    lock_batch = targets.lock_batch

    async def counting(apg: Any, target: Any, scope_id: int, version: int, **kw: Any) -> list[Any]:
        passes.append(version)
        return await lock_batch(apg, target, scope_id, version, **kw)

    monkeypatch.setattr(reencrypt, "lock_batch", counting)
    progress = await _rotate(s, plan_only=True)
    planned = await fetch(
        s.database_url,
        "SELECT lo, version FROM rotation_ranges WHERE run_id = $1 ORDER BY lo",
        progress.run.id,
    )
    # Each range starts on the oldest version its own rows hold.
    assert [r["version"] for r in planned] == [1, 3, 3]
    await _rotate(s)  # resumes the open run: its ranges, then completion
    assert await check_values(s, SCOPE, values) == {4: 600}
    assert 2 not in passes and set(passes) == {1, 3}
