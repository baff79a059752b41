"""``keyrotor columns list|ignore|unignore``, and the warnings of ``status``, ``health`` and the
gauge about unregistered locations: the real console script against real Postgres."""

from __future__ import annotations

import asyncio
import json
import subprocess
from typing import Any

import asyncpg
import pytest
from prometheus_client import REGISTRY

from keyrotor import KeyManager, Settings, metrics
from keyrotor.worker.cli.health import census_health, healthy
from tests.cli_helpers import keyrotor


def _json(env: dict[str, str], *args: str) -> Any:
    done = keyrotor(*args, "--json", env=env)
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout)


def _parsed(done: subprocess.CompletedProcess[str]) -> Any:
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout)


async def _run_all(env: dict[str, str], *commands: tuple[str, ...]) -> list[subprocess.CompletedProcess[str]]:
    """Run commands that only read, all at once (a thread each waits on its process)."""
    return list(await asyncio.gather(*(asyncio.to_thread(keyrotor, *c, env=env) for c in commands)))


def _coverage(doc: dict[str, Any]) -> dict[tuple[str, str], tuple[str, str]]:
    return {(v["scope"], v["display"]): (v["coverage"], v["by"]) for v in doc["locations"]}


def _fails(env: dict[str, str], *args: str) -> str:
    """Run a command that must refuse its input: exit 2 and exactly one line on stderr."""
    done = keyrotor(*args, env=env)
    assert done.returncode == 2, (done.stdout, done.stderr)
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("keyrotor: error: "), done.stderr
    return lines[0]


async def _seed(env: dict[str, str]) -> None:
    """Values of the README's example in a table nobody registered, and elsewhere."""
    conn = await asyncpg.connect(env["DATABASE_URL"])
    try:
        await conn.execute("CREATE TABLE users (id bigint PRIMARY KEY, api_key text)")
        async with KeyManager(Settings.from_env(env)) as km:
            for i in (1, 2, 3):
                token = await km.encrypt("anthropic", f"sk-ant-{i}", context=f"users.api_key:{i}")
                await conn.execute("INSERT INTO users VALUES ($1, $2)", i, token)
            await km.encrypt("anthropic", "sk-ant-nowhere")  # no context
            await km.put_secret("anthropic", "prod", "sk-ant-prod")
            await km.encrypt("openai", "sk-oa", context="orgs.key:7")
    finally:
        await conn.close()


def _gauge() -> float | None:
    return REGISTRY.get_sample_value("keyrotor_unregistered_locations")


