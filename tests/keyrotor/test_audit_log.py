"""The audit log through the real code paths: every event type, the callers, the hash chain,
tampering detected, pruning with an anchor, and nothing secret in any column."""

from __future__ import annotations

import asyncio
import base64
import hashlib
import json
import threading
from collections.abc import Callable
from datetime import UTC, datetime, timedelta

import asyncpg
import pytest

from keyrotor import KeyManager, Settings
from keyrotor.audit.log import (
    EVENT_TYPES,
    GENESIS,
    AuditEvent,
    AuditQuery,
    actor_context,
    canonical,
    chain_hash,
    current_caller,
    parse_time,
    query_events,
    record_config_change,
    tail_events,
    write_event,
)
from keyrotor.audit.verify import PruneResult, parse_checkpoint, prune, verify_chain
from keyrotor.crypto import legacy_format as legacy
from keyrotor.errors import (
    AccessDenied,
    ConfigurationError,
    Conflict,
    DecryptionFailed,
    InvalidInput,
    MalformedCiphertext,
    SecretNotFound,
)
from keyrotor.store import db
from tests.conftest import MASTER_KEY
from tests.keyrotor.audit_helpers import rows, tamper, verify
from tests.legacy_helpers import store_legacy_secret

ANTHROPIC = "sk-ant-api03-" + "Q7w" * 30 + "zz"
OPENAI = "sk-proj-" + "m4K" * 16


async def test_every_owned_event_type_from_the_real_code_path(km: KeyManager, database_url: str) -> None:
    token = await km.encrypt("anthropic", ANTHROPIC, context="user:1", actor="alice")
    assert await km.decrypt("anthropic", token, context="user:1", actor="alice") == ANTHROPIC
    with pytest.raises(DecryptionFailed):
        await km.decrypt("anthropic", token, context="user:2", actor="mallory")
    await km.revoke("*", "*", by="admin")
    await km.grant("alice", "anthropic", decrypt=True, by="admin")
    with pytest.raises(AccessDenied):
        await km.decrypt("anthropic", token, context="user:1", actor="bob")
    await km.flush_audit()

    log = await rows(database_url)
    by_type = {r["event_type"]: r for r in log}
    assert {"encrypt", "decrypt", "failed_decrypt", "unauthorized", "config_change"} <= set(by_type)

    enc = by_type["encrypt"]
    assert (enc["actor"], enc["scope"], enc["key_version"], enc["success"]) == ("alice", "anthropic", 1, True)
    assert json.loads(enc["metadata"]) == {"context": "user:1"}
    dec = by_type["decrypt"]
    assert (dec["actor"], dec["scope"], dec["key_version"], dec["success"]) == ("alice", "anthropic", 1, True)
    failed = by_type["failed_decrypt"]
    assert (failed["actor"], failed["key_version"], failed["success"]) == ("mallory", 1, False)
    assert failed["error_message"].startswith("DecryptionFailed: ")
    denied = by_type["unauthorized"]
    assert (denied["actor"], denied["scope"], denied["success"]) == ("bob", "anthropic", False)
    assert json.loads(denied["metadata"]) == {"operation": "decrypt"}
    changes = [json.loads(r["metadata"]) for r in log if r["event_type"] == "config_change"]
    assert [c["what"] for c in changes] == ["revoke", "grant"]
    assert changes[0]["before"] == {"actor": "*", "scope": "*", "encrypt": True, "decrypt": True}
    assert changes[0]["after"] is None
    assert changes[1]["after"] == {"actor": "alice", "scope": "anthropic", "encrypt": False, "decrypt": True}
    assert all(r["actor"] == "admin" for r in log if r["event_type"] == "config_change")
    assert all(r["created_at"].tzinfo is not None for r in log)
    assert (await verify(km)).ok


