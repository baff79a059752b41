"""The remote KEK providers end to end: DEK and KEK rotation through the worker, provider
migration local -> aws -> vault -> local, the wrong-provider error, and an outage mid-rewrap.

Real moto and OpenBao servers (tests/servers.py), real Postgres and Redis.
"""

from __future__ import annotations

import asyncio
import json
import os
import threading
from pathlib import Path
from typing import Any, cast

import pytest
from sqlalchemy import text as db_text

from keyrotor import KeyManager, Settings
from keyrotor.errors import KekError, KekUnavailable
from keyrotor.kek.base import ForeignKek, WrapContext, WrappedDek
from keyrotor.kek.factory import open_provider
from keyrotor.queue.client import KeyrotorClient
from tests.jobs.conftest import settings_of
from tests.rotation_helpers import WorkerProcess, check_values, fetch, keyrotor, run_burst_worker, seed
from tests.servers import (
    ServerProcess,
    aws_client,
    aws_env,
    bao_root,
    bao_server,
    create_kek_secret,
    create_kms_key,
    dead_endpoint,
    moto_server,
    spawn_server,
    vault_env,
)

__all__ = ["bao_server", "moto_server", "spawn_server"]

SCOPES = ("anthropic", "tenant-7/openai")


@pytest.fixture
def wenv(wenv: dict[str, str]) -> dict[str, str]:
    """The jobs' env, without the workers' metrics listener (a fixed port other suites use)."""
    return {**wenv, "KEYROTOR_METRICS_PORT": "0"}


def _provider_env(kind: str, moto: ServerProcess | None, bao: ServerProcess | None) -> dict[str, str]:
    if kind == "aws-kms":
        assert moto is not None
        return {"SECRETS_PROVIDER": "aws", **aws_env(moto, AWS_KMS_KEY_ID=create_kms_key(moto))}
    if kind == "aws-sm":
        assert moto is not None
        return {"SECRETS_PROVIDER": "aws", **aws_env(moto, AWS_SECRET_ID=create_kek_secret(moto))}
    assert bao is not None
    return {"SECRETS_PROVIDER": "vault", **vault_env(bao)}


def _use_env(monkeypatch: pytest.MonkeyPatch, env: dict[str, str]) -> None:
    # KeyManager and the worker read the remote providers' variables from os.environ.
    for name in (
        "AWS_KMS_KEY_ID",
        "AWS_SECRET_ID",
        "VAULT_ADDR",
        "VAULT_TOKEN",
        "VAULT_TRANSIT_KEY",
        "KEYROTOR_KEK_READ_PROVIDERS",
    ):
        monkeypatch.delenv(name, raising=False)
    for name, value in env.items():
        monkeypatch.setenv(name, value)


def _doc(value: Any) -> Any:
    """A json/jsonb column as asyncpg returns it (text without a codec)."""
    return json.loads(value) if isinstance(value, str) else value


async def _seed_all(s: Settings, n: int) -> dict[str, dict[str, str]]:
    return {scope: await seed(s, scope, n) for scope in SCOPES}


async def _check_all(s: Settings, values: dict[str, dict[str, str]]) -> None:
    for scope, expected in values.items():
        await check_values(s, scope, expected)


async def _deks(s: Settings) -> list[Any]:
    return await fetch(
        s.database_url,
        "SELECT d.id, k.name, d.version, d.kek_id, d.kek_version, d.encrypted_dek, d.state "
        "FROM data_keys d JOIN key_scopes k ON k.id = d.scope_id WHERE d.state <> 'destroyed' ORDER BY d.id",
    )


@pytest.mark.parametrize("kind", ["aws-kms", "aws-sm", "vault"])
async def test_dek_rotation_through_the_worker(
    kind: str, wenv: dict[str, str], request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch
) -> None:
    moto = request.getfixturevalue("moto_server") if kind.startswith("aws") else None
    bao = request.getfixturevalue("bao_server") if kind == "vault" else None
    penv = _provider_env(kind, moto, bao)
    _use_env(monkeypatch, penv)
    s = settings_of(wenv, **penv)
    values = await _seed_all(s, 30)
    async with KeyrotorClient(s) as client:
        handles = [await client.rotate(scope) for scope in SCOPES]
        await run_burst_worker(s)
        for handle in handles:
            run = await handle.result(timeout_s=10)
            assert run.state == "completed"
    for scope in SCOPES:
        assert await check_values(s, scope, values[scope]) == {2: 30}
    deks = await _deks(s)
    assert {d["version"] for d in deks} == {1, 2}
    prefix = {"aws-kms": "arn:", "aws-sm": "aws-sm:", "vault": "vault:"}[kind]
    assert all(d["kek_id"].startswith(prefix) for d in deks)


