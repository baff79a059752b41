"""Durable audit (the default): a returned call's event is committed, concurrent calls share a
commit, an outage fails calls closed; and what async mode promises instead, SIGKILL included."""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import asyncpg
import pytest
from prometheus_client import REGISTRY

from keyrotor import KeyManager, Settings
from keyrotor.audit.durable import COPY_FROM_ROWS, DurableAuditWriter
from keyrotor.audit.events import printable
from keyrotor.audit.log import CHAIN_LOCK, AuditEvent, write_event
from keyrotor.errors import ConfigurationError, DecryptionFailed, StoreUnavailable
from keyrotor.store import audit as audit_store
from keyrotor.store import db
from tests.conftest import PG_ADMIN
from tests.keyrotor.audit_helpers import rows, verify

OPENAI = "sk-proj-" + "d7Q" * 16
ROOT = Path(__file__).resolve().parents[2]


async def _admin(sql: str) -> None:
    conn = await asyncpg.connect(PG_ADMIN)
    try:
        await conn.execute(sql)
    finally:
        await conn.close()


async def _count(database_url: str, actor: str) -> int:
    conn = await asyncpg.connect(database_url)
    try:
        n = await conn.fetchval("SELECT count(*) FROM encryption_audit_log WHERE actor = $1", actor)
    finally:
        await conn.close()
    return int(n)


def _writer(km: KeyManager) -> DurableAuditWriter:
    assert isinstance(km.audit, DurableAuditWriter)
    return km.audit


@pytest.mark.parametrize(
    ("value", "mode"),
    [("durable", "durable"), ("on", "durable"), ("true", "durable"), ("async", "async"), ("off", "off")],
)
def test_audit_modes_and_the_old_spelling(env: dict[str, str], value: str, mode: str) -> None:
    assert Settings.from_env(env).audit_mode == "durable"  # the default
    settings = Settings.from_env({**env, "KEYROTOR_AUDIT": value})
    assert settings.audit_mode == mode
    assert settings.audit_enabled == (mode != "off")


def test_an_unknown_audit_mode_is_a_configuration_error(env: dict[str, str]) -> None:
    with pytest.raises(ConfigurationError, match="KEYROTOR_AUDIT: Input should be"):
        Settings.from_env({**env, "KEYROTOR_AUDIT": "sometimes"})


async def test_a_returned_call_is_in_the_log_without_any_flush(settings: Settings, database_url: str) -> None:
    # A flush interval of a minute: only the durable path (no timer) can have written these.
    s = settings.model_copy(update={"audit_flush_interval_s": 60.0})
    async with KeyManager(s) as km:
        started = time.monotonic()
        token = await km.encrypt("openai", OPENAI, context="users.api_key:1", actor="lone")
        assert await _count(database_url, "lone") == 1
        assert await km.decrypt("openai", token, context="users.api_key:1", actor="lone") == OPENAI
        assert await _count(database_url, "lone") == 2
        with pytest.raises(DecryptionFailed):
            await km.decrypt("openai", token, context="users.api_key:2", actor="lone")
        failed = await rows(database_url, "event_type = 'failed_decrypt'")
        assert [r["actor"] for r in failed] == ["lone"]
        await km.put_secrets("openai", [(f"k{i}", OPENAI) for i in range(5)], actor="bulk")
        assert await _count(database_url, "bulk") == 5
        assert await km.get_secret("openai", "k3", actor="bulk") == OPENAI
        assert await _count(database_url, "bulk") == 6
        assert time.monotonic() - started < 10.0
        assert (await verify(km)).ok


async def test_concurrent_callers_share_commits(settings: Settings, database_url: str) -> None:
    async with KeyManager(settings) as km:
        token = await km.encrypt("openai", OPENAI)
        writer = _writer(km)

        # 64 calls at once: one batch, not 64 transactions.
        before = writer.commits
        results = await asyncio.gather(*(km.decrypt("openai", token, actor=f"c{i}") for i in range(64)))
        assert results == [OPENAI] * 64
        assert writer.commits - before <= 4

        # 64 callers in loops: each commit carries many events.
        async def caller(i: int) -> None:
            for _ in range(20):
                await km.decrypt("openai", token, actor="looping")

        before = writer.commits
        await asyncio.wait_for(asyncio.gather(*(caller(i) for i in range(64))), 60)
        commits = writer.commits - before
        assert commits <= 64 * 20 // 16, commits
        assert await _count(database_url, "looping") == 64 * 20
        assert (await verify(km)).ok