async def test_failures_record_the_typed_error_class_and_message(km: KeyManager, database_url: str) -> None:
    token = await km.encrypt("openai", OPENAI)
    for bad in ("garbage", token.replace("kr1:1:", "kr1:7:")):
        with pytest.raises((MalformedCiphertext, DecryptionFailed, Exception)):
            await km.decrypt("openai", bad)
    with pytest.raises(SecretNotFound):
        await km.get_secret("openai", "nope")
    with pytest.raises(InvalidInput):
        await km.encrypt("openai", "")
    await km.flush_audit()
    failed = await rows(database_url, "NOT success")
    kinds = [(r["event_type"], r["error_message"].split(":")[0]) for r in failed]
    assert kinds == [
        ("failed_decrypt", "MalformedCiphertext"),
        ("failed_decrypt", "KeyVersionUnknown"),
        ("failed_decrypt", "SecretNotFound"),
        ("encrypt", "InvalidValue"),
    ]
    assert failed[1]["key_version"] == 7  # read from the ciphertext's prefix, never the ciphertext


async def test_secrets_table_calls_are_audited(km: KeyManager, database_url: str) -> None:
    await km.put_secrets("google", [("a", "AIza-1"), ("b", "AIza-2")], actor="importer")
    assert await km.get_secret("google", "a", actor="reader") == "AIza-1"
    await km.flush_audit()
    log = await rows(database_url)
    assert [(r["event_type"], r["actor"], json.loads(r["metadata"])) for r in log] == [
        ("encrypt", "importer", {"context": "secret:a"}),
        ("encrypt", "importer", {"context": "secret:b"}),
        ("decrypt", "reader", {"context": "secret:a"}),
    ]


async def test_legacy_decrypt_is_audited(settings: Settings, database_url: str) -> None:
    blob = legacy.encrypt("sk-old-value", MASTER_KEY)
    async with KeyManager(settings) as km:
        await km.encrypt("openai", "sk-new")  # the scope exists
        await store_legacy_secret(database_url, "openai", "old", blob)  # opens only through its row
        assert await km.decrypt("openai", blob, context="secret:old") == "sk-old-value"
    (row,) = [r for r in await rows(database_url) if r["event_type"] != "encrypt"]
    assert row["event_type"] == "decrypt" and row["key_version"] is None
    assert json.loads(row["metadata"]) == {"format": "legacy"}


async def test_caller_from_kwargs_context_and_default(env: dict[str, str], database_url: str) -> None:
    async with KeyManager.from_env({**env, "KEYROTOR_DEFAULT_ACTOR": "svc-default"}) as km:
        token = await km.encrypt("openai", OPENAI)
        with actor_context("user:42", ip="203.0.113.9", user_agent="app/1.0") as caller:
            assert current_caller() == caller
            await km.decrypt("openai", token)
            await km.decrypt("openai", token, actor="override")  # ip and agent still from the context
            with actor_context("inner"):
                await km.decrypt("openai", token)
            await km.decrypt("openai", token)
        assert current_caller() is None

        async def task(name: str) -> None:
            with actor_context(name):
                await asyncio.sleep(0.01)  # interleave: each task keeps its own caller
                await km.decrypt("openai", token)

        await asyncio.gather(task("t1"), task("t2"))
    who = [(r["actor"], r["ip_address"], r["user_agent"]) for r in await rows(database_url)]
    assert who[:5] == [
        ("svc-default", None, None),
        ("user:42", "203.0.113.9", "app/1.0"),
        ("override", "203.0.113.9", "app/1.0"),
        ("inner", None, None),
        ("user:42", "203.0.113.9", "app/1.0"),
    ]
    assert sorted(w[0] for w in who[5:]) == ["t1", "t2"]


@pytest.mark.parametrize("actor", ["", " padded", "x" * 201, "tab\there", "*"])
async def test_bad_actor_is_refused(km: KeyManager, actor: str) -> None:
    with pytest.raises(InvalidInput):
        await km.encrypt("openai", OPENAI, actor=actor)
    with pytest.raises(InvalidInput), actor_context(actor):
        pass


