"""``keyrotor audit ...`` and ``keyrotor grant/revoke/grants`` end to end: real processes, real Postgres."""

from __future__ import annotations

import json
import os
import queue
import subprocess
import threading
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from keyrotor import KeyManager, Settings
from keyrotor.audit.log import AuditEvent, write_event
from keyrotor.store import db
from tests.cli_helpers import BIN, ROOT, keyrotor
from tests.keyrotor.audit_helpers import rows, tamper

OPENAI = "sk-proj-" + "c1Z" * 16


def assert_one_line_error(proc: subprocess.CompletedProcess[str], code: int) -> None:
    assert proc.returncode == code, (proc.stdout, proc.stderr)
    err = proc.stderr.strip()
    assert "Traceback" not in err
    assert len(err.splitlines()) == 1, err
    assert err.startswith("keyrotor: error: ")


async def _events(settings: Settings, n: int = 5) -> None:
    async with KeyManager(settings) as km:
        token = await km.encrypt("tenant-1/openai", OPENAI, actor="writer")
        for i in range(n):
            await km.decrypt("tenant-1/openai", token, actor=f"reader-{i % 2}")


def test_grants_round_trip(env: dict[str, str]) -> None:
    listed = keyrotor("grants", "--json", env=env)
    assert listed.returncode == 0, listed.stderr
    assert [
        (g["actor"], g["scope"], g["encrypt"], g["decrypt"]) for g in json.loads(listed.stdout)["grants"]
    ] == [("*", "*", True, True)]
    granted = keyrotor("grant", "alice", "tenant-42/*", "--decrypt", "--as", "ops-bob", "--json", env=env)
    assert granted.returncode == 0, granted.stderr
    assert json.loads(granted.stdout)["decrypt"] is True
    assert keyrotor("revoke", "*", "*", env=env).returncode == 0
    table = keyrotor("grants", env=env)
    assert table.returncode == 0 and "alice" in table.stdout and "tenant-42/*" in table.stdout
    assert_one_line_error(keyrotor("revoke", "nobody", "openai", env=env), 2)
    assert_one_line_error(keyrotor("grant", "alice", "Bad Scope", "--decrypt", env=env), 2)
    assert_one_line_error(keyrotor("grant", "alice", "openai", env=env), 2)  # neither permission

    changes = keyrotor("audit", "query", "--event", "config_change", "--json", env=env)
    events = json.loads(changes.stdout)["events"]
    assert [(e["actor"], e["metadata"]["what"]) for e in events] == [
        ("ops-bob", "grant"),
        ("system", "revoke"),
    ]


def test_grant_commands_print_actor_names_as_written(env: dict[str, str]) -> None:
    """Actors are any printable text; the grant commands print them as text, never as console
    markup: a name with brackets must neither fail a change that was made (exit 1 after the
    commit) nor break `keyrotor grants` for everyone, nor show as another name."""
    for actor in ("svc[/x]", "[red]ops"):
        granted = keyrotor("grant", actor, "openai", "--decrypt", env=env)
        assert granted.returncode == 0, granted.stderr
        assert f"granted: {actor} on openai: decrypt" in granted.stderr
    table = keyrotor("grants", env=env)
    assert table.returncode == 0, table.stderr
    assert "svc[/x]" in table.stdout and "[red]ops" in table.stdout
    revoked = keyrotor("revoke", "svc[/x]", "openai", env=env)
    assert revoked.returncode == 0, revoked.stderr
    assert "revoked svc[/x] on openai" in revoked.stderr
    locked = keyrotor("lock-down", "--grant", "[red]ops:openai:decrypt,encrypt", env=env)
    assert locked.returncode == 0, locked.stderr
    assert "granted: [red]ops on openai: encrypt+decrypt" in locked.stderr
    listed = keyrotor("grants", "--json", env=env)
    assert [(g["actor"], g["encrypt"]) for g in json.loads(listed.stdout)["grants"]] == [("[red]ops", True)]


