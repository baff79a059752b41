"""The audit event of a KEK cut-off (Vault transit's ``min_decryption_version`` raised by a KEK
rotation) survives a crash between the provider's change and the event's commit."""

from __future__ import annotations

import json
from typing import Any

import pytest

from keyrotor.kek.base import RetiresKekVersions, provider_layers
from keyrotor.kek.factory import open_provider
from keyrotor.rotation import kek as kek_rotation
from keyrotor.rotation.context import RotationContext
from keyrotor.store import db
from tests.jobs.conftest import settings_of
from tests.jobs.test_kek_providers import _provider_env, _use_env
from tests.rotation_helpers import fetch, seed
from tests.servers import ServerProcess, bao_root, bao_server

__all__ = ["bao_server"]


class Crash(Exception):
    """The worker dies right after the provider answered (SIGKILL, OOM, a lost host)."""


async def test_a_crash_after_the_kek_cutoff_does_not_lose_its_audit_event(
    wenv: dict[str, str], bao_server: ServerProcess, monkeypatch: pytest.MonkeyPatch
) -> None:
    penv = _provider_env("vault", None, bao_server)
    _use_env(monkeypatch, penv)
    s = settings_of({**wenv, "KEYROTOR_METRICS_PORT": "0"}, **penv)
    transit = bao_root(bao_server).secrets.transit
    key = penv["VAULT_TRANSIT_KEY"]
    await seed(s, "anthropic", 3)  # DEKs on KEK v1

    engine = db.create_engine(s.database_url)
    kek = await open_provider(s, penv)
    try:
        rc = RotationContext(db.sessionmaker(engine), kek, s)
        vault: Any = next(p for p in provider_layers(kek) if isinstance(p, RetiresKekVersions))
        real = vault.raise_min_decryption_version

        async def changed_then_crashed(version: int) -> int | None:
            await real(version)
            raise Crash

        monkeypatch.setattr(vault, "raise_min_decryption_version", changed_then_crashed)
        with pytest.raises(Crash):
            await kek_rotation.rotate_kek(rc)
        # The provider refuses v1 from now on: a change nobody has recorded yet.
        assert int(transit.read_key(key)["data"]["min_decryption_version"]) == 2
        monkeypatch.setattr(vault, "raise_min_decryption_version", real)
        (run,) = await fetch(s.database_url, "SELECT id FROM rotations WHERE kind = 'kek'")

        # The job runs again (arq's retry, or another worker resuming the open run).
        result = await kek_rotation.rotate_kek(rc, run_id=run["id"])
        assert result.run.state == "completed"
    finally:
        await kek.aclose()
        await engine.dispose()
    events = await fetch(
        s.database_url,
        "SELECT metadata::text AS m FROM encryption_audit_log WHERE event_type = 'config_change' "
        "AND metadata->>'what' = 'kek_min_decryption_version'",
    )
    assert [json.loads(e["m"]) for e in events] == [
        {
            "what": "kek_min_decryption_version",
            "kek_id": vault.kek_id,
            "before": 1,
            "after": 2,
            "run_id": run["id"],
        }
    ]