async def test_odd_text_is_stored_safely(km: KeyManager, database_url: str) -> None:
    token = await km.encrypt("openai", OPENAI)
    await km.decrypt(
        "openai", token, actor="ünïcødé", ip="::1", user_agent="agent\x00with NUL \udcff" + "x" * 900
    )
    await km.flush_audit()
    row = (await rows(database_url))[-1]
    assert row["actor"] == "ünïcødé"
    assert "\x00" not in row["user_agent"] and len(row["user_agent"]) == 512
    assert (await verify(km)).ok


async def test_audit_off_writes_nothing(env: dict[str, str], database_url: str) -> None:
    async with KeyManager.from_env({**env, "KEYROTOR_AUDIT": "off"}) as km:
        assert km.audit is None
        await km.decrypt("openai", await km.encrypt("openai", OPENAI))
    assert await rows(database_url) == []


async def test_close_flushes_everything(settings: Settings, database_url: str) -> None:
    s = settings.model_copy(
        update={"audit_flush_interval_s": 30.0, "audit_batch_size": 5_000, "audit_mode": "async"}
    )
    km = KeyManager(s)
    await km.open()
    token = await km.encrypt("openai", OPENAI)
    for _ in range(777):
        await km.decrypt("openai", token)
    assert len(await rows(database_url)) == 0  # nothing reached the batch size or the interval yet
    await km.close()
    assert len(await rows(database_url)) == 778


async def test_nothing_secret_in_any_column(km: KeyManager, database_url: str) -> None:
    plaintexts = [ANTHROPIC, OPENAI, "AIza-" + "G" * 35, "short-but-secret-7"]
    tokens = []
    for i, value in enumerate(plaintexts):
        with actor_context(f"user:{i}", ip="198.51.100.7"):
            token = await km.encrypt("tenant-1/openai", value, context=f"row:{i}")
            tokens.append(token)
            assert await km.decrypt("tenant-1/openai", token, context=f"row:{i}") == value
            with pytest.raises(DecryptionFailed):
                await km.decrypt("tenant-1/openai", token, context="wrong")
            with pytest.raises(DecryptionFailed):
                await km.decrypt("tenant-1/openai", token[:-4] + "AAAA", context=f"row:{i}")
    await km.put_secret("anthropic", "prod", ANTHROPIC)
    assert await km.get_secret("anthropic", "prod") == ANTHROPIC
    blob = legacy.encrypt(plaintexts[3], MASTER_KEY)
    await store_legacy_secret(database_url, "anthropic", "old", blob)  # opens only through its row
    assert await km.decrypt("anthropic", blob, context="secret:old") == plaintexts[3]
    await km.flush_audit()

    conn = await asyncpg.connect(database_url)
    try:
        dump = "\n".join(
            [r[0] for r in await conn.fetch("SELECT t::text FROM encryption_audit_log t")]
            + [
                r[0]
                for r in await conn.fetch(
                    "SELECT encode(prev_hash, 'hex') || encode(row_hash, 'hex') FROM encryption_audit_log"
                )
            ]
        )
        wrapped = [bytes(r[0]) for r in await conn.fetch("SELECT encrypted_dek FROM data_keys")]
    finally:
        await conn.close()
    assert dump.count("\n") > 20
    forbidden = [*plaintexts, MASTER_KEY, *tokens, blob]
    forbidden += [w.hex() for w in wrapped] + [base64.b64encode(w).decode() for w in wrapped]
    for secret in forbidden:
        assert secret not in dump
        assert secret[:24] not in dump
    assert hashlib.sha256(MASTER_KEY.encode()).hexdigest() not in dump


# --- the chain -----------------------------------------------------------------------------