async def test_denied_by_cli_grants(env: dict[str, str], settings: Settings, database_url: str) -> None:
    assert keyrotor("revoke", "*", "*", env=env).returncode == 0
    assert keyrotor("grant", "alice", "openai", "--encrypt", "--decrypt", env=env).returncode == 0
    put = keyrotor("secrets", "put", "openai", "prod", env=env, stdin=OPENAI)
    assert_one_line_error(put, 1)  # the CLI's default actor has no grant
    assert "may not encrypt" in put.stderr
    assert OPENAI not in put.stderr
    ok = keyrotor(
        "secrets", "put", "openai", "prod", env={**env, "KEYROTOR_DEFAULT_ACTOR": "alice"}, stdin=OPENAI
    )
    assert ok.returncode == 0, ok.stderr
    log = await rows(database_url, "event_type IN ('unauthorized', 'encrypt')")
    assert [(r["event_type"], r["actor"]) for r in log] == [("unauthorized", "system"), ("encrypt", "alice")]


async def test_tail_and_query(env: dict[str, str], settings: Settings) -> None:
    await _events(settings, 5)
    tail = keyrotor("audit", "tail", "-n", "3", env=env)
    assert tail.returncode == 0, tail.stderr
    lines = tail.stdout.splitlines()
    assert len(lines) == 3 and all("decrypt" in line and "tenant-1/openai" in line for line in lines)
    assert "#6" in lines[-1]
    jl = keyrotor("audit", "tail", "-n", "2", "--json", env=env)
    assert [json.loads(line)["id"] for line in jl.stdout.splitlines()] == [5, 6]

    q = keyrotor(
        "audit", "query", "--event", "decrypt", "--scope", "tenant-1/*", "--actor", "reader-0",
        "--since", "2000-01-01", "--until", "2999-01-01T00:00:00Z", "--json", env=env,
    )  # fmt: skip
    assert q.returncode == 0, q.stderr
    events = json.loads(q.stdout)["events"]
    assert len(events) == 3 and {e["actor"] for e in events} == {"reader-0"}
    human = keyrotor("audit", "query", "--actor", "writer", env=env)
    assert human.returncode == 0 and "encrypt" in human.stdout and "1 event(s)" in human.stderr
    paged = json.loads(
        keyrotor("audit", "query", "--limit", "2", "--after-id", "2", "--json", env=env).stdout
    )
    assert [e["id"] for e in paged["events"]] == [3, 4] and paged["next_after_id"] == 4


@pytest.mark.parametrize(
    "args",
    [
        ("audit", "query", "--since", "last tuesday"),
        ("audit", "query", "--until", "2026-02-30"),
        ("audit", "query", "--event", "decrypted"),
        ("audit", "query", "--scope", "UPPER"),
        ("audit", "query", "--limit", "0"),
        ("audit", "prune", "--before", "someday"),
        ("audit", "query", "--since", "999999d"),
        ("audit", "query", "--until", "9999-12-31T23:59:59-05:00"),
        ("audit", "prune", "--before", "999999999w"),
        ("audit", "verify", "--checkpoint", "12:zz"),
    ],
)
def test_bad_input_is_one_line_exit_2(env: dict[str, str], args: tuple[str, ...]) -> None:
    assert_one_line_error(keyrotor(*args, env=env), 2)


@pytest.mark.parametrize(
    "line",
    [
        "not json",
        '{"format": "krcp1", "head_id": 1e999, "head_hash": "", "rows": 0, "at": "", "key_id": 1, "mac": ""}',
        '{"format": "krcp1", "head_id": 1, "head_hash": "", "rows": 0, "at": "", "key_id": 1e999, "mac": ""}',
    ],
)
def test_a_malformed_checkpoint_file_is_one_line_exit_2(
    env: dict[str, str], tmp_path: Path, line: str
) -> None:
    path = tmp_path / "checkpoints.jsonl"
    path.write_text(line + "\n")
    assert_one_line_error(keyrotor("audit", "verify", "--checkpoint-file", str(path), env=env), 2)