async def test_list_ignore_unignore_and_the_warnings(env: dict[str, str]) -> None:
    await _seed(env)
    settings = Settings.from_env(env)

    # Six commands that only read what _seed wrote: started together, as each is a Python
    # start-up of 1-2 s and none changes what another reads.
    listed, text, status, status_openai, status_text, health = await _run_all(
        env,
        ("columns", "list", "--json"),
        ("columns", "list"),
        ("status", "--json"),
        ("status", "openai", "--json"),
        ("status",),
        ("health", "--json"),
    )
    doc = _parsed(listed)
    assert doc["columns"] == []
    assert _coverage(doc) == {
        ("anthropic", "(no context)"): ("unregistered", ""),
        ("anthropic", "secret"): ("keyrotor", "secrets"),
        ("anthropic", "users.api_key"): ("unregistered", ""),
        ("openai", "orgs.key"): ("unregistered", ""),
    }
    users = next(v for v in doc["locations"] if v["location"] == "users.api_key")
    assert users["encryptions"] == 3  # close() flushed the counts
    assert [(u["version"], u["state"], u["encryptions"]) for u in users["versions"]] == [(1, "active", 3)]
    assert users["last_seen"] >= users["versions"][0]["first_seen"]

    # Text: a table, and a warning that says what to run.
    assert text.returncode == 0, text.stderr
    assert "UNREGISTERED" in text.stdout and "(no context)" in text.stdout
    assert "keyrotor columns register" in text.stderr and "keyrotor columns ignore" in text.stderr

    # status and health warn; the gauge counts (no scope or location in its labels).
    status_doc = _parsed(status)
    assert [(v["scope"], v["location"]) for v in status_doc["locations"]["unregistered"]] == [
        ("anthropic", ""),
        ("anthropic", "users.api_key"),
        ("openai", "orgs.key"),
    ]
    # The README's table gets its own command.
    assert (
        "keyrotor columns register users.api_key --pk ID --scope anthropic"
        in status_doc["locations"]["warning"]
    )
    assert _parsed(status_openai)["locations"]["unregistered"][0]["location"] == "orgs.key"
    assert status_text.returncode == 0 and "3 unregistered location(s)" in status_text.stderr, (
        status_text.stderr
    )
    check = await census_health(settings)
    assert check["status"] == "warn" and "users.api_key" in check["error"]
    assert healthy({"census": check})  # a warning, not a failure
    assert json.loads(health.stdout)["checks"]["census"]["status"] == "warn"
    async with KeyManager(settings) as km:
        assert await metrics.refresh_unregistered_locations(km.sessions) == 3
    assert _gauge() == 3

    # Register the README's table; acknowledge the other two by name.
    done = keyrotor("columns", "register", "users.api_key", "--pk", "id", "--scope", "anthropic", env=env)
    assert done.returncode == 0, done.stderr
    acked = _json(
        env, "columns", "ignore", "(no context)", "--reason", "cache, rebuilt daily", "--as", "ops-alice"
    )
    assert acked["acknowledged"]["location"] == "" and acked["acknowledged"]["actor"] == "ops-alice"
    _json(env, "columns", "ignore", "orgs.key", "--reason", "test org only")
    listed, status = await _run_all(env, ("columns", "list", "--json"), ("status", "--json"))
    doc = _parsed(listed)
    assert [c["column"] for c in doc["columns"]] == ["users.api_key"]
    assert _coverage(doc) == {
        ("anthropic", "(no context)"): ("acknowledged", ""),
        ("anthropic", "secret"): ("keyrotor", "secrets"),
        ("anthropic", "users.api_key"): ("registered", "users.api_key"),
        ("openai", "orgs.key"): ("acknowledged", "orgs.key"),
    }
    assert _parsed(status)["locations"] == {"unregistered": [], "warning": None}
    assert (await census_health(settings))["status"] == "ok"

    # Taking an acknowledgement back makes the location unregistered again.
    removed = _json(env, "columns", "unignore", "orgs.key", "--as", "ops-bob")
    assert removed["removed"]["reason"] == "test org only"
    assert [v["location"] for v in _json(env, "status")["locations"]["unregistered"]] == ["orgs.key"]
    async with KeyManager(settings) as km:
        assert await metrics.refresh_unregistered_locations(km.sessions) == 1
    assert _gauge() == 1

    # Each change is a config_change event, written with the change.
    events = await _location_events(env)
    assert [(e["actor"], e["before"], e["after"]) for e in events] == [
        ("ops-alice", None, ""),
        (settings.default_actor, None, "orgs.key"),
        ("ops-bob", "orgs.key", None),
    ]


async def _config_changes(env: dict[str, str], what: str) -> list[tuple[str, Any, Any]]:
    """``(actor, before, after)`` of every ``config_change`` event of kind ``what``, in order."""
    conn = await asyncpg.connect(env["DATABASE_URL"])
    try:
        rows = await conn.fetch(
            "SELECT actor, metadata::text AS m FROM encryption_audit_log "
            "WHERE event_type = 'config_change' ORDER BY id"
        )
    finally:
        await conn.close()
    metas = [(r["actor"], json.loads(r["m"])) for r in rows]
    return [(actor, m["before"], m["after"]) for actor, m in metas if m["what"] == what]


async def _location_events(env: dict[str, str]) -> list[dict[str, Any]]:
    return [
        {"actor": actor, "before": before and before["location"], "after": after and after["location"]}
        for actor, before, after in await _config_changes(env, "location_ack")
    ]