@pytest.mark.parametrize("kind", ["aws-kms", "aws-sm", "vault"])
async def test_kek_rotation_through_the_worker(
    kind: str, wenv: dict[str, str], request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch
) -> None:
    moto = request.getfixturevalue("moto_server") if kind.startswith("aws") else None
    bao = request.getfixturevalue("bao_server") if kind == "vault" else None
    penv = _provider_env(kind, moto, bao)
    _use_env(monkeypatch, penv)
    s = settings_of(wenv, **penv)
    values = await _seed_all(s, 10)
    before = await _deks(s)
    assert {d["kek_version"] for d in before} == {1}

    async with KeyrotorClient(s) as client:
        handle = await client.rotate_kek()
        await run_burst_worker(s)
        run = await handle.result(timeout_s=30)
    assert run.state == "completed" and run.to_version == 2 and run.rows_done == len(before)
    after = await _deks(s)
    assert {d["kek_version"] for d in after} == {2}
    if kind != "aws-kms":  # moto keeps one key material: its ciphertexts need not change
        assert all(a["encrypted_dek"] != b["encrypted_dek"] for a, b in zip(after, before, strict=True))
    await _check_all(s, values)

    old = before[0]
    old_wrapped = WrappedDek(old["kek_id"], old["kek_version"], bytes(old["encrypted_dek"]))
    async with await _opened(penv, s) as kek:
        if kind == "vault":
            # Every DEK is on v2, so the run cut v1 off (transit's min_decryption_version) ...
            assert bao is not None
            key = bao_root(bao).secrets.transit.read_key(penv["VAULT_TRANSIT_KEY"])["data"]
            assert (key["latest_version"], key["min_decryption_version"]) == (2, 2)
            with pytest.raises(KekError, match="does not unwrap"):
                await kek.unwrap(old_wrapped, WrapContext(old["name"], old["version"]))
            row = (await fetch(s.database_url, "SELECT detail FROM rotations WHERE id = $1", run.id))[0]
            assert _doc(row["detail"])["kek_min_decryption_version"] == 2
            changes = await fetch(
                s.database_url,
                "SELECT metadata FROM encryption_audit_log WHERE event_type = 'config_change' "
                "AND metadata->>'what' = 'kek_min_decryption_version'",
            )
            assert [_doc(c["metadata"])["after"] for c in changes] == [2]
        else:
            # KMS and Secrets Manager keep the old version: a DEK wrapped before still unwraps.
            assert len(await kek.unwrap(old_wrapped, WrapContext(old["name"], old["version"]))) == 32
    audit = await fetch(
        s.database_url, "SELECT metadata FROM encryption_audit_log WHERE event_type = 'rewrap' AND success"
    )
    assert len(audit) == len(before)


class _opened:
    """``async with await _opened(env, settings) as kek`` (the provider of ``env``)."""

    def __init__(self, env: dict[str, str], s: Settings) -> None:
        self.env, self.s = env, s

    def __await__(self) -> Any:
        async def go() -> _opened:
            self.kek = await open_provider(self.s, self.env)
            return self

        return go().__await__()

    async def __aenter__(self) -> Any:
        return self.kek

    async def __aexit__(self, *exc: object) -> None:
        await self.kek.aclose()


def _cli_env(wenv: dict[str, str], provider: str, remote: dict[str, str]) -> dict[str, str]:
    return {**wenv, **remote, "SECRETS_PROVIDER": provider, "KEYROTOR_METRICS_PORT": "0"}