async def test_a_cancelled_caller_does_not_break_the_batch(settings: Settings, database_url: str) -> None:
    holder = await asyncpg.connect(database_url)
    try:
        async with KeyManager(settings) as km:
            token = await km.encrypt("openai", OPENAI)
            await holder.execute("SELECT pg_advisory_lock($1)", CHAIN_LOCK)  # the writer must wait
            tasks = [asyncio.create_task(km.decrypt("openai", token, actor="batch")) for _ in range(10)]
            await asyncio.sleep(0.3)
            assert not any(t.done() for t in tasks)
            for t in tasks[:3]:
                t.cancel()
            await holder.execute("SELECT pg_advisory_unlock($1)", CHAIN_LOCK)
            done = await asyncio.wait_for(asyncio.gather(*tasks, return_exceptions=True), 30)
            assert all(isinstance(r, asyncio.CancelledError) for r in done[:3])
            assert done[3:] == [OPENAI] * 7
            # The cancelled calls' events were in the batch already: written with the rest.
            assert await _count(database_url, "batch") == 10
            assert await km.decrypt("openai", token, actor="after") == OPENAI
            assert (await verify(km)).ok
    finally:
        await holder.close()


async def test_an_outage_mid_call_fails_the_call_closed(settings: Settings, database_url: str) -> None:
    name = database_url.rsplit("/", 1)[1]
    holder = await asyncpg.connect(database_url)
    async with KeyManager(settings) as km:
        token = await km.encrypt("openai", OPENAI)
        await km.decrypt("openai", token)  # DEK and grants cached: only the audit needs the database
        writer = _writer(km)
        await holder.execute("SELECT pg_advisory_lock($1)", CHAIN_LOCK)
        call = asyncio.create_task(km.decrypt("openai", token, actor="during-outage"))
        await asyncio.sleep(0.3)
        assert not call.done()  # its event is being written, behind the lock
        await _admin(f"ALTER DATABASE {name} ALLOW_CONNECTIONS false")
        try:
            # Every connection but the lock holder's dies (the writer's among them, waiting for
            # the lock mid-call); the holder keeps the lock, so nothing can commit meanwhile.
            holder_pid = await holder.fetchval("SELECT pg_backend_pid()")
            await _admin(
                f"SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                f"WHERE datname = '{name}' AND pid <> {int(holder_pid)}"
            )
            with pytest.raises(StoreUnavailable, match="audit log could not be written"):
                await asyncio.wait_for(call, 60)
            # A call made during the outage fails the same way; neither returned a plaintext.
            with pytest.raises(StoreUnavailable):
                await asyncio.wait_for(km.encrypt("openai", OPENAI, actor="during-outage"), 60)
            assert writer.commit_failures >= 2
        finally:
            await _admin(f"ALTER DATABASE {name} ALLOW_CONNECTIONS true")
            await holder.close()
        assert await asyncio.wait_for(km.decrypt("openai", token, actor="after-outage"), 60) == OPENAI
        assert await _count(database_url, "after-outage") == 1
        assert await _count(database_url, "during-outage") == 0
        assert (await verify(km)).ok


