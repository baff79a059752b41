"""The batched writer: retries through an outage, back-pressure, shutdown, and many writers
(tasks and OS processes) keeping one chain."""

from __future__ import annotations

import asyncio
import hashlib
import itertools
import json
import logging
import os
import subprocess
import sys
import textwrap
import time
from collections import Counter
from datetime import UTC, datetime
from typing import Any

import asyncpg
import pytest
from hypothesis import given
from hypothesis import strategies as st
from prometheus_client import REGISTRY

from keyrotor import KeyManager, Settings
from keyrotor.audit.events import printable
from keyrotor.audit.log import CHAIN_LOCK, AuditEvent, write_event
from keyrotor.audit.writer import AuditWriter
from keyrotor.store import db
from tests.conftest import PG_ADMIN
from tests.keyrotor.audit_helpers import rows, verify

OPENAI = "sk-proj-" + "w8R" * 16


def _metric(name: str, labels: dict[str, str] | None = None) -> float:
    return REGISTRY.get_sample_value(name, labels) or 0.0


async def _admin(sql: str) -> None:
    conn = await asyncpg.connect(PG_ADMIN)
    try:
        await conn.execute(sql)
    finally:
        await conn.close()


async def test_flush_survives_a_database_outage(settings: Settings, database_url: str) -> None:
    name = database_url.rsplit("/", 1)[1]
    # Async mode: decrypts go on while the database is away (durable mode fails them instead).
    s = settings.model_copy(update={"audit_flush_interval_s": 0.05, "audit_mode": "async"})
    async with KeyManager(s) as km:
        token = await km.encrypt("openai", OPENAI)
        await km.decrypt("openai", token)
        await km.flush_audit()  # the writer holds its connection now
        assert km.audit is not None
        failures_before = _metric("keyrotor_audit_flush_failures_total")

        # The database goes away: every connection is killed and new ones are refused.
        await _admin(f"ALTER DATABASE {name} ALLOW_CONNECTIONS false")
        try:
            await _admin(f"SELECT pg_terminate_backend(pid) FROM pg_stat_activity WHERE datname = '{name}'")
            for _ in range(300):  # DEK and grants are cached: decrypts go on, events queue up
                await km.decrypt("openai", token, actor="during-outage")
            flushing = asyncio.create_task(km.flush_audit())
            await asyncio.sleep(1.0)
            assert not flushing.done()
            assert km.audit.flush_failures >= 2
            assert km.audit.depth == 300
        finally:
            await _admin(f"ALTER DATABASE {name} ALLOW_CONNECTIONS true")
        await asyncio.wait_for(flushing, 30)
        assert _metric("keyrotor_audit_flush_failures_total") >= failures_before + 2
        report = await verify(km)
    assert report.ok
    log = await rows(database_url)
    assert len(log) == 302
    assert sum(r["actor"] == "during-outage" for r in log) == 300


async def test_commit_of_unknown_fate_is_not_written_twice(settings: Settings, database_url: str) -> None:
    # The connection dies after COMMIT reached the server but before its answer came back: the
    # retry must find the batch already there instead of writing it a second time.
    async with KeyManager(settings) as km:
        writer = km.audit
        assert writer is not None
        real_insert = writer._insert
        calls = 0

        async def insert_then_lose_the_answer(pg: Any, *args: Any) -> None:
            nonlocal calls
            calls += 1
            await real_insert(pg, *args)
            if calls == 1:
                await pg.execute("COMMIT")
                raise ConnectionResetError("lost the answer to COMMIT")

        writer._insert = insert_then_lose_the_answer  # type: ignore[method-assign,assignment]
        token = await km.encrypt("openai", OPENAI)
        for _ in range(10):
            await km.decrypt("openai", token)
        await km.flush_audit()
        assert writer.flush_failures == 1
        assert (await verify(km)).ok
    assert len(await rows(database_url)) == 11


async def test_full_queue_makes_callers_wait_not_lose(settings: Settings, database_url: str) -> None:
    s = settings.model_copy(  # the queue of async mode
        update={
            "audit_queue_max": 50,
            "audit_batch_size": 10,
            "audit_flush_interval_s": 0.01,
            "audit_mode": "async",
        }
    )
    blocked_before = _metric("keyrotor_audit_callers_blocked_total")
    holder = await asyncpg.connect(database_url)
    try:
        async with KeyManager(s) as km:
            token = await km.encrypt("openai", OPENAI)
            await km.flush_audit()
            await holder.execute("SELECT pg_advisory_lock($1)", CHAIN_LOCK)  # the writer cannot append

            async def burst() -> None:
                for _ in range(200):
                    await km.decrypt("openai", token)

            task = asyncio.create_task(burst())
            await asyncio.sleep(0.5)
            assert km.audit is not None
            assert not task.done()  # waiting for queue space...
            assert km.audit.blocked >= 1
            assert km.audit.depth <= 50
            assert _metric("keyrotor_audit_queue_depth") >= 50
            await holder.execute("SELECT pg_advisory_unlock($1)", CHAIN_LOCK)
            await asyncio.wait_for(task, 30)  # ...and goes on once the writer can write
            assert (await verify(km)).ok
    finally:
        await holder.close()
    assert _metric("keyrotor_audit_callers_blocked_total") >= blocked_before + 1
    assert len(await rows(database_url)) == 201


