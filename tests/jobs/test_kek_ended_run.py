"""An attempt of a KEK run that wakes after another attempt ended the run writes nothing to it.

arq runs a job twice when a worker stalls past its lease (a VM pause, a swap storm): the other
attempt completes the run, then the stalled one wakes, commits its batch, goes on and may fail.
Its progress, its outcome and its failure event must not land on the ended run. The stall is
the crash suite's pause point (``KEYROTOR_TEST_HANG_AT`` with ``KEYROTOR_TEST_HANG_RELEASE``),
here in-process: two attempts of the same migration run side by side, on real Postgres, the
local keyring and OpenBao.
"""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import pytest
from structlog.testing import capture_logs

from keyrotor.errors import KekError
from keyrotor.kek.factory import open_provider
from keyrotor.rotation import kek_migration
from keyrotor.rotation.hang import ENV, RELEASE_ENV
from keyrotor.store import db
from tests.jobs.conftest import settings_of
from tests.jobs.test_kek_providers import _use_env
from tests.rotation_helpers import fetch, seed
from tests.servers import ServerProcess, bao_server, vault_env

__all__ = ["bao_server"]

RUN_COLUMNS = "state, error, cursor, rows_done, rows_total, attempts, detail::text, finished_at, updated_at"


async def test_a_migration_attempt_waking_after_the_run_completed_writes_nothing_to_it(
    wenv: dict[str, str], bao_server: ServerProcess, monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    remote = vault_env(bao_server)
    _use_env(monkeypatch, remote)
    s = settings_of(wenv, KEYROTOR_METRICS_PORT="0")
    for i in range(7):
        await seed(s, f"scope-{i}", 1)
    engine = db.create_engine(s.database_url)
    source = await open_provider(s)
    target = await kek_migration.open_named_provider("vault", s, remote)
    try:
        sessions = db.sessionmaker(engine)
        async with db.transaction(sessions) as session:
            run, _ = await kek_migration.request_migration(session, "local", "vault")
        release = tmp_path / "release"
        monkeypatch.setenv(ENV, "rewrap_before_commit")
        monkeypatch.setenv(RELEASE_ENV, str(release))
        with capture_logs() as logs:
            stalled = asyncio.ensure_future(
                kek_migration.migrate_kek(sessions, source, target, run_id=run.id, batch_size=3)
            )
            deadline = time.monotonic() + 30
            while not any(e.get("event") == "test_hang" for e in logs):
                assert not stalled.done() and time.monotonic() < deadline
                await asyncio.sleep(0.02)
        monkeypatch.delenv(ENV)
        # Another attempt takes the job over and completes the run.
        other = await kek_migration.migrate_kek(sessions, source, target, run_id=run.id, batch_size=3)
        assert other.run.state == "completed" and other.remaining == 0
        (ended,) = await fetch(s.database_url, f"SELECT {RUN_COLUMNS} FROM rotations WHERE id = $1", run.id)
        # A DEK the stalled attempt's source cannot open (an operator's mistake, a bad restore):
        # what makes it fail once it wakes and goes on past its batch.
        await fetch(
            s.database_url,
            "UPDATE data_keys SET kek_id = 'local:broken', kek_version = 1 "
            "WHERE id = (SELECT max(id) FROM data_keys)",
        )
        release.touch()
        with pytest.raises(KekError):
            await asyncio.wait_for(stalled, 30)
    finally:
        await target.aclose()
        await source.aclose()
        await engine.dispose()
    (after,) = await fetch(s.database_url, f"SELECT {RUN_COLUMNS} FROM rotations WHERE id = $1", run.id)
    assert dict(after) == dict(ended)  # neither its counters nor its outcome moved
    failures = await fetch(
        s.database_url,
        "SELECT count(*) FROM encryption_audit_log WHERE NOT success AND (metadata->>'run_id')::bigint = $1",
        run.id,
    )
    assert failures[0][0] == 0