async def test_verify_exit_codes(env: dict[str, str], settings: Settings, database_url: str) -> None:
    await _events(settings, 5)
    ok = keyrotor("audit", "verify", env=env)
    assert ok.returncode == 0, ok.stderr
    assert "audit chain OK: 6 rows" in ok.stdout
    doc = json.loads(keyrotor("audit", "verify", "--json", env=env).stdout)
    assert doc["ok"] is True and doc["head_id"] == 6
    checkpoint = f"{doc['head_id']}:{doc['head_hash']}"
    assert keyrotor("audit", "verify", "--checkpoint", checkpoint, env=env).returncode == 0

    await tamper(database_url, "UPDATE encryption_audit_log SET actor = 'innocent' WHERE id = 4")
    bad = keyrotor("audit", "verify", env=env)
    assert bad.returncode == 1
    assert "BROKEN at row 4 (edited)" in bad.stdout
    bad_json = json.loads(keyrotor("audit", "verify", "--json", env=env).stdout)
    assert (bad_json["ok"], bad_json["bad_id"], bad_json["problem"]) == (False, 4, "edited")


async def test_verify_warns_when_no_audit_key_vouches_for_the_rows(
    env: dict[str, str], settings: Settings, database_url: str
) -> None:
    # A database writer deletes the audit key and rewrites every row in the unkeyed format, an
    # actor changed: the chain alone verifies (it looks like a log older than the key), so
    # verify says that only a checkpoint can tell.
    from keyrotor.audit.chain import GENESIS, chain_records
    from keyrotor.audit.events import to_us

    await _events(settings, 3)
    ok = keyrotor("audit", "verify", env=env)
    assert ok.returncode == 0 and "warning" not in ok.stderr, ok.stderr
    found = await rows(database_url)
    forged = [
        (
            r["event_type"],
            r["scope"],
            r["key_version"],
            r["success"],
            "innocent" if r["actor"] == "reader-1" else r["actor"],
            r["ip_address"],
            r["user_agent"],
            r["error_message"],
            r["metadata"],
            to_us(r["created_at"]),
        )
        for r in found
    ]
    records = chain_records(0, GENESIS, forged)
    await tamper(
        database_url,
        "DELETE FROM audit_keys",
        *(
            f"UPDATE encryption_audit_log SET actor = {'NULL' if rec[5] is None else repr(rec[5])}, "
            f"prev_hash = '\\x{rec[11].hex()}', row_hash = '\\x{rec[12].hex()}', audit_key_id = NULL "
            f"WHERE id = {rec[0]}"
            for rec in records
        ),
    )
    forged_ok = keyrotor("audit", "verify", env=env)
    assert forged_ok.returncode == 0, forged_ok.stdout + forged_ok.stderr
    assert "(0 keyed)" in forged_ok.stdout
    assert "no audit key and no keyed row" in forged_ok.stderr and "--checkpoint-file" in forged_ok.stderr


async def test_verify_fails_a_chain_cut_below_the_audit_keys_switch_point(
    env: dict[str, str], settings: Settings, database_url: str
) -> None:
    # An install upgraded from before the audit key: rows 1-2 unkeyed, the key's switch point 2.
    engine = db.create_engine(database_url)
    try:
        async with db.transaction(db.sessionmaker(engine)) as session:
            await write_event(session, AuditEvent("config_change", actor="old:1"))
            await write_event(session, AuditEvent("config_change", actor="old:2"))
    finally:
        await engine.dispose()
    await _events(settings, 2)
    assert keyrotor("audit", "verify", env=env).returncode == 0
    # The keyed rows and row 2 deleted: row 1 alone still hashes rightly.
    await tamper(database_url, "DELETE FROM encryption_audit_log WHERE id >= 2")
    bad = keyrotor("audit", "verify", env=env)
    assert bad.returncode == 1, bad.stdout + bad.stderr
    assert "Traceback" not in bad.stderr
    assert bad.stdout.count("\n") == 1 and "BROKEN at row 2 (downgraded)" in bad.stdout, bad.stdout
    assert "switch point 2" in bad.stdout
    doc = json.loads(keyrotor("audit", "verify", "--json", env=env).stdout)
    assert (doc["ok"], doc["bad_id"], doc["problem"]) == (False, 2, "downgraded")


async def test_verify_names_a_deleted_row(env: dict[str, str], settings: Settings, database_url: str) -> None:
    await _events(settings, 5)
    await tamper(database_url, "DELETE FROM encryption_audit_log WHERE id = 3")
    bad = keyrotor("audit", "verify", "--json", env=env)
    assert bad.returncode == 1
    assert (json.loads(bad.stdout)["bad_id"], json.loads(bad.stdout)["problem"]) == (3, "deleted")


