"""A Vault KEK rotation whose first rotate request is carried out late, after the retry's fresh
read of the key's version and its own request: the transit key is rotated twice (transit takes
no idempotency token). Nothing stored may become unreadable, and the run's record must say what
it did.

The run's retry reads the key at v1, the version its first attempt recorded, and rotates it to
v2; the first attempt's request, held back until then, reaches OpenBao at one of the moments
below and makes v3:

- ``with_the_retry``: just after the retry's own request, before it reads the version it rotated to;
- ``between_batches``: after the first batch of DEKs was rewrapped under v2;
- ``after_the_audit_key``: after the audit key's rewrap, before the run checks the provider's
  version one last time;
- ``at_the_cutoff``: as the run starts the cut-off of old versions (``min_decryption_version``),
  after its last look at the provider: the run then ends on v2, and the cut-off must not reach
  past what is stored.

The provider is the real OpenBao transit key; only the moment the first request is carried out
is chosen by the test (it is sent by hvac, unchanged, when the test says so).
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from functools import partial
from typing import Any

import pytest
import requests

from keyrotor import KeyManager
from keyrotor.audit import key as audit_key
from keyrotor.audit.verify import verify_chain
from keyrotor.errors import KekUnavailable
from keyrotor.kek.base import WrapContext, WrappedDek
from keyrotor.kek.remote import open_remote_provider
from keyrotor.rotation import kek as kek_rotation
from keyrotor.rotation.context import RotationContext
from keyrotor.store import db
from tests.jobs.conftest import settings_of
from tests.kek.conftest import fast_policy
from tests.rotation_helpers import check_values, fetch, seed
from tests.servers import ServerProcess, bao_root, bao_server, vault_env

__all__ = ["bao_server"]  # the session's OpenBao dev server, a fixture

SCOPES = ("anthropic", "openai", "tenant-7/mistral", "tenant-9/groq")
AUDIT_SCOPE = "_keyrotor_audit_key:"
PROBE_SCOPE = "keyrotor/"
VAULT_VARS = ("VAULT_ADDR", "VAULT_TOKEN", "VAULT_TRANSIT_KEY", "KEYROTOR_KEK_READ_PROVIDERS")
LANDINGS = ("with_the_retry", "between_batches", "after_the_audit_key", "at_the_cutoff")


class LateRequest:
    """The first ``rotate_key`` request does not come back in time (the client sees a timeout);
    the very same request is carried out at the server when :meth:`land` is called."""

    def __init__(self, transit: Any) -> None:
        self.transit, self.send = transit, transit.rotate_key
        self.pending: Callable[[], Any] | None = None
        transit.rotate_key = self._times_out

    def _times_out(self, *args: Any, **kwargs: Any) -> Any:
        self.transit.rotate_key = self.send  # only the first request
        self.pending = partial(self.send, *args, **kwargs)
        raise requests.exceptions.ReadTimeout("no answer in time (test): the request may still land")

    def land_with_the_next_request(self) -> None:
        def then_land(*args: Any, **kwargs: Any) -> Any:
            self.transit.rotate_key = self.send
            answer = self.send(*args, **kwargs)
            self.land_now()
            return answer

        self.transit.rotate_key = then_land

    def land_now(self) -> None:
        if self.pending is not None:
            request, self.pending = self.pending, None
            request()

    async def land(self) -> None:
        await asyncio.to_thread(self.land_now)


class LandsAt:
    """The real provider; the late request lands at the chosen moment of the run's retry."""

    def __init__(self, inner: Any, late: LateRequest, at: str) -> None:
        self.inner, self.late, self.at = inner, late, at

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)

    async def rewrap(self, items: list[tuple[WrappedDek, WrapContext]]) -> list[WrappedDek]:
        fresh: list[WrappedDek] = await self.inner.rewrap(items)
        scopes = [ctx.scope for _, ctx in items]
        deks = not any(s.startswith((AUDIT_SCOPE, PROBE_SCOPE)) for s in scopes)
        if (self.at == "between_batches" and deks) or (
            self.at == "after_the_audit_key" and any(s.startswith(AUDIT_SCOPE) for s in scopes)
        ):
            await self.late.land()
        return fresh

    async def min_decryption_version(self) -> int:
        if self.at == "at_the_cutoff":
            await self.late.land()
        version: int = await self.inner.min_decryption_version()
        return version