def test_canonical_form_is_a_copy_text_line() -> None:
    when = datetime(2026, 1, 2, 3, 4, 5, 678901, tzinfo=UTC)
    got = canonical(7, "decrypt", "tenant-1/x", 3, True, "ü\tser\\", None, "", None, when, '{"a":1}')
    assert (
        got
        == "kra1\t7\tdecrypt\ttenant-1/x\t3\tt\tü\\tser\\\\\t\\N\t\t\\N\t"
        '{"a":1}\t2026-01-02 03:04:05.678901+00'.encode()
    )
    event = AuditEvent(
        "decrypt",
        scope="tenant-1/x",
        key_version=3,
        actor="ü\tser\\",
        user_agent="",
        created_at=when,
        metadata={"a": 1},
    )
    # An event's actor is stored printable: its tab is kept as the two characters of its escape.
    stored = canonical(7, "decrypt", "tenant-1/x", 3, True, "ü\\tser\\", None, "", None, when, '{"a":1}')
    assert stored == got.replace(b"\\t", b"\\\\t")
    assert chain_hash(GENESIS, event, 7) == hashlib.sha256(GENESIS + stored).digest()


async def test_write_event_in_the_callers_transaction(km: KeyManager, database_url: str) -> None:
    # The jobs' API: commits or rolls back with the caller's change.
    async with db.transaction(km.sessions) as session:
        await write_event(
            session, AuditEvent("rotate", scope="openai", key_version=2, actor="worker", metadata={"run": 5})
        )
    with pytest.raises(RuntimeError):
        async with db.transaction(km.sessions) as session:
            await write_event(session, AuditEvent("rewrap", scope="openai"))
            raise RuntimeError("the job failed")
    async with db.transaction(km.sessions) as session:
        await record_config_change(
            session, "ops", "policy", {"interval_days": 90}, {"interval_days": 30}, scope="openai"
        )
        with pytest.raises(InvalidInput):
            await write_event(session, AuditEvent("nonsense"))  # type: ignore[arg-type]
    log = await rows(database_url)
    assert [r["event_type"] for r in log] == ["rotate", "config_change"]
    assert json.loads(log[1]["metadata"])["after"] == {"interval_days": 30}


async def test_metadata_round_trips_exactly(km: KeyManager) -> None:
    weird = {
        "float": 0.1,
        "big": 1e300,
        "neg_zero": -0.0,
        "nan": float("nan"),
        "int_keys": {1: "one", 10: "ten", 2: "two"},
        "nested": [1, "two", None, True, {"z": 1, "a": [2.5]}],
        "nul": "a\x00b",
        "surrogate": "\udcff",
        "when": datetime(2026, 1, 1, tzinfo=UTC),
        "set": {3},
    }
    async with db.transaction(km.sessions) as session:
        await write_event(session, AuditEvent("replica_check", metadata=weird, key_version=2**40))
    assert (await verify(km)).ok


async def _some_events(km: KeyManager, n: int = 8) -> None:
    token = await km.encrypt("openai", OPENAI)
    for i in range(n - 1):
        await km.decrypt("openai", token, actor=f"user:{i}")
    await km.flush_audit()


async def test_verify_clean_chain(km: KeyManager) -> None:
    await _some_events(km)
    report = await verify(km)
    assert report.ok and report.checked == 8 and report.first_id == 1 and report.head_id == 8
    assert report.head_hash and len(report.head_hash) == 64


async def test_verify_empty_chain(km: KeyManager) -> None:
    report = await verify_chain(km.sessions)
    assert report.ok and report.checked == 0 and report.head_id is None


async def test_guard_refuses_plain_update_and_delete(km: KeyManager, database_url: str) -> None:
    await _some_events(km, 2)
    conn = await asyncpg.connect(database_url)
    try:
        for sql in (
            "UPDATE encryption_audit_log SET actor = 'x'",
            "DELETE FROM encryption_audit_log",
            "TRUNCATE encryption_audit_log",
        ):
            with pytest.raises(asyncpg.InsufficientPrivilegeError):
                await conn.execute(sql)
    finally:
        await conn.close()


async def test_verify_detects_an_edited_row(km: KeyManager, database_url: str) -> None:
    await _some_events(km)
    await tamper(database_url, "UPDATE encryption_audit_log SET actor = 'someone-else' WHERE id = 5")
    report = await verify(km)
    assert not report.ok
    assert (report.bad_id, report.problem) == (5, "edited")