async def test_migration_local_aws_vault_local(
    wenv: dict[str, str],
    moto_server: ServerProcess,
    bao_server: ServerProcess,
    monkeypatch: pytest.MonkeyPatch,
    tmp_path: Path,
) -> None:
    remote = {**aws_env(moto_server, AWS_KMS_KEY_ID=create_kms_key(moto_server)), **vault_env(bao_server)}
    _use_env(monkeypatch, remote)
    local = settings_of(wenv)
    values = await _seed_all(local, 8)
    async with KeyrotorClient(local) as client:  # two DEK versions of one scope
        handle = await client.rotate(SCOPES[0])
        await run_burst_worker(local)
        await handle.result(timeout_s=10)
    n_deks = len(await _deks(local))
    assert n_deks == 3

    names = {"local": "local", "aws": "aws-kms", "vault": "vault"}
    hops = [("local", "aws", "--inline"), ("aws", "vault", "--wait"), ("vault", "local", "--inline")]
    for hop, (src, dst, how) in enumerate(hops):
        env = _cli_env(wenv, src, remote)
        if how == "--wait":  # through the queue: `keyrotor worker`, configured like the CLI, drives it
            worker = WorkerProcess(env, tmp_path / f"worker-{hop}.log")
            try:
                await worker.wait_started()
                r = keyrotor("kek", "migrate", "--to", dst, "--wait", "--json", env=env)
            finally:
                worker.terminate()
                worker.close()
        else:
            r = keyrotor("kek", "migrate", "--to", dst, how, "--json", env=env)
        assert r.returncode == 0, r.stderr
        doc = json.loads(r.stdout)
        assert doc["state"] == "completed" and doc["kind"] == "kek_migrate", doc
        assert f"SECRETS_PROVIDER={dst}" in doc["next_step"]
        assert doc["rows_done"] == n_deks

        st = keyrotor("kek", "status", "--json", env=_cli_env(wenv, dst, remote))
        assert st.returncode == 0, st.stderr
        status = json.loads(st.stdout)
        assert status["provider"] == names[dst] and status["check"]["ok"]
        assert status["deks_on_other_providers"] == 0
        assert [c["provider"] for c in status["deks"]] == [names[dst]]
        assert sum(c["deks"] for c in status["deks"]) == n_deks

        # A process on the new provider reads everything.
        _use_env(monkeypatch, {**remote, "SECRETS_PROVIDER": dst})
        await _check_all(settings_of(wenv, SECRETS_PROVIDER=dst), values)

        # A fresh process still on the old provider gets the clear error naming both (when it
        # opens: the audit chain's key moved with the DEKs) ...
        _use_env(monkeypatch, {**remote, "SECRETS_PROVIDER": src})
        with pytest.raises(
            ForeignKek, match=f"wrapped by the {names[dst]} KEK provider.*configured with {names[src]}"
        ):
            async with KeyManager(
                settings_of(wenv, SECRETS_PROVIDER=src, KEYROTOR_LISTEN_KEY_CHANGES="0")
            ) as km:
                await km.get_secret(SCOPES[1], "k000000")
        # ... unless it may read the new provider's DEKs (the switch-over setting).
        _use_env(monkeypatch, {**remote, "SECRETS_PROVIDER": src, "KEYROTOR_KEK_READ_PROVIDERS": dst})
        await _check_all(settings_of(wenv, SECRETS_PROVIDER=src, KEYROTOR_KEK_READ_PROVIDERS=dst), values)

        audit = await fetch(
            local.database_url,
            "SELECT scope, key_version, metadata FROM encryption_audit_log "
            "WHERE event_type = 'rewrap' AND success AND metadata->>'migration' = 'true' "
            "AND metadata->>'to_provider' = $1",
            names[dst],
        )
        assert len(audit) == n_deks, hop
        meta = (
            json.loads(audit[0]["metadata"])
            if isinstance(audit[0]["metadata"], str)
            else audit[0]["metadata"]
        )
        assert meta["from_provider"] == names[src]


class _PauseOnRewrap:
    """The real provider, whose server is paused (SIGSTOP: requests time out) at the n-th rewrap."""

    def __init__(self, inner: Any, server: ServerProcess, at_call: int) -> None:
        self.inner, self.server, self.at_call, self.calls = inner, server, at_call, 0

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)

    async def rewrap(self, items: Any) -> Any:
        self.calls += 1
        if self.calls == self.at_call:
            self.server.pause()
        return await self.inner.rewrap(items)