async def test_close_gives_up_loudly_after_its_timeout(
    settings: Settings, database_url: str, caplog: pytest.LogCaptureFixture
) -> None:
    s = settings.model_copy(update={"audit_close_timeout_s": 0.5, "audit_mode": "async"})
    dropped_before = _metric("keyrotor_audit_events_dropped_total", {"reason": "close"})
    holder = await asyncpg.connect(database_url)
    try:
        km = KeyManager(s)
        await km.open()
        token = await km.encrypt("openai", OPENAI)
        await km.flush_audit()
        await holder.execute("SELECT pg_advisory_lock($1)", CHAIN_LOCK)
        for _ in range(5):
            await km.decrypt("openai", token)
        writer = km.audit
        assert writer is not None
        with caplog.at_level(logging.ERROR, logger="keyrotor.audit.writer"):
            await asyncio.wait_for(km.close(), 10)
        assert writer.dropped == 5
        assert "5 events unwritten" in caplog.text
    finally:
        await holder.close()
    assert _metric("keyrotor_audit_events_dropped_total", {"reason": "close"}) == dropped_before + 5


async def test_writer_and_in_transaction_writes_share_one_chain(km: KeyManager, database_url: str) -> None:
    token = await km.encrypt("openai", OPENAI)

    async def decrypts() -> None:
        for i in range(300):
            await km.decrypt("openai", token)
            if i % 50 == 0:
                await asyncio.sleep(0.01)

    async def jobs() -> None:
        for i in range(30):
            async with db.transaction(km.sessions) as session:
                await write_event(
                    session, AuditEvent("rotate", scope="openai", key_version=i, actor="worker")
                )
            await asyncio.sleep(0.005)

    await asyncio.gather(decrypts(), jobs(), decrypts())
    report = await verify(km)
    assert report.ok and report.checked == 631


async def test_submit_validates_and_normalises(km: KeyManager, database_url: str) -> None:
    assert km.audit is not None
    naive = datetime(2026, 3, 1, 12, 0)
    await km.audit.submit(AuditEvent("failover", scope="eu-west-1", actor="scheduler", created_at=naive))
    with pytest.raises(Exception, match="unknown audit event type"):
        await km.audit.submit(AuditEvent("bogus"))  # type: ignore[arg-type]
    await km.flush_audit()
    (row,) = await rows(database_url)
    assert row["created_at"] == naive.replace(tzinfo=UTC)


@pytest.mark.parametrize("method", ["copy", "insert"])
async def test_both_insert_methods_write_the_same_chain(
    settings: Settings, database_url: str, method: str
) -> None:
    engine = db.create_engine(database_url)
    writer = AuditWriter(engine, batch_size=7, flush_interval_s=0.01, method=method)  # type: ignore[arg-type]
    await writer.start()
    try:
        for i in range(50):
            await writer.submit(
                AuditEvent("decrypt", scope="openai", key_version=1, actor=f"a{i}", metadata={"i": i})
            )
        await writer.flush()
    finally:
        await writer.close()
        await engine.dispose()
    async with KeyManager(settings) as km:
        report = await verify(km)
    assert report.ok and report.checked == 50


WORKER = textwrap.dedent(
    """
    import asyncio, sys, time
    from keyrotor import KeyManager

    async def main() -> None:
        async with KeyManager.from_env() as km:
            await asyncio.sleep(max(0.0, float(sys.argv[3]) - time.time()))  # start together
            # Paced (about a second each), so the three processes' runs overlap even when one
            # of them starts late on a loaded machine.
            for i in range(200):
                await km.decrypt("openai", sys.argv[1], actor=sys.argv[2])
                if i % 2 == 0:
                    await asyncio.sleep(0.01)

    asyncio.run(main())
    """
)


async def test_concurrent_writers_in_three_processes_keep_one_chain(
    env: dict[str, str], settings: Settings, database_url: str
) -> None:
    async with KeyManager(settings) as km:
        token = await km.encrypt("openai", OPENAI)
    child_env = {
        **os.environ,
        **env,
        "KEYROTOR_LISTEN_KEY_CHANGES": "false",
        # small batches, flushed often: the processes' appends interleave many times
        "KEYROTOR_AUDIT_BATCH_SIZE": "7",
        "KEYROTOR_AUDIT_FLUSH_INTERVAL_SECONDS": "0.005",
    }
    start = str(time.time() + 4.0)
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", WORKER, token, f"proc-{i}", start], env=child_env, stderr=subprocess.PIPE
        )
        for i in range(3)
    ]
    for p in procs:
        _, err = await asyncio.to_thread(p.communicate, timeout=120)
        assert p.returncode == 0, err.decode()[-2000:]
    async with KeyManager(settings) as km:
        report = await verify(km)
    assert report.ok, report
    log = await rows(database_url)
    assert len(log) == 601
    assert Counter(r["actor"] for r in log if r["event_type"] == "decrypt") == {
        "proc-0": 200,
        "proc-1": 200,
        "proc-2": 200,
    }
    # really interleaved: the processes' batches alternate along the chain
    switches = sum(1 for a, b in itertools.pairwise(log) if a["actor"] != b["actor"])
    assert switches >= 6