def _use_env(monkeypatch: pytest.MonkeyPatch, env: dict[str, str]) -> None:
    # A KeyManager reads the remote provider's variables from os.environ.
    for name in VAULT_VARS:
        monkeypatch.delenv(name, raising=False)
        if name in env:
            monkeypatch.setenv(name, env[name])


@pytest.mark.parametrize("at", LANDINGS)
async def test_a_kek_rotated_twice_loses_nothing_and_the_run_says_so(
    at: str, wenv: dict[str, str], bao_server: ServerProcess, monkeypatch: pytest.MonkeyPatch
) -> None:
    penv = {"SECRETS_PROVIDER": "vault", **vault_env(bao_server)}
    _use_env(monkeypatch, penv)
    s = settings_of(wenv, **penv, KEYROTOR_KEK_REWRAP_BATCH="2")
    values = {scope: await seed(s, scope, 2) for scope in SCOPES}
    transit, name = bao_root(bao_server).secrets.transit, penv["VAULT_TRANSIT_KEY"]

    def key_versions() -> tuple[int, int]:
        data = transit.read_key(name)["data"]
        return int(data["latest_version"]), int(data["min_decryption_version"])

    engine = db.create_engine(s.database_url)
    policy = fast_policy(timeout_s=5.0, max_attempts=2, breaker_cooldown_s=0.2)
    real = await open_remote_provider("vault", penv, policy=policy)
    try:
        sessions = db.sessionmaker(engine)
        late = LateRequest(real._client.secrets.transit)  # type: ignore[attr-defined]
        with pytest.raises(KekUnavailable):  # the first attempt: its request does not answer
            await asyncio.wait_for(kek_rotation.rotate_kek(RotationContext(sessions, real, s)), 30)
        (run,) = await fetch(s.database_url, "SELECT id, to_version FROM rotations WHERE kind = 'kek'")
        assert run["to_version"] is None and key_versions() == (1, 1)
        await asyncio.sleep(0.3)  # the breaker's cool-down
        if at == "with_the_retry":
            late.land_with_the_next_request()
        rc = RotationContext(sessions, LandsAt(real, late, at), s)  # type: ignore[arg-type]
        result = await asyncio.wait_for(kek_rotation.rotate_kek(rc, run_id=run["id"]), 60)
        assert late.pending is None and key_versions()[0] == 3  # rotated twice

        # Nothing stored became unreadable: every value, in a fresh process; the audit key and
        # the chain it keys; no stored key below the cut-off.
        for scope, expected in values.items():
            await check_values(s, scope, expected)
        keys = await audit_key.load_keys(sessions, real)
        assert (await verify_chain(sessions, keys=keys)).ok
        stored = await fetch(
            s.database_url,
            "SELECT kek_version FROM data_keys WHERE state <> 'destroyed' "
            "UNION ALL SELECT kek_version FROM audit_keys",
        )
        versions = {r["kek_version"] for r in stored}
        assert key_versions()[1] <= min(versions)
        async with KeyManager(s.model_copy(update={"listen_key_changes": False})) as km:
            token = await km.encrypt("new-after-the-run", "sk-new")  # a DEK made under v3
            assert await km.decrypt("new-after-the-run", token) == "sk-new"

        # The run's record: completed, on the version every stored key is on, and no
        # older version left usable than it needs.
        assert result.run.state == "completed", result.run.error
        assert versions == {result.kek_version}
        assert key_versions()[1] == result.kek_version
        if at != "at_the_cutoff":  # it saw v3 before its cut-off: every key ends on the latest
            assert result.kek_version == 3
        # A target left because the key went past it is on the run's record.
        raised = result.run.detail.get(kek_rotation.TARGET_RAISED_FROM)
        assert raised == ([2] if at in ("between_batches", "after_the_audit_key") else None)
    finally:
        await real.aclose()
        await engine.dispose()