async def test_provider_down_during_rotate_kek(
    wenv: dict[str, str], spawn_server: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    from keyrotor.jobs.common import is_transient
    from keyrotor.kek.remote import open_remote_provider
    from keyrotor.rotation import kek as kek_rotation
    from keyrotor.rotation.context import RotationContext
    from keyrotor.store import db
    from tests.kek.conftest import fast_policy

    moto: ServerProcess = spawn_server("moto")
    penv = _provider_env("aws-kms", moto, None)
    _use_env(monkeypatch, penv)
    s = settings_of(wenv, **penv, KEYROTOR_KEK_REWRAP_BATCH="4")
    values = await _seed_all(s, 3)
    for i in range(10):  # more DEKs, so the run has several batches
        values[f"extra-{i}"] = await seed(s, f"extra-{i}", 1)
    before = {d["id"]: d for d in await _deks(s)}

    engine = db.create_engine(s.database_url)
    real = await open_remote_provider("aws", penv, policy=fast_policy(timeout_s=0.5, max_attempts=2))
    try:
        # Rewrap calls: 1 the pre-flight probe, 2 the first batch of 4, 3 the second (paused).
        rc = RotationContext(db.sessionmaker(engine), _PauseOnRewrap(real, moto, at_call=3), s)
        with pytest.raises(KekUnavailable) as caught:
            await kek_rotation.rotate_kek(rc)
        assert is_transient(caught.value)  # the job retries it with backoff
        moto.resume()
        await asyncio.sleep(1.1)  # the provider's circuit breaker cools down (fast_policy: 1 s)
        run = (await fetch(s.database_url, "SELECT * FROM rotations WHERE kind = 'kek'"))[0]
        assert run["state"] == "running" and run["rows_done"] == 4 and run["to_version"] == 2
        # Nothing half-written: each DEK is either rewrapped (v2) or untouched, and every one unwraps.
        after = await _deks(s)
        moved = [d for d in after if d["kek_version"] == 2]
        assert len(moved) == 4
        for d in after:
            if d["kek_version"] == 1:
                assert bytes(d["encrypted_dek"]) == bytes(before[d["id"]]["encrypted_dek"])
            await real.unwrap(
                WrappedDek(d["kek_id"], d["kek_version"], bytes(d["encrypted_dek"])),
                WrapContext(d["name"], d["version"]),
            )
        # The retry resumes after the cursor and completes; every value is intact.
        result = await kek_rotation.rotate_kek(RotationContext(rc.sessions, real, s), run_id=run["id"])
        assert result.run.state == "completed" and result.run.rows_done == len(before)
        assert {d["kek_version"] for d in await _deks(s)} == {2}
        await _check_all(s, values)
    finally:
        await real.aclose()
        await engine.dispose()


async def test_migrate_refuses_bad_targets_and_a_concurrent_kek_rotation(wenv: dict[str, str]) -> None:
    from keyrotor.errors import Conflict
    from keyrotor.rotation.kek_migration import request_migration
    from keyrotor.store import db

    env = {**wenv, "AWS_SECRETS_REGION": "us-east-1"}
    r = keyrotor("kek", "migrate", "--to", "aws", env=env)
    assert r.returncode == 2 and "AWS_KMS_KEY_ID is not set" in r.stderr, r.stderr
    r = keyrotor("kek", "migrate", "--to", "gcp", env=env)
    assert r.returncode == 2 and "unknown KEK provider 'gcp'" in r.stderr, r.stderr

    s = settings_of(wenv)
    await seed(s, "anthropic", 1)
    async with KeyrotorClient(s) as client:
        await client.rotate_kek()
        async with db.transaction(client.sessions) as session:
            with pytest.raises(Conflict, match=r"a KEK rotation .* is open"):
                await request_migration(session, "local", "vault")
        async with db.transaction(client.sessions) as session:
            await session.execute(db_text("UPDATE rotations SET state = 'completed'"))
        async with db.transaction(client.sessions) as session:
            run, created = await request_migration(session, "local", "vault")
        assert created and run.kind == "kek_migrate"
        with pytest.raises(Conflict, match=r"a KEK provider migration .* is open"):
            await client.rotate_kek()

    # kek status during an outage: exit 1, the check's error, and still the DEKs per KEK.
    dead = {
        **wenv,
        "SECRETS_PROVIDER": "aws",
        "AWS_ENDPOINT_URL": dead_endpoint(),
        "AWS_KMS_KEY_ID": "alias/x",
    }
    creds = {"AWS_SECRETS_REGION": "us-east-1", "AWS_ACCESS_KEY_ID": "x", "AWS_SECRET_ACCESS_KEY": "x"}
    st = keyrotor("kek", "status", "--json", env={**dead, **creds})
    assert st.returncode == 1, st.stderr
    doc = json.loads(st.stdout)
    assert not doc["check"]["ok"] and "KekUnavailable" in doc["check"]["error"]
    assert doc["deks"][0]["provider"] == "local" and doc["deks_on_other_providers"] == 1


class _FailingWrap:
    """The real target provider, unavailable from its n-th wrap on (a fake outage)."""

    def __init__(self, inner: Any, at_call: int) -> None:
        self.inner, self.at_call, self.calls = inner, at_call, 0

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)

    async def wrap(self, dek: bytes, context: WrapContext) -> WrappedDek:
        self.calls += 1
        if self.calls >= self.at_call:
            raise KekUnavailable("vault encrypt: cannot reach the server (test outage)")
        return await self.inner.wrap(dek, context)