async def test_verify_detects_an_edited_and_rehashed_row(km: KeyManager, database_url: str) -> None:
    await _some_events(km)
    r = (await rows(database_url, "id = 4"))[0]
    forged = hashlib.sha256(
        bytes(r["prev_hash"])
        + canonical(
            4,
            r["event_type"],
            r["scope"],
            r["key_version"],
            r["success"],
            "forger",
            r["ip_address"],
            r["user_agent"],
            r["error_message"],
            r["created_at"],
            r["metadata"],
        )
    ).digest()
    await tamper(
        database_url,
        f"UPDATE encryption_audit_log SET actor = 'forger', row_hash = '\\x{forged.hex()}' WHERE id = 4",
    )
    report = await verify(km)
    assert (report.ok, report.bad_id, report.problem) == (False, 4, "edited")


async def test_verify_detects_a_deleted_row(km: KeyManager, database_url: str) -> None:
    await _some_events(km)
    await tamper(database_url, "DELETE FROM encryption_audit_log WHERE id = 4")
    report = await verify(km)
    assert (report.ok, report.bad_id, report.problem) == (False, 4, "deleted")
    assert "3 to 5" in (report.detail or "")


async def test_verify_detects_a_swapped_pair(km: KeyManager, database_url: str) -> None:
    await _some_events(km)
    await tamper(
        database_url,
        "UPDATE encryption_audit_log SET id = 1000000 WHERE id = 5",
        "UPDATE encryption_audit_log SET id = 5 WHERE id = 6",
        "UPDATE encryption_audit_log SET id = 6 WHERE id = 1000000",
    )
    report = await verify(km)
    assert (report.ok, report.bad_id, report.problem) == (False, 5, "reordered")
    assert "written as row 6" in (report.detail or "")


async def test_verify_detects_deleted_oldest_rows_without_anchor(km: KeyManager, database_url: str) -> None:
    await _some_events(km)
    await tamper(database_url, "DELETE FROM encryption_audit_log WHERE id <= 2")
    report = await verify(km)
    assert (report.ok, report.bad_id, report.problem) == (False, 3, "deleted")


async def _upgraded_install(settings: Settings, database_url: str) -> None:
    """Three rows written before the audit key existed, then a KeyManager (it creates the key:
    switch point 3) and three keyed rows."""
    engine = db.create_engine(database_url)
    try:
        async with db.transaction(db.sessionmaker(engine)) as session:
            for i in range(3):
                await write_event(session, AuditEvent("config_change", actor=f"old:{i}"))
    finally:
        await engine.dispose()
    async with KeyManager(settings) as km:
        await _some_events(km, 3)


@pytest.mark.parametrize(("cut_from", "bad_id"), [(3, 3), (1, 1)])
async def test_verify_detects_a_chain_cut_below_the_audit_keys_switch_point(
    settings: Settings, database_url: str, cut_from: int, bad_id: int
) -> None:
    # The keyed tail and older rows deleted: what is left is unkeyed and hashes rightly, but the
    # audit key's wrap binds switch point 3, so rows 1..3 existed when it was made.
    await _upgraded_install(settings, database_url)
    async with KeyManager(settings) as km:
        report = await verify(km)
        assert report.ok and report.switch_after == 3 and report.keyed == 3, report
        await tamper(database_url, f"DELETE FROM encryption_audit_log WHERE id >= {cut_from}")
        report = await verify(km)
    assert (report.ok, report.bad_id, report.problem) == (False, bad_id, "downgraded"), report
    assert report.detail is not None and "switch point 3" in report.detail
    assert "\n" not in report.detail


async def test_checkpoint_catches_deleted_newest_rows(km: KeyManager, database_url: str) -> None:
    await _some_events(km)
    head = await verify(km)
    checkpoint = parse_checkpoint(f"{head.head_id}:{head.head_hash}")
    assert (await verify(km, checkpoint=checkpoint)).ok
    await tamper(database_url, "DELETE FROM encryption_audit_log WHERE id >= 7")
    assert (await verify(km)).ok  # the chain alone cannot tell
    report = await verify(km, checkpoint=checkpoint)
    assert (report.ok, report.problem) == (False, "deleted")
    with pytest.raises(InvalidInput):
        parse_checkpoint("8:nothex")