async def test_copy_text_escaping_round_trips(km: KeyManager, database_url: str) -> None:
    tricky = 'tab\there\nnew line\r\\back\\slash\\N \\x00 "quoted" ünï €'
    assert km.audit is not None
    await km.audit.submit(
        AuditEvent(
            "replica_check",
            scope=tricky,
            key_version=3,
            success=False,
            actor=tricky,
            ip_address="\\N",
            user_agent="",
            error_message=tricky,
            metadata={"k\t\\": tricky, "list": [tricky, 1.5, None]},
        )
    )
    await km.flush_audit()
    (row,) = await rows(database_url)
    assert row["error_message"] == tricky
    # Scope, actor, ip and user agent are stored printable: their controls as escapes.
    assert (
        row["scope"]
        == row["actor"]
        == printable(tricky)
        == tricky.replace("\t", "\\t").replace("\n", "\\n").replace("\r", "\\r")
    )
    assert row["ip_address"] == "\\N" and row["user_agent"] == ""
    assert json.loads(row["metadata"]) == {"k\t\\": tricky, "list": [tricky, 1.5, None]}
    assert (await verify(km)).ok


def test_copy_and_records_hash_alike() -> None:
    from keyrotor.audit.log import GENESIS, chain_copy, chain_records, event_row

    events = [
        AuditEvent("decrypt", scope="s", key_version=i, actor=f"a\t{i}", metadata={"i": i}) for i in range(5)
    ] + [AuditEvent("anchor", success=False, error_message="x\\y")]
    batch = [event_row(e) for e in events]
    data, last_id, last_hash = chain_copy(41, GENESIS, batch)
    records = chain_records(41, GENESIS, batch)
    assert (last_id, last_hash) == (records[-1][0], records[-1][12])
    # The actor's tab is stored as its escape, whose backslash COPY doubles.
    assert data.count(b"\n") == 6 and data.startswith(b"42\tdecrypt\ts\t0\tt\ta\\\\t0\t")


_FIELD = st.none() | st.text(alphabet=st.sampled_from("ab\t\n\r\\N é€"), max_size=6)


@given(
    st.lists(
        st.tuples(
            st.sampled_from(["decrypt", "encrypt", "failed_decrypt"]),
            _FIELD,
            st.none() | st.integers(1, 2**31 - 1),
            st.booleans(),
            _FIELD,
            _FIELD,
            _FIELD,
            _FIELD,
            st.integers(0, 4_000_000_000_000_000),
            st.text(alphabet=st.sampled_from('{}":ab\t\n\r\\Né'), max_size=8),
        ),
        min_size=1,
        max_size=12,
    )
)
def test_the_writer_hashes_exactly_the_canonical_line(values: list[tuple[Any, ...]]) -> None:
    """What the batched writer hashes (its cached COPY spellings included) is ``canonical``."""
    from keyrotor.audit.log import GENESIS, canonical, chain_records, from_us

    rows = [(*v[:8], v[9], v[8]) for v in values] * 2  # repeats: the cached spellings
    prev = GENESIS
    for record in chain_records(0, GENESIS, rows):
        row_id, et, scope, kv, ok, actor, ip, agent, error, meta, micros, prev_hash, row_hash, key_id = record
        assert key_id is None
        body = canonical(row_id, et, scope, kv, ok, actor, ip, agent, error, from_us(micros), meta)
        assert prev_hash == prev and row_hash == hashlib.sha256(prev + body).digest()
        prev = row_hash


@given(
    st.text(alphabet=st.sampled_from('ab9:._/ "\\\t\x00\x1f\x7fé€\ud800'), max_size=12)
    | st.text(alphabet=st.characters(codec="ascii"), max_size=40)
    | st.text(max_size=40)
)
def test_a_context_s_metadata_is_what_the_encoder_writes(context: str) -> None:
    from keyrotor.audit.calls import context_metadata
    from keyrotor.audit.log import clean_text, metadata_json
    from keyrotor.inputs import MAX_CONTEXT_CHARS

    expected = metadata_json({"context": clean_text(context, MAX_CONTEXT_CHARS)}) if context else "{}"
    assert context_metadata(context) == expected
    assert context_metadata(context) == expected  # and again, memoised or not


def test_a_long_context_s_metadata_is_cut_as_the_encoder_cuts_it() -> None:
    from keyrotor.audit.calls import context_metadata
    from keyrotor.audit.log import clean_text, metadata_json
    from keyrotor.inputs import MAX_CONTEXT_CHARS

    for context in ("a" * (MAX_CONTEXT_CHARS + 1), "users.api_key:" + "9" * MAX_CONTEXT_CHARS):
        assert context_metadata(context) == metadata_json({"context": clean_text(context, MAX_CONTEXT_CHARS)})