async def test_migration_resumes_after_an_outage(
    wenv: dict[str, str], bao_server: ServerProcess, monkeypatch: pytest.MonkeyPatch
) -> None:
    from keyrotor.kek.routing import RoutingKek
    from keyrotor.rotation import kek_migration
    from keyrotor.store import db

    remote = vault_env(bao_server)
    _use_env(monkeypatch, remote)
    s = settings_of(wenv, KEYROTOR_KEK_REWRAP_BATCH="3")
    values = {f"scope-{i}": await seed(s, f"scope-{i}", 2) for i in range(8)}
    engine = db.create_engine(s.database_url)
    source = await open_provider(s)
    target = await kek_migration.open_named_provider("vault", s, remote)
    try:
        sessions = db.sessionmaker(engine)
        async with db.transaction(sessions) as session:
            run, _ = await kek_migration.request_migration(session, "local", "vault")
        # probe wrap (1) + first batch of 3 (2-4) succeed; the second batch meets the outage
        with pytest.raises(KekUnavailable):
            await kek_migration.migrate_kek(
                sessions,
                source,
                _FailingWrap(target, at_call=6),
                run_id=run.id,
                batch_size=3,
            )
        row = (await fetch(s.database_url, "SELECT * FROM rotations WHERE id = $1", run.id))[0]
        assert row["state"] == "running" and row["rows_done"] == 3 and row["cursor"] > 0
        deks = await _deks(s)
        assert sorted(d["kek_id"].split(":")[0] for d in deks) == ["local"] * 5 + ["vault"] * 3
        # Mid-migration, a process that may read both providers reads everything.
        both = RoutingKek(source, {"vault": target})
        for d in deks:
            await both.unwrap(
                WrappedDek(d["kek_id"], d["kek_version"], bytes(d["encrypted_dek"])),
                WrapContext(d["name"], d["version"]),
            )
        result = await kek_migration.migrate_kek(sessions, source, target, run_id=run.id, batch_size=3)
        assert result.run.state == "completed" and result.remaining == 0
        assert result.run.rows_done == 8 and result.run.attempts == 2
        assert {d["kek_id"] for d in await _deks(s)} == {result.target_kek_id}
        _use_env(monkeypatch, {**remote, "SECRETS_PROVIDER": "vault"})
        await _check_all(settings_of(wenv, SECRETS_PROVIDER="vault"), values)
    finally:
        await target.aclose()
        await source.aclose()
        await engine.dispose()


async def test_vault_old_versions_are_cut_off_only_once_no_dek_needs_them(
    wenv: dict[str, str], bao_server: ServerProcess, monkeypatch: pytest.MonkeyPatch
) -> None:
    from keyrotor.rotation import kek as kek_rotation
    from keyrotor.rotation.context import RotationContext
    from keyrotor.rotation.kek_migration import kek_status
    from keyrotor.store import db

    penv = _provider_env("vault", None, bao_server)
    _use_env(monkeypatch, penv)
    s = settings_of(wenv, **penv)
    transit = bao_root(bao_server).secrets.transit
    key = penv["VAULT_TRANSIT_KEY"]

    def versions() -> tuple[int, int]:
        data = transit.read_key(key)["data"]
        return int(data["latest_version"]), int(data["min_decryption_version"])

    values = {"anthropic": await seed(s, "anthropic", 3)}
    transit.rotate_key(key)  # rotated elsewhere: new DEKs get v2, the old ones stay on v1
    values["tenant-7/openai"] = await seed(s, "tenant-7/openai", 3)
    assert {d["kek_version"] for d in await _deks(s)} == {1, 2}

    engine = db.create_engine(s.database_url)
    kek = await open_provider(s, penv)
    try:
        rc = RotationContext(db.sessionmaker(engine), kek, s)
        # A DEK still on v1: nothing may be cut off.
        assert await kek_rotation._retire_old_versions(rc) is None
        assert versions() == (2, 1)
        await _check_all(s, values)

        # The rotation moves every DEK to v3, then cuts v1 and v2 off.
        result = await kek_rotation.rotate_kek(rc)
        assert result.run.state == "completed" and result.kek_version == 3
        assert versions() == (3, 3)
        assert {d["kek_version"] for d in await _deks(s)} == {3}
        await _check_all(s, values)
        # Running it again changes nothing (the minimum never goes down by itself).
        assert await kek_rotation._retire_old_versions(rc) is None
        assert versions() == (3, 3)
        status = await kek_status(rc.sessions, kek)
        assert (status["current_kek_version"], status["min_decryption_version"]) == (3, 3)
        assert status["kek_versions_in_use"] == [3] and status["check"]["ok"]
    finally:
        await kek.aclose()
        await engine.dispose()


