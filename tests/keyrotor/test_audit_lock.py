"""How long a holder of the audit chain lock can keep it while idle.

Every appender takes the chain lock (``keyrotor.store.audit.CHAIN_LOCK``) until its transaction
ends, and a durable call returns only once its event is committed: a holder that stops between
taking the lock and committing (SIGSTOP, a VM pause, a partition: no FIN reaches the server)
would hold every audited call of every process back. The server must end such a transaction
after a bounded idle time, whichever path took the lock, without failing the part of a long
transaction that ran before the lock was taken.
"""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import asyncpg
import pytest
from sqlalchemy import text

from keyrotor import KeyManager, Settings
from keyrotor.audit import key as audit_key
from keyrotor.audit.log import AuditEvent, write_event
from keyrotor.errors import StoreUnavailable
from keyrotor.kek.base import KekProvider
from keyrotor.kek.factory import open_provider
from keyrotor.store import audit as audit_store
from keyrotor.store import db
from tests.keyrotor.audit_helpers import verify

OPENAI = "sk-proj-" + "q4Z" * 16
ROOT = Path(__file__).resolve().parents[2]


async def _count(database_url: str, actor: str) -> int:
    conn = await asyncpg.connect(database_url)
    try:
        n = await conn.fetchval("SELECT count(*) FROM encryption_audit_log WHERE actor = $1", actor)
    finally:
        await conn.close()
    return int(n)


def _start_locked_child(env: dict[str, str], actor: str) -> subprocess.Popen[str]:
    """Start audit_lock_child and return once it holds the chain lock (it says so)."""
    child_env = {**os.environ, **env, "KEYROTOR_LISTEN_KEY_CHANGES": "false"}
    proc = subprocess.Popen(
        [sys.executable, "-m", "tests.keyrotor.audit_lock_child", actor],
        cwd=ROOT,
        env=child_env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    assert proc.stdout is not None
    deadline = time.monotonic() + 60
    line = ""
    while time.monotonic() < deadline and not line:
        line = proc.stdout.readline()  # one line, or EOF if the child died
        if not line and proc.poll() is not None:
            break
    if line.strip() != "locked":
        proc.kill()
        proc.wait(timeout=30)
        raise AssertionError(proc.stderr.read()[-3000:] if proc.stderr else "the child said nothing")
    return proc


def _reap(proc: subprocess.Popen[str]) -> None:
    proc.kill()  # SIGKILL ends a stopped process too
    proc.wait(timeout=30)
    for stream in (proc.stdout, proc.stderr):
        if stream is not None:
            stream.close()


@pytest.mark.timeout(90)
async def test_a_job_frozen_holding_the_chain_lock_does_not_stall_durable_decrypts(
    env: dict[str, str], database_url: str
) -> None:
    async with KeyManager(Settings.from_env(env)) as km:
        token = await km.encrypt("openai", OPENAI, context="users.api_key:1")
        proc = await asyncio.to_thread(_start_locked_child, env, "frozen-job")
        try:
            proc.send_signal(signal.SIGSTOP)
            started = time.monotonic()
            value = await asyncio.wait_for(
                km.decrypt("openai", token, context="users.api_key:1", actor="after-freeze"), 20
            )
            assert value == OPENAI
            # The idle bound, then one transaction: well within the durable writer's 30 s attempt.
            assert time.monotonic() - started < audit_store.CHAIN_LOCK_IDLE_S + 10
        finally:
            await asyncio.to_thread(_reap, proc)
        # The frozen transaction was ended, not committed: its event went with it, and the chain
        # the others appended meanwhile is whole.
        assert await _count(database_url, "frozen-job") == 0
        assert await _count(database_url, "after-freeze") == 1
        assert (await verify(km)).ok


async def test_idling_before_the_append_is_not_bounded(
    km: KeyManager, database_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    # The bound applies from the chain lock to the commit only: a long transaction may idle (a
    # KEK call, a wait on another service) before it appends its event, as it always could.
    monkeypatch.setattr(audit_store, "CHAIN_LOCK_IDLE_S", 0.3)
    async with db.transaction(km.sessions) as session:
        await session.execute(text("SELECT 1"))
        await asyncio.sleep(1.0)
        await write_event(session, AuditEvent("config_change", actor="idled-before"))
    assert await _count(database_url, "idled-before") == 1


async def test_idling_while_holding_the_chain_lock_ends_the_transaction(
    km: KeyManager, database_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(audit_store, "CHAIN_LOCK_IDLE_S", 0.3)
    with pytest.raises(StoreUnavailable):
        async with db.transaction(km.sessions) as session:
            await write_event(session, AuditEvent("config_change", actor="idled-after"))
            await asyncio.sleep(1.5)  # the server ends the transaction meanwhile
    assert await _count(database_url, "idled-after") == 0
    # And the lock went with it: another appender gets it at once.
    async with db.transaction(km.sessions) as session:
        await write_event(session, AuditEvent("config_change", actor="next"))
    assert await _count(database_url, "next") == 1


async def test_a_shorter_idle_timeout_of_the_caller_is_kept(km: KeyManager) -> None:
    async with db.transaction(km.sessions) as session:
        await session.execute(text("SET LOCAL idle_in_transaction_session_timeout = 200"))
        await write_event(session, AuditEvent("config_change", actor="short"))
        shown = (await session.execute(text("SHOW idle_in_transaction_session_timeout"))).scalar_one()
    assert shown == "200ms"


async def test_loading_the_audit_key_through_a_slow_kek_is_not_under_the_lock(
    settings: Settings, database_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    # A process without a KeyManager (the CLI) loads the audit key through its KEK on its first
    # event: a KEK call (a remote KMS, retries) must not count as idling under the chain lock.
    async with KeyManager(settings) as km:  # creates the audit key
        await km.encrypt("openai", OPENAI)
    monkeypatch.setattr(audit_store, "CHAIN_LOCK_IDLE_S", 0.3)
    monkeypatch.setattr(audit_key, "_KEYS", {})  # this process has not loaded it yet

    async def slow_kek() -> KekProvider:
        await asyncio.sleep(1.0)  # a slow provider: longer than the idle bound
        return await open_provider(settings)

    audit_key.set_kek_opener(slow_kek)
    engine = db.create_engine(database_url)
    try:
        async with db.transaction(db.sessionmaker(engine)) as session:
            await write_event(session, AuditEvent("config_change", actor="cli-first-event"))
    finally:
        audit_key.set_kek_opener(None)
        await engine.dispose()
    assert await _count(database_url, "cli-first-event") == 1
    async with KeyManager(settings) as km:
        assert (await verify(km)).ok