def _kill_after_returned(env: dict[str, str], actor: str, decrypts: int, encrypts: int) -> None:
    """Run the child until it says its calls returned, then SIGKILL it at once."""
    child_env = {**os.environ, **env, "KEYROTOR_LISTEN_KEY_CHANGES": "false"}
    proc = subprocess.Popen(
        [sys.executable, "-m", "tests.keyrotor.audit_crash_child", actor, str(decrypts), str(encrypts)],
        cwd=ROOT,
        env=child_env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        deadline = time.monotonic() + 120
        assert proc.stdout is not None
        line = ""
        while time.monotonic() < deadline and not line:
            line = proc.stdout.readline()  # the child prints one line, or exits (EOF)
            if not line and proc.poll() is not None:
                break
        proc.send_signal(signal.SIGKILL)
        assert line.strip() == f"returned {decrypts + encrypts}", (
            proc.stderr.read()[-3000:] if proc.stderr else ""
        )
    finally:
        proc.kill()
        proc.wait(timeout=30)
        for stream in (proc.stdout, proc.stderr):
            if stream is not None:
                stream.close()


async def test_sigkill_after_returned_calls_loses_no_event(env: dict[str, str], database_url: str) -> None:
    await asyncio.to_thread(_kill_after_returned, {**env, "KEYROTOR_AUDIT": "durable"}, "crash-d", 300, 20)
    assert await _count(database_url, "crash-d") == 320
    async with KeyManager.from_env(env) as km:
        assert (await verify(km)).ok


async def test_sigkill_in_async_mode_loses_at_most_the_queue(env: dict[str, str], database_url: str) -> None:
    # What docs/audit.md promises for async mode: a killed process loses what it had queued,
    # at most KEYROTOR_AUDIT_QUEUE_MAX events (uncounted: the process is gone).
    async_env = {
        **env,
        "KEYROTOR_AUDIT": "async",
        "KEYROTOR_AUDIT_QUEUE_MAX": "100",
        "KEYROTOR_AUDIT_BATCH_SIZE": "50",
        "KEYROTOR_AUDIT_FLUSH_INTERVAL_SECONDS": "30",
    }
    await asyncio.to_thread(_kill_after_returned, async_env, "crash-a", 300, 20)
    logged = await _count(database_url, "crash-a")
    assert 320 - 100 <= logged <= 320
    async with KeyManager.from_env(env) as km:
        assert (await verify(km)).ok


async def test_async_mode_counts_events_dropped_on_a_full_queue(
    settings: Settings, database_url: str
) -> None:
    def dropped() -> float:
        labels = {"reason": "queue_full"}
        return REGISTRY.get_sample_value("keyrotor_audit_events_dropped_total", labels) or 0.0

    s = settings.model_copy(
        update={
            "audit_mode": "async",
            "audit_queue_max": 5,
            "audit_batch_size": 5,
            "audit_put_timeout_s": 0.1,
        }
    )
    before = dropped()
    holder = await asyncpg.connect(database_url)
    try:
        async with KeyManager(s) as km:
            token = await km.encrypt("openai", OPENAI)
            await km.flush_audit()
            await holder.execute("SELECT pg_advisory_lock($1)", CHAIN_LOCK)
            for _ in range(20):  # the writer cannot append: past 5 queued, each call waits 0.1 s
                assert await asyncio.wait_for(km.decrypt("openai", token, actor="full"), 10) == OPENAI
            assert km.audit is not None
            lost = km.audit.dropped
            assert lost >= 10
            assert dropped() == before + lost
            await holder.execute("SELECT pg_advisory_unlock($1)", CHAIN_LOCK)
            await km.flush_audit()
        assert await _count(database_url, "full") == 20 - lost
    finally:
        await holder.close()


async def test_an_event_no_call_waits_for_is_kept_through_an_outage(
    settings: Settings, database_url: str
) -> None:
    # A `failover` event is recorded when the database may be what is down: it must neither
    # block the read that noticed nor be lost.
    name = database_url.rsplit("/", 1)[1]
    async with KeyManager(settings) as km:
        token = await km.encrypt("openai", OPENAI)
        await _admin(f"ALTER DATABASE {name} ALLOW_CONNECTIONS false")
        try:
            await _admin(f"SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = '{name}'")
            await asyncio.wait_for(km._failover_event(False, {"state": "failover"}, "StoreUnavailable"), 1)
            with pytest.raises(StoreUnavailable):  # fails with it: the event stays queued
                await asyncio.wait_for(km.decrypt("openai", token, actor="during-outage"), 60)
            await asyncio.sleep(0.5)  # a retry or two, backed off
            assert _writer(km).depth == 1
        finally:
            await _admin(f"ALTER DATABASE {name} ALLOW_CONNECTIONS true")
        await asyncio.wait_for(km.flush_audit(), 30)
        assert [r["success"] for r in await rows(database_url, "event_type = 'failover'")] == [False]
        assert (await verify(km)).ok


async def test_another_appender_between_commits_keeps_one_chain(
    settings: Settings, database_url: str
) -> None:
    # The writer chains each batch on the head its last commit left; another appender in
    # between (a job's in-transaction event, another process) must be noticed, not forked.
    async with KeyManager(settings) as km, KeyManager(settings) as other:
        token = await km.encrypt("openai", OPENAI)
        for i in range(5):
            await km.decrypt("openai", token, actor="first")
            await other.decrypt("openai", token, actor="second")
            async with db.transaction(km.sessions) as session:
                await write_event(session, AuditEvent("config_change", actor="job", metadata={"i": i}))
        assert (await verify(km)).ok
    assert await _count(database_url, "first") == 5
    assert await _count(database_url, "second") == 5
    assert await _count(database_url, "job") == 5


def test_the_old_override_name_still_turns_audit_off(env: dict[str, str]) -> None:
    assert Settings.from_env(env, audit_enabled=False).audit_mode == "off"
    assert Settings.from_env(env, audit_enabled=True).audit_mode == "durable"
    assert Settings.from_env(env, audit_mode="async").audit_mode == "async"


async def test_large_batches_go_by_copy_and_keep_one_chain(settings: Settings, database_url: str) -> None:
    # A batch of COPY_FROM_ROWS or more is written in a transaction with COPY, small ones by the
    # one-statement insert; mixed, and with another appender in between, the chain stays one.
    async with KeyManager(settings) as km, KeyManager(settings) as other:
        token = await km.encrypt("openai", OPENAI)
        writer = _writer(km)
        big = [(token, "")] * (COPY_FROM_ROWS + 5)
        for _ in range(3):
            await km.decrypt("openai", token, actor="small")
            commits = writer.commits
            assert await asyncio.wait_for(km.decrypt_many("openai", big, actor="big"), 60) == [OPENAI] * len(
                big
            )
            assert writer.commits == commits + 1
            await other.decrypt("openai", token, actor="other")
        assert (await verify(km)).ok
    assert await _count(database_url, "big") == 3 * len(big)
    assert await _count(database_url, "small") == 3
    assert await _count(database_url, "other") == 3


async def test_rows_go_as_one_text_unless_a_field_needs_an_escape(
    settings: Settings, database_url: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    # Small batches on the known head are sent as one text split on the server; a field that
    # COPY escapes (tab, newline, backslash; metadata JSON of a context outside ASCII or with a
    # quote) cannot be split back, and sends its batch column-wise. Both store exactly the values
    # given (the caller's fields as stored: printable, control characters escaped), and the
    # chain verifies.
    odd = ["tab\there", "new\nline", "back\\slash", "caf\u00e9", 'say "hi"', "plain:1", "\\N", "x\\N"]
    agents = [None, "curl/8", "ua\twith tab", "ua \\N"]
    sent = {"text": 0, "columns": 0}

    def counting(name: str, kind: str) -> None:
        real = getattr(audit_store, name)

        async def counted(*args: Any) -> None:
            sent[kind] += 1
            await real(*args)

        monkeypatch.setattr(audit_store, name, counted)

    counting("insert_lines_on_head", "text")
    counting("insert_on_head", "columns")
    async with KeyManager(settings) as km:
        token = await km.encrypt("openai", OPENAI)
        await km.decrypt("openai", token, actor="warm")  # the writer now knows the head
        for i, context in enumerate(odd):
            token_i = await km.encrypt("openai", OPENAI, context=context, actor="writer")
            agent = agents[i % len(agents)]
            who = {"actor": "reader", "ip": "10.0.0.1", "user_agent": agent}
            await km.decrypt("openai", token_i, context=context, **who)
            with pytest.raises(DecryptionFailed):
                await km.decrypt("openai", token_i, context=context + "?", actor="reader", user_agent=agent)
        got = await rows(database_url, "actor = 'reader'")
        assert (await verify(km)).ok
    # One commit a call (they come one at a time). As text: the decrypt after the head is known,
    # and the encrypt, decrypt and failed decrypt of plain:1 (user agent curl/8); every other
    # call of the loop has a field that needs an escape.
    assert sent == {"text": 4, "columns": 21}
    stored = [None if a is None else printable(a) for a in agents]
    assert [(r["event_type"], json.loads(r["metadata"]).get("context"), r["user_agent"]) for r in got] == [
        (kind, context + suffix, stored[i % len(agents)])
        for i, context in enumerate(odd)
        for kind, suffix in (("decrypt", ""), ("failed_decrypt", "?"))
    ]
    assert all(r["ip_address"] == "10.0.0.1" for r in got[::2])
    assert all(r["success"] is (r["event_type"] == "decrypt") for r in got)
    assert all(r["error_message"] is None for r in got[::2]) and all(r["error_message"] for r in got[1::2])


def test_chain_lines_refuses_any_escaped_field() -> None:
    from keyrotor.audit.chain import chain_copy, chain_lines
    from keyrotor.audit.events import Row
    from keyrotor.audit.key import AuditKey

    key = AuditKey(1, b"k" * 32, 0)
    meta = '{"context":"t:1"}'
    plain: Row = ("decrypt", "openai", 2, True, "a", None, "ua", None, meta, 1_700_000_000_000_001)
    text, last_id, last_hash = chain_lines(7, b"\0" * 32, [plain, plain], key)
    copy, copy_id, copy_hash = chain_copy(7, b"\0" * 32, [plain, plain], key)
    # The same rows and hashes as COPY's lines, the hashes' \\x prefixes aside.
    assert text is not None and (last_id, last_hash) == (copy_id, copy_hash) == (9, copy_hash)
    assert text + "\n" == copy.decode().replace("\\\\x", "")
    assert text.split("\n")[0].split("\t")[6] == "\\N"  # ip_address: NULL
    for field, value in ((4, "a\tb"), (6, "u\\N"), (7, "e\nr"), (8, '{"context":"caf\\u00e9"}'), (1, "o\\")):
        odd: Row = (*plain[:field], value, *plain[field + 1 :])  # type: ignore[assignment]
        rows_ = [plain, odd]
        assert chain_lines(7, b"\0" * 32, rows_, key)[0] is None
        assert chain_lines(7, b"\0" * 32, rows_, key)[1:] == chain_copy(7, b"\0" * 32, rows_, key)[1:]


async def test_a_dead_writer_task_fails_calls_instead_of_hanging(
    settings: Settings, database_url: str
) -> None:
    # The writer's task can end under the manager (something cancels every task of the loop): a
    # call must then fail closed at once, never wait for a commit no task will make.
    async with KeyManager(settings) as km:
        token = await km.encrypt("openai", OPENAI)
        writer = _writer(km)
        task = writer._task
        assert task is not None
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await asyncio.wait_for(task, 10)
        with pytest.raises(StoreUnavailable, match="audit writer"):
            await asyncio.wait_for(km.decrypt("openai", token, actor="after-death"), 10)
        with pytest.raises(StoreUnavailable, match="audit writer"):
            await asyncio.wait_for(km.put_secrets("openai", [("k", OPENAI)], actor="after-death"), 10)
    assert await _count(database_url, "after-death") == 0


async def test_async_mode_counts_what_a_dead_writer_task_held(settings: Settings, database_url: str) -> None:
    def stopped() -> float:
        return REGISTRY.get_sample_value("keyrotor_audit_events_dropped_total", {"reason": "stopped"}) or 0.0

    s = settings.model_copy(update={"audit_mode": "async", "audit_flush_interval_s": 60.0})
    before = stopped()
    async with KeyManager(s) as km:
        token = await km.encrypt("openai", OPENAI)
        await km.flush_audit()
        for _ in range(3):  # queued; the interval is a minute, so none is written yet
            assert await km.decrypt("openai", token, actor="queued") == OPENAI
        writer = km.audit
        assert writer is not None and writer._task is not None
        task = writer._task
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await asyncio.wait_for(task, 10)
        assert writer.dropped == 3
        assert stopped() == before + 3
        with pytest.raises(StoreUnavailable, match="audit writer"):
            await asyncio.wait_for(km.decrypt("openai", token, actor="after-death"), 10)
        await asyncio.wait_for(km.flush_audit(), 10)  # returns: nothing is left to wait for
    assert await _count(database_url, "queued") == 0
    assert await _count(database_url, "after-death") == 0


async def test_a_frozen_writer_does_not_hold_the_chain_lock_for_ever(
    settings: Settings, database_url: str
) -> None:
    # A writer process stopped (SIGSTOP, a hung VM, a partition) between BEGIN and COMMIT sends
    # no FIN: its backend sits idle in transaction holding the chain lock. The server must end
    # that transaction after the writer's statement timeout, or every audited call fails.
    frozen = await asyncpg.connect(database_url)
    try:
        async with KeyManager(settings) as km:
            token = await km.encrypt("openai", OPENAI)
            await audit_store.begin_locked(frozen, 2.0)  # the writer's own transaction, then silence
            started = time.monotonic()
            assert await asyncio.wait_for(km.decrypt("openai", token, actor="after-freeze"), 20) == OPENAI
            assert time.monotonic() - started < 20
            assert await _count(database_url, "after-freeze") == 1
    finally:
        frozen.terminate()


@pytest.mark.timeout(60)
async def test_no_decrypt_returns_unaudited_while_the_manager_closes(env: dict[str, str]) -> None:
    # Decrypts of a cached DEK run on while close() writes the last events and signs the head:
    # each one that returns its plaintext must have its event committed, wherever in close()
    # it lands.
    km = KeyManager(Settings.from_env(env))
    await km.open()
    token = await km.encrypt("openai", OPENAI, context="users.api_key:7")
    returned = 0
    stop = asyncio.Event()

    async def reader() -> None:
        nonlocal returned
        while not stop.is_set():
            try:
                assert await km.decrypt("openai", token, context="users.api_key:7", actor="closing") == OPENAI
            except (ConfigurationError, StoreUnavailable):
                pass
            else:
                returned += 1
            await asyncio.sleep(0)  # an unaudited decrypt would never yield to close() itself

    readers = [asyncio.create_task(reader()) for _ in range(4)]
    await asyncio.sleep(0.2)
    await km.close()
    for _ in range(20):  # and once closed, nothing more returns either
        await asyncio.sleep(0)
    stop.set()
    await asyncio.wait_for(asyncio.gather(*readers), 10)
    assert returned > 0
    assert await _count(env["DATABASE_URL"], "closing") == returned