async def test_a_dek_wrapped_while_a_kek_rotation_cuts_old_versions_off_still_opens(
    wenv: dict[str, str], bao_server: ServerProcess, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A new scope's DEK is wrapped under KEK v1; before it is stored, a whole KEK rotation runs:
    # v2, every stored DEK rewrapped, and the cut-off (transit's min_decryption_version) raised to
    # the lowest version in use. The new DEK must be counted by that cut-off (or wrapped after
    # it), never stored under a version the provider no longer opens.
    from keyrotor.kek.base import KekProvider
    from keyrotor.rotation import kek as kek_rotation
    from keyrotor.rotation.context import RotationContext
    from keyrotor.scopes import create_scope
    from keyrotor.store import db

    penv = _provider_env("vault", None, bao_server)
    _use_env(monkeypatch, penv)
    s = settings_of(wenv, **penv)
    values = {"anthropic": await seed(s, "anthropic", 3)}
    engine = db.create_engine(s.database_url)
    kek = await open_provider(s, penv)
    wrapped, go = asyncio.Event(), asyncio.Event()

    class HeldAfterWrapping:
        """The real provider, whose wrap answers only when the test says so."""

        async def wrap(self, dek: bytes, context: WrapContext) -> WrappedDek:
            result = await kek.wrap(dek, context)
            wrapped.set()
            await go.wait()
            return result

    try:
        sessions = db.sessionmaker(engine)
        held = cast(KekProvider, HeldAfterWrapping())
        creating = asyncio.create_task(create_scope(sessions, held, s, "late"))
        await asyncio.wait_for(wrapped.wait(), 30)
        rotating = asyncio.create_task(kek_rotation.rotate_kek(RotationContext(sessions, kek, s)))
        await asyncio.wait({rotating}, timeout=5)  # it may finish meanwhile, or wait for the creation
        go.set()
        await asyncio.wait_for(creating, 30)
        assert (await asyncio.wait_for(rotating, 60)).run.state == "completed"
        async with KeyManager(s) as km:  # a fresh process: the stored DEK must unwrap
            token = await km.encrypt("late", "sk-late")
            assert await km.decrypt("late", token) == "sk-late"
        await _check_all(s, values)
    finally:
        go.set()
        await kek.aclose()
        await engine.dispose()


async def test_half_working_vault_does_not_rotate(
    wenv: dict[str, str], bao_server: ServerProcess, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A token that may decrypt and rotate, but not encrypt or rewrap: the run fails before the
    key is rotated, with an error naming the provider and the cause; nothing is written."""
    from keyrotor.kek.remote import open_remote_provider
    from keyrotor.rotation import kek as kek_rotation
    from keyrotor.rotation.context import RotationContext
    from keyrotor.store import db
    from tests.kek.conftest import fast_policy

    penv = _provider_env("vault", None, bao_server)
    _use_env(monkeypatch, penv)
    s = settings_of(wenv, **penv)
    values = await _seed_all(s, 4)
    before = await _deks(s)

    root = bao_root(bao_server)
    policy = f"decrypt-only-{penv['VAULT_TRANSIT_KEY']}"
    root.sys.create_or_update_policy(
        policy,
        'path "transit/keys/*" { capabilities = ["read", "update"] }\n'
        'path "transit/decrypt/*" { capabilities = ["update"] }\n',
    )
    token = root.auth.token.create(policies=[policy], ttl="10m")["auth"]["client_token"]
    half = await open_remote_provider("vault", {**penv, "VAULT_TOKEN": token}, policy=fast_policy())
    engine = db.create_engine(s.database_url)
    try:
        rc = RotationContext(db.sessionmaker(engine), half, s)
        assert await rc.check_kek() == 1  # it does unwrap the stored DEKs ...
        with pytest.raises(KekError, match=r"vault: refusing to rotate the KEK.*permission") as caught:
            await kek_rotation.rotate_kek(rc)  # ... but may not wrap: no rotation
        assert token not in str(caught.value)
    finally:
        await half.aclose()
        await engine.dispose()
    key = root.secrets.transit.read_key(penv["VAULT_TRANSIT_KEY"])["data"]
    assert key["latest_version"] == 1
    sql = "SELECT state, error, to_version FROM rotations WHERE kind = 'kek'"
    run = (await fetch(s.database_url, sql))[0]
    assert run["state"] == "failed" and run["to_version"] is None and "vault" in run["error"]
    assert await _deks(s) == before
    await _check_all(s, values)


@pytest.mark.parametrize("kind", ["aws-kms", "vault"])
async def test_the_provider_is_called_on_a_cache_miss_only_and_measured(
    kind: str, wenv: dict[str, str], request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch
) -> None:
    from prometheus_client import REGISTRY

    moto = request.getfixturevalue("moto_server") if kind == "aws-kms" else None
    bao = request.getfixturevalue("bao_server") if kind == "vault" else None
    penv = _provider_env(kind, moto, bao)
    _use_env(monkeypatch, penv)
    s = settings_of(wenv, **penv, KEYROTOR_LISTEN_KEY_CHANGES="0")
    labels = {"provider": kind, "operation": "decrypt", "outcome": "ok"}

    def decrypts() -> tuple[float, float]:
        def value(name: str) -> float:
            return REGISTRY.get_sample_value(name, labels) or 0.0

        return value("keyrotor_kek_calls_total"), value("keyrotor_kek_call_duration_seconds_count")

    async with KeyManager(s) as km:
        token = await km.encrypt("anthropic", "sk-ant-api03-cache-test", context="users.api_key:1")
        km.invalidate()
        calls0, timed0 = decrypts()
        for _ in range(5):  # one miss, then hits
            assert (
                await km.decrypt("anthropic", token, context="users.api_key:1") == "sk-ant-api03-cache-test"
            )
        assert decrypts() == (calls0 + 1, timed0 + 1)
        km.invalidate()
        await km.decrypt("anthropic", token, context="users.api_key:1")
        assert decrypts() == (calls0 + 2, timed0 + 2)


async def test_throttling_storm_stops_rotate_kek_before_it_rotates(
    wenv: dict[str, str], bao_server: ServerProcess, monkeypatch: pytest.MonkeyPatch
) -> None:
    """An OpenBao rate-limit quota on the key's encrypt path (1 request per 10 s, used up): the
    pre-flight wrap is throttled through its retries, rotate_kek raises a transient error (the
    job retries it) with the key not rotated and no DEK touched, and it completes once the storm
    is over."""
    from keyrotor.jobs.common import is_transient
    from keyrotor.kek.remote import open_remote_provider
    from keyrotor.kek.resilience import Throttled
    from keyrotor.rotation import kek as kek_rotation
    from keyrotor.rotation.context import RotationContext
    from keyrotor.store import db
    from tests.kek.conftest import fast_policy

    penv = _provider_env("vault", None, bao_server)
    _use_env(monkeypatch, penv)
    s = settings_of(wenv, **penv)
    values = await _seed_all(s, 3)
    before = await _deks(s)
    root = bao_root(bao_server)
    key = penv["VAULT_TRANSIT_KEY"]
    quota = f"rotate-storm-{key}"
    kek = await open_remote_provider("vault", penv, policy=fast_policy(breaker_threshold=20))
    engine = db.create_engine(s.database_url)
    try:
        rc = RotationContext(db.sessionmaker(engine), kek, s)
        root.sys.create_or_update_quota(quota, rate=1, path=f"transit/encrypt/{key}", interval="10s")
        await kek.wrap(os.urandom(32), WrapContext("storm", 1))  # the one request the quota allows
        with pytest.raises(Throttled, match=r"^vault \(.*\) encrypt: RateLimitExceeded") as caught:
            await kek_rotation.rotate_kek(rc)
        assert is_transient(caught.value)
        assert root.secrets.transit.read_key(key)["data"]["latest_version"] == 1  # not rotated
        run = (await fetch(s.database_url, "SELECT id, state, to_version FROM rotations WHERE kind = 'kek'"))[
            0
        ]
        assert run["state"] == "running" and run["to_version"] is None
        assert await _deks(s) == before

        root.sys.delete_quota(quota)
        result = await kek_rotation.rotate_kek(rc, run_id=run["id"])
        assert result.run.state == "completed" and result.kek_version == 2
        assert {d["kek_version"] for d in await _deks(s)} == {2}
        await _check_all(s, values)
    finally:
        root.sys.delete_quota(quota)
        await kek.aclose()
        await engine.dispose()


def _answer_late(server: ServerProcess, owner: Any, method: str, resume_after_s: float) -> None:
    """Make the next ``owner.method`` request reach ``server`` while it is paused (SIGSTOP): the
    client times out, then the server resumes and carries the request out late."""
    real = getattr(owner, method)

    def late(*args: Any, **kwargs: Any) -> Any:
        setattr(owner, method, real)  # only this request
        server.pause()
        # A timer thread: the Vault client sends from a worker thread, outside the event loop.
        threading.Timer(resume_after_s, server.resume).start()
        return real(*args, **kwargs)

    setattr(owner, method, late)


def _key_versions(kind: str, server: ServerProcess, penv: dict[str, str]) -> int:
    """The KEK's latest version, read at the server."""
    if kind == "vault":
        data = bao_root(server).secrets.transit.read_key(penv["VAULT_TRANSIT_KEY"])["data"]
        return int(data["latest_version"])
    kms = aws_client(server, "kms")
    return 1 + len(kms.list_key_rotations(KeyId=penv["AWS_KMS_KEY_ID"])["Rotations"])


def _rotate_at_server(kind: str, server: ServerProcess, penv: dict[str, str]) -> None:
    if kind == "vault":
        bao_root(server).secrets.transit.rotate_key(name=penv["VAULT_TRANSIT_KEY"])
    else:
        aws_client(server, "kms").rotate_key_on_demand(KeyId=penv["AWS_KMS_KEY_ID"])


async def _late_rotation_lands(kind: str, server: ServerProcess, penv: dict[str, str]) -> None:
    """Wait for the rotate request the client gave up on to be carried out once the server
    resumes. A server may instead drop it, having seen its client go first (a Go server cancels
    a request whose connection closed): then it is carried out here, at the server, as the late
    request would have been. Either way the key rotated once behind the client's back."""
    loop = asyncio.get_running_loop()
    _key_versions(kind, server, penv)  # answered once the server has resumed
    settled = loop.time() + 2.0  # a resumed server handles what it read at once, in ms
    while _key_versions(kind, server, penv) < 2:
        if loop.time() > settled:
            _rotate_at_server(kind, server, penv)
            break
        await asyncio.sleep(0.1)
    assert _key_versions(kind, server, penv) == 2


@pytest.mark.parametrize("kind", ["vault", "aws-kms"])
async def test_a_rotate_request_carried_out_late_is_not_rotated_again(
    kind: str, wenv: dict[str, str], spawn_server: Any, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The rotate request times out at the client but the server carries it out after all; the
    run's retry finds the new version and adopts it instead of rotating the key a second time."""
    from keyrotor.kek.remote import open_remote_provider
    from keyrotor.rotation import kek as kek_rotation
    from keyrotor.rotation.context import RotationContext
    from keyrotor.store import db
    from tests.kek.conftest import fast_policy

    server: ServerProcess = spawn_server("bao" if kind == "vault" else "moto")
    penv = _provider_env(kind, server if kind != "vault" else None, server if kind == "vault" else None)
    _use_env(monkeypatch, penv)
    s = settings_of(wenv, **penv)
    values = await _seed_all(s, 2)
    engine = db.create_engine(s.database_url)
    policy = fast_policy(timeout_s=0.5, max_attempts=2, breaker_cooldown_s=0.5)
    real = await open_remote_provider("vault" if kind == "vault" else "aws", penv, policy=policy)
    try:
        rc = RotationContext(db.sessionmaker(engine), real, s)
        if kind == "vault":
            _answer_late(server, real._client.secrets.transit, "rotate_key", 2.5)  # type: ignore[attr-defined]
        else:
            _answer_late(server, real._client, "rotate_key_on_demand", 2.5)  # type: ignore[attr-defined]
        with pytest.raises(KekUnavailable):
            await asyncio.wait_for(kek_rotation.rotate_kek(rc), timeout=30)
        run = (await fetch(s.database_url, "SELECT * FROM rotations WHERE kind = 'kek'"))[0]
        assert run["to_version"] is None
        await _late_rotation_lands(kind, server, penv)
        await asyncio.sleep(0.6)  # the circuit breaker cools down
        # The job's retry.
        result = await asyncio.wait_for(kek_rotation.rotate_kek(rc, run_id=run["id"]), timeout=30)
        assert result.run.state == "completed" and result.kek_version == 2
        assert _key_versions(kind, server, penv) == 2  # rotated once
        assert {d["kek_version"] for d in await _deks(s)} == {2}
        await _check_all(s, values)
    finally:
        await real.aclose()
        await engine.dispose()


class _OutageOnRewrap:
    """The real provider, failing its n-th rewrap with an outage (a transient error)."""

    def __init__(self, inner: Any, at_call: int) -> None:
        self.inner, self.at_call, self.calls = inner, at_call, 0

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)

    async def rewrap(self, items: Any) -> Any:
        self.calls += 1
        if self.calls == self.at_call:
            raise KekUnavailable("the provider went away (test)")
        return await self.inner.rewrap(items)


@pytest.mark.parametrize("kind", ["aws-kms", "aws-sm", "vault"])
async def test_a_kek_rotation_resumed_by_another_process_completes(
    kind: str, wenv: dict[str, str], request: pytest.FixtureRequest, monkeypatch: pytest.MonkeyPatch
) -> None:
    """One process rotates the KEK and fails mid-rewrap; the retry runs in another process,
    whose provider read the KEK version before the rotation (cached: KMS 60 s, Secrets Manager
    5 min). It must rewrap under the run's target, not fail the run for a stale cache."""
    from keyrotor.kek.remote import open_remote_provider
    from keyrotor.rotation import kek as kek_rotation
    from keyrotor.rotation.context import RotationContext
    from keyrotor.store import db
    from tests.kek.conftest import fast_policy

    moto = request.getfixturevalue("moto_server") if kind.startswith("aws") else None
    bao = request.getfixturevalue("bao_server") if kind == "vault" else None
    penv = _provider_env(kind, moto, bao)
    _use_env(monkeypatch, penv)
    s = settings_of(wenv, **penv, KEYROTOR_KEK_REWRAP_BATCH="2")
    values = await _seed_all(s, 2)
    engine = db.create_engine(s.database_url)
    remote = "vault" if kind == "vault" else "aws"
    other = await open_remote_provider(remote, penv, policy=fast_policy())  # reads v1 now
    first = await open_remote_provider(remote, penv, policy=fast_policy())
    try:
        assert await other.current_version() == 1
        sessions = db.sessionmaker(engine)
        # Rewrap calls: 1 the pre-flight probe, 2 the first batch (an outage).
        with pytest.raises(KekUnavailable):
            await kek_rotation.rotate_kek(RotationContext(sessions, _OutageOnRewrap(first, 2), s))
        run = (await fetch(s.database_url, "SELECT * FROM rotations WHERE kind = 'kek'"))[0]
        assert run["state"] == "running" and run["to_version"] == 2
        result = await asyncio.wait_for(
            kek_rotation.rotate_kek(RotationContext(sessions, other, s), run_id=run["id"]), timeout=60
        )
        assert result.run.state == "completed" and result.kek_version == 2
        assert {d["kek_version"] for d in await _deks(s)} == {2}
        await _check_all(s, values)
    finally:
        await first.aclose()
        await other.aclose()
        await engine.dispose()