async def test_verify_pages_through_a_long_chain(km: KeyManager, database_url: str) -> None:
    token = await km.encrypt("openai", OPENAI)
    for _ in range(2_500):
        await km.decrypt("openai", token)
    report = await verify(km, page_rows=300)
    assert report.ok and report.checked == 2_501
    await tamper(database_url, "UPDATE encryption_audit_log SET success = false WHERE id = 2222")
    assert (await verify(km, page_rows=300)).bad_id == 2222


async def _old_events(km: KeyManager, n: int) -> None:
    """``n`` decrypt events dated 400 days ago, a minute apart: old enough for a 365-day prune."""
    old = datetime.now(UTC) - timedelta(days=400)
    async with db.transaction(km.sessions) as session:
        await write_event(
            session,
            *(
                AuditEvent("decrypt", scope="openai", actor="old", created_at=old + timedelta(minutes=i))
                for i in range(n)
            ),
        )


def _prune_once(database_url: str, before: datetime, into: list[PruneResult]) -> Callable[[int], None]:
    """An ``on_progress`` that, after the first page, runs a prune by another client (its own
    loop and engine) to its end: a prune that commits between two pages of a verify."""

    def after_page(_rows: int) -> None:
        if into:
            return

        async def other_client() -> None:
            engine = db.create_engine(database_url, pool_size=1)
            try:
                into.append(await prune(db.sessionmaker(engine), before, actor="ops"))
            finally:
                await engine.dispose()

        thread = threading.Thread(target=asyncio.run, args=(other_client(),))
        thread.start()
        thread.join(60)
        assert not thread.is_alive(), "the prune did not finish"

    return after_page


async def test_verify_holds_when_a_prune_runs_while_it_walks(km: KeyManager, database_url: str) -> None:
    # A long verify pages through the chain one transaction a page; a retention prune that
    # commits between two pages removes rows ahead of the walk and anchors them after the head.
    await _old_events(km, 6)  # ids 1-6, old enough to prune
    await _some_events(km, 4)  # ids 7-10
    pruned: list[PruneResult] = []
    cutoff = datetime.now(UTC) - timedelta(days=365)
    report = await verify(km, page_rows=2, on_progress=_prune_once(database_url, cutoff, pruned))
    assert [(p.deleted, p.through_id) for p in pruned] == [(6, 6)]
    assert report.ok and report.head_id == 11 and report.checked == 7, report
    # A gap no anchor vouches for is still a deletion.
    await tamper(database_url, "DELETE FROM encryption_audit_log WHERE id = 8")
    report = await verify(km, page_rows=2)
    assert (report.ok, report.bad_id, report.problem) == (False, 8, "deleted"), report


async def test_verify_holds_when_a_prune_runs_while_it_walks_a_pruned_chain(
    km: KeyManager, database_url: str
) -> None:
    # Retention that prunes daily: the walk starts after an earlier prune (its anchor not
    # reached yet) when the next one commits.
    await _old_events(km, 6)  # ids 1-6
    fourth = (await rows(database_url, "id = 4"))[0]["created_at"]
    assert (await prune(km.sessions, fourth, actor="ops")).through_id == 3  # anchor: id 7
    await _some_events(km, 4)  # ids 8-11
    pruned: list[PruneResult] = []
    cutoff = datetime.now(UTC) - timedelta(days=365)
    report = await verify(km, page_rows=2, on_progress=_prune_once(database_url, cutoff, pruned))
    assert [(p.deleted, p.through_id, p.anchor_id) for p in pruned] == [(3, 6, 12)]
    assert report.ok and report.anchored and report.head_id == 12, report