async def test_prune_writes_an_anchor_and_the_chain_still_verifies(
    env: dict[str, str], settings: Settings, database_url: str
) -> None:
    old = datetime.now(UTC) - timedelta(days=100)
    async with KeyManager(settings) as km, db.transaction(km.sessions) as session:
        await write_event(session, *(AuditEvent("decrypt", scope="openai", created_at=old) for _ in range(4)))
    await _events(settings, 2)
    pruned = keyrotor("audit", "prune", "--before", "30d", "--as", "retention-job", "--json", env=env)
    assert pruned.returncode == 0, pruned.stderr
    assert json.loads(pruned.stdout) == {"deleted": 4, "through_id": 4, "anchor_id": 8}
    log = await rows(database_url)
    assert [r["id"] for r in log] == [5, 6, 7, 8]
    assert log[-1]["event_type"] == "anchor" and log[-1]["actor"] == "retention-job"
    ok = keyrotor("audit", "verify", env=env)
    assert ok.returncode == 0, ok.stdout
    assert "anchored" in ok.stdout
    again = keyrotor(
        "audit", "prune", "--before", (datetime.now(UTC) - timedelta(days=30)).date().isoformat(), env=env
    )
    assert again.returncode == 0 and "nothing to prune" in again.stderr


async def test_tail_follow(env: dict[str, str], settings: Settings) -> None:
    # The first line printed (the newest existing event) proves the follower is running and has taken
    # its starting point; only then are the new events written. Every read has a deadline, so a
    # follower that misses an event fails the test instead of hanging the suite.
    async with KeyManager(settings) as km:
        token = await km.encrypt("tenant-1/openai", OPENAI, actor="writer")
    proc = subprocess.Popen(
        [str(BIN), "audit", "tail", "-f", "-n", "1"],
        env={"PATH": os.environ.get("PATH", ""), "PYTHONPATH": str(ROOT), **env},
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    lines: queue.Queue[str] = queue.Queue()
    assert proc.stdout is not None

    def pump() -> None:
        for line in proc.stdout or ():
            lines.put(line)

    threading.Thread(target=pump, daemon=True).start()
    try:
        first = lines.get(timeout=60)
        async with KeyManager(settings) as km:
            for i in range(2):
                await km.decrypt("tenant-1/openai", token, actor=f"reader-{i}")
        seen = [lines.get(timeout=30) for _ in range(2)]
    finally:
        proc.terminate()
        proc.wait(10)
    assert "encrypt" in first
    assert ["reader-0" in seen[0], "reader-1" in seen[1]] == [True, True]
    assert all("decrypt" in line for line in seen)


def test_serve_refuses_without_a_token(env: dict[str, str]) -> None:
    res = keyrotor("audit", "serve", "--port", "18087", env=env)
    assert_one_line_error(res, 2)
    assert "KEYROTOR_AUDIT_API_TOKEN" in res.stderr


def test_serve_answers_with_the_token(env: dict[str, str]) -> None:
    import urllib.error
    import urllib.request

    token = "cli-serve-token-" + "x" * 20
    proc = subprocess.Popen(
        [str(BIN), "audit", "serve", "--port", "18088"],
        env={
            "PATH": os.environ.get("PATH", ""),
            "PYTHONPATH": str(ROOT),
            **env,
            "KEYROTOR_AUDIT_API_TOKEN": token,
        },
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        deadline = time.monotonic() + 20
        while True:
            try:
                req = urllib.request.Request(
                    "http://127.0.0.1:18088/audit/verify", headers={"Authorization": f"Bearer {token}"}
                )
                with urllib.request.urlopen(req, timeout=5) as resp:  # noqa: S310 - local test server
                    assert json.loads(resp.read())["ok"] is True
                break
            except (urllib.error.URLError, ConnectionError):
                if time.monotonic() > deadline:
                    raise
                time.sleep(0.2)
        with pytest.raises(urllib.error.HTTPError) as info:
            urllib.request.urlopen("http://127.0.0.1:18088/audit/events", timeout=5)
        assert info.value.code == 401
        proc.terminate()  # SIGTERM: the server stops cleanly, exit 0
        assert proc.wait(10) == 0, proc.stderr.read() if proc.stderr else ""
    finally:
        proc.kill()
        proc.wait(10)