async def test_destroyed_versions_do_not_warn(env: dict[str, str]) -> None:
    """Values whose key is gone already cannot be lost again: only live versions warn."""
    await _seed(env)
    conn = await asyncpg.connect(env["DATABASE_URL"])
    try:
        await conn.execute(
            "UPDATE data_keys d SET state = 'destroyed', encrypted_dek = NULL, destroyed_at = now() "
            "FROM key_scopes s WHERE s.id = d.scope_id AND s.name = 'openai'"
        )
    finally:
        await conn.close()
    status = _json(env, "status")
    assert [v["location"] for v in status["locations"]["unregistered"]] == ["", "users.api_key"]
    listed = _coverage(_json(env, "columns", "list"))
    assert listed[("openai", "orgs.key")] == ("unregistered", "")  # still listed, as history


@pytest.mark.parametrize(
    ("args", "says"),
    [
        (("columns", "ignore", "nowhere.at_all", "--reason", "typo"), "no value was recorded"),
        (("columns", "ignore", "users.api_key", "--reason", "   "), "--reason"),
        (("columns", "ignore", "users.api_key", "--reason", "x", "--as", "bad actor\n"), "actor"),
        (("columns", "ignore", "users.api_key"), "--reason"),
        (("columns", "ignore", "bad\x07name", "--reason", "x"), "printable"),
        (("columns", "unignore", "users.api_key"), "is not acknowledged"),
    ],
)
async def test_bad_input_is_one_line_and_exit_2(
    env: dict[str, str], args: tuple[str, ...], says: str
) -> None:
    async with KeyManager(Settings.from_env(env)) as km:
        await km.encrypt("anthropic", "sk-ant-1", context="users.api_key:1")
    assert says in _fails(env, *args)
    conn = await asyncpg.connect(env["DATABASE_URL"])
    try:
        assert await conn.fetchval("SELECT count(*) FROM location_acks") == 0
        assert (
            await conn.fetchval(
                "SELECT count(*) FROM encryption_audit_log WHERE event_type = 'config_change'"
            )
            == 0
        )
    finally:
        await conn.close()


async def test_values_from_before_the_census_are_named_with_what_to_run(env: dict[str, str]) -> None:
    """Migration 0008 gives each version that existed before it an ``(unrecorded)`` location."""
    await _seed(env)
    conn = await asyncpg.connect(env["DATABASE_URL"])
    try:  # what 0008_census inserts for a version it finds
        await conn.execute(
            "INSERT INTO key_locations (scope_id, dek_version, location, encryptions) "
            "SELECT id, 1, '(unrecorded)', 5 FROM key_scopes WHERE name = 'openai'"
        )
    finally:
        await conn.close()
    warning = _json(env, "status", "openai")["locations"]["warning"]
    assert "(unrecorded) (openai v1)" in warning
    assert "keyrotor columns ignore '(unrecorded)' --reason TEXT" in warning
    _json(env, "columns", "ignore", "(unrecorded)", "--reason", "every table is registered")
    left = _json(env, "status", "openai")["locations"]["unregistered"]
    assert [v["location"] for v in left] == ["orgs.key"]


async def test_locations_are_printed_as_text_not_markup(env: dict[str, str]) -> None:
    async with KeyManager(Settings.from_env(env)) as km:
        await km.encrypt("anthropic", "sk-ant-1", context="[bold]odd.name:1")
    done = keyrotor("columns", "list", env={**env, "COLUMNS": "250"})
    assert done.returncode == 0, done.stderr
    assert "[bold]odd.name" in done.stdout and "[bold]odd.name" in done.stderr


async def test_register_and_unregister_are_audited(env: dict[str, str]) -> None:
    # What a retirement counts as covered changes with a registration: who changed it, and what
    # the column was, are on the record, as for an acknowledged location.
    await _seed(env)
    args = ("users.api_key", "--pk", "id", "--scope", "anthropic", "--as", "ops-ann")
    done = keyrotor("columns", "register", *args, env=env)
    assert done.returncode == 0, done.stderr
    done = keyrotor("columns", "unregister", "users.api_key", "--as", "ops-bob", env=env)
    assert done.returncode == 0, done.stderr
    changes = await _config_changes(env, "managed_column")
    assert [(actor, b and b["column"], a and a["column"]) for actor, b, a in changes] == [
        ("ops-ann", None, "users.api_key"),
        ("ops-bob", "users.api_key", None),
    ]
    assert changes[0][2]["scope"] == "anthropic" and changes[1][1]["pk"] == "id"