async def test_prune_keeps_the_rest_verifiable(km: KeyManager, database_url: str) -> None:
    await _old_events(km, 6)
    await _some_events(km, 4)
    result = await prune(km.sessions, datetime.now(UTC) - timedelta(days=365), actor="ops")
    assert (result.deleted, result.through_id, result.anchor_id) == (6, 6, 11)
    log = await rows(database_url)
    assert [r["id"] for r in log] == [7, 8, 9, 10, 11]
    anchor = json.loads(log[-1]["metadata"])
    assert log[-1]["event_type"] == "anchor" and log[-1]["actor"] == "ops"
    assert anchor["pruned_through_id"] == 6 and anchor["pruned_rows"] == 6
    assert anchor["pruned_head_hash"] == bytes(log[0]["prev_hash"]).hex()
    report = await verify(km)
    assert report.ok and report.anchored and report.first_id == 7

    # nothing older left: a second prune does nothing
    assert (await prune(km.sessions, datetime.now(UTC) - timedelta(days=365), actor="ops")).deleted == 0
    # and deleting more of the head is still caught
    await tamper(database_url, "DELETE FROM encryption_audit_log WHERE id = 7")
    assert (await verify(km)).problem == "deleted"


@pytest.mark.parametrize(
    "attack",
    [
        "UPDATE encryption_audit_log SET actor = 'innocent' WHERE id = 3",  # edited
        "DELETE FROM encryption_audit_log WHERE id = 4",  # a gap
        "DELETE FROM encryption_audit_log WHERE id <= 2",  # oldest rows gone, no anchor
    ],
)
async def test_prune_refuses_to_launder_a_broken_prefix(
    km: KeyManager, database_url: str, attack: str
) -> None:
    # Rows 1-6 are old enough to prune, 7-10 are not. Someone with the database edits or deletes
    # an old row; verify sees it. A routine prune must not delete the evidence and anchor the
    # rest, which would make the chain verify again.
    await _old_events(km, 6)
    await _some_events(km, 4)
    await tamper(database_url, attack)
    assert not (await verify(km)).ok
    before = [r["id"] for r in await rows(database_url)]
    with pytest.raises(Conflict, match="audit verify"):
        await prune(km.sessions, datetime.now(UTC) - timedelta(days=365), actor="ops")
    assert [r["id"] for r in await rows(database_url)] == before  # nothing deleted, no anchor
    assert not (await verify(km)).ok


async def test_a_second_prune_finds_the_first_prunes_anchor(km: KeyManager, database_url: str) -> None:
    # The first prune's anchor is newer than the rows the second deletes: the second prune
    # still finds that the chain's start is vouched for.
    now = datetime.now(UTC)
    async with db.transaction(km.sessions) as session:
        await write_event(
            session,
            *(
                AuditEvent("decrypt", scope="openai", actor="old", created_at=now - timedelta(days=400 - i))
                for i in range(6)
            ),
            *(
                AuditEvent("decrypt", scope="openai", actor="old", created_at=now - timedelta(days=300 - i))
                for i in range(3)
            ),
        )
    first = await prune(km.sessions, now - timedelta(days=365), actor="ops")
    assert (first.deleted, first.anchor_id) == (6, 10)
    second = await prune(km.sessions, now - timedelta(days=250), actor="ops")
    assert (second.deleted, second.through_id, second.anchor_id) == (3, 9, 11)
    report = await verify(km)
    assert report.ok and report.anchored and report.first_id == 10


async def test_prune_everything_then_keep_writing(km: KeyManager) -> None:
    await _some_events(km, 3)
    result = await prune(km.sessions, datetime.now(UTC) + timedelta(days=1), actor="ops")
    assert result.deleted == 3 and result.anchor_id == 4
    await _some_events(km, 2)
    report = await verify(km)
    assert report.ok and report.anchored and report.checked == 3


# --- reading -------------------------------------------------------------------------------


async def test_query_filters_and_pages(km: KeyManager) -> None:
    t1 = await km.encrypt("tenant-1/openai", OPENAI)
    t2 = await km.encrypt("tenant-2/openai", OPENAI)
    for i in range(5):
        await km.decrypt("tenant-1/openai", t1, actor=f"a{i % 2}")
        await km.decrypt("tenant-2/openai", t2, actor="b")
    await km.flush_audit()
    async with db.transaction(km.sessions) as session:
        everything = await query_events(session, AuditQuery(limit=1000))
        tenant1 = await query_events(session, AuditQuery.parse(scope="tenant-1/*", event="decrypt"))
        a0 = await query_events(session, AuditQuery.parse(actor="a0"))
        page1 = await query_events(session, AuditQuery.parse(limit="4"))
        page2 = await query_events(session, AuditQuery.parse(limit=4, after_id=page1[-1]["id"]))
        none_yet = await query_events(session, AuditQuery.parse(since="2999-01-01"))
        recent = await query_events(session, AuditQuery.parse(since="1h", until="now"))
        last = await tail_events(session, 3)
    assert len(everything) == 12
    assert len(tenant1) == 5 and {e["scope"] for e in tenant1} == {"tenant-1/openai"}
    assert len(a0) == 3
    assert [e["id"] for e in page1 + page2] == list(range(1, 9))
    assert none_yet == [] and len(recent) == 12
    assert [e["id"] for e in last] == [10, 11, 12]


@pytest.mark.parametrize(
    "kwargs",
    [
        {"event": "decrypted"},
        {"since": "yesterday"},
        {"until": "2026-13-01"},
        {"limit": "0"},
        {"limit": "x"},
        {"scope": "Bad/*"},
    ],
)
def test_query_rejects_bad_input(kwargs: dict[str, str]) -> None:
    with pytest.raises(InvalidInput):
        AuditQuery.parse(**kwargs)


def test_parse_time() -> None:
    now = datetime(2026, 5, 1, 12, 0, tzinfo=UTC)
    assert parse_time("2026-01-31", now=now) == datetime(2026, 1, 31, tzinfo=UTC)
    assert parse_time("2026-01-31T10:00:00Z", now=now) == datetime(2026, 1, 31, 10, tzinfo=UTC)
    assert parse_time("2026-01-31T10:00:00+02:00", now=now) == datetime(2026, 1, 31, 8, tzinfo=UTC)
    assert parse_time("7d", now=now) == now - timedelta(days=7)
    assert parse_time("90s", now=now) == now - timedelta(seconds=90)
    assert parse_time("now", now=now) == now
    assert set(EVENT_TYPES) >= {"anchor", "decrypt"}


async def test_a_closed_manager_does_not_decrypt_unaudited(settings: Settings) -> None:
    km = KeyManager(settings)
    await km.open()
    token = await km.encrypt("openai", OPENAI)
    await km.close()
    with pytest.raises(ConfigurationError):
        await km.decrypt("openai", token)


async def test_caller_fields_carry_no_control_characters_into_the_log(
    km: KeyManager, database_url: str
) -> None:
    # An IP or a User-Agent comes from the network: a newline or a terminal escape in one must
    # not reach the stored row (a forged line in `audit tail`, a recoloured terminal).
    token = await km.encrypt("openai", "sk-" + "x" * 40)
    forged = "1.2.3.4\n2026-01-01T00:00:00.000000Z #1 decrypt openai actor=admin ok"
    agent = "curl/8\r\x1b[2K\x1b[31mok\t\x07" + "A" * 5000
    await km.decrypt("openai", token, actor="edge", ip=forged, user_agent=agent)
    with actor_context("edge-ctx", ip="\x1b]0;title\x07", user_agent="ua\x85\u2028x"):
        await km.decrypt("openai", token)
    async with db.transaction(km.sessions) as session:
        await write_event(session, AuditEvent("config_change", actor="job\nname", ip_address="\x00\x7f"))
    await km.flush_audit()
    found = await rows(database_url, "actor LIKE 'edge%' OR actor LIKE 'job%'")
    assert len(found) == 3
    for row in found:
        for column in ("actor", "ip_address", "user_agent"):
            value = row[column]
            assert value is None or value.isprintable(), (column, value)
            assert value is None or len(value) <= 512
    assert found[0]["ip_address"].startswith("1.2.3.4\\n2026")  # escaped, still legible
    assert (await verify(km)).ok
