"""The CLI end to end, as a user runs it: real process, real Postgres."""

from __future__ import annotations

import asyncio
import json
import uuid
from pathlib import Path

import asyncpg
import pytest

from tests.cli_helpers import keyrotor
from tests.conftest import MASTER_KEY, PG_ADMIN, ROOT, _admin

KEY = "sk-ant-api03-" + "Zx9" * 30


def assert_one_line_error(proc: object, code: int | None = None) -> None:
    assert proc.returncode != 0, proc.stdout  # type: ignore[attr-defined]
    if code is not None:
        assert proc.returncode == code  # type: ignore[attr-defined]
    err = proc.stderr.strip()  # type: ignore[attr-defined]
    assert "Traceback" not in err
    assert len(err.splitlines()) == 1, err
    assert err.startswith("keyrotor: error: ")


def test_db_upgrade_creates_database() -> None:
    name = f"kr_cli_{uuid.uuid4().hex[:10]}"
    url = PG_ADMIN.rsplit("/", 1)[0] + "/" + name
    env = {"DATABASE_URL": url, "ENCRYPTION_KEY": MASTER_KEY}
    try:
        first = keyrotor("db", "upgrade", env=env)
        assert first.returncode == 0, first.stderr
        assert "created database" in first.stderr
        again = keyrotor("db", "upgrade", env=env)  # idempotent
        assert again.returncode == 0, again.stderr
    finally:
        asyncio.run(_admin(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)"))


def test_put_get_status_verify(env: dict[str, str]) -> None:
    put = keyrotor("secrets", "put", "anthropic", "prod", env=env, stdin=KEY + "\n")
    assert put.returncode == 0, put.stderr
    assert KEY not in put.stdout + put.stderr
    got = keyrotor("secrets", "get", "anthropic", "prod", env=env)
    assert got.returncode == 0 and got.stdout == KEY + "\n"

    st = keyrotor("status", "--json", env=env)
    assert st.returncode == 0, st.stderr
    doc = json.loads(st.stdout)
    (scope,) = doc["scopes"]
    assert scope["scope"] == "anthropic"
    assert scope["active_version"] == 1
    assert scope["rotation_count"] == 0
    assert scope["keys"] == [{**scope["keys"][0], "version": 1, "state": "active", "grace_until": None}]
    assert scope["rows_by_version"] == {"1": 1}
    assert {"enabled", "interval_days", "grace_period_days"} <= set(scope["policy"])

    table = keyrotor("status", env=env)
    assert table.returncode == 0 and "anthropic" in table.stdout

    ok = keyrotor("verify", "--json", env=env)
    assert ok.returncode == 0, ok.stderr
    assert json.loads(ok.stdout)["failed"] == 0


async def test_verify_fails_on_tampered_row(env: dict[str, str], database_url: str) -> None:
    assert keyrotor("secrets", "put", "openai", "a", env=env, stdin="sk-1").returncode == 0
    assert keyrotor("secrets", "put", "openai", "b", env=env, stdin="sk-2").returncode == 0
    conn = await asyncpg.connect(database_url)
    try:
        await conn.execute(
            "UPDATE secrets SET ciphertext = overlay(ciphertext placing "
            "CASE WHEN substr(ciphertext, 20, 1) = 'A' THEN 'B' ELSE 'A' END from 20 for 1) WHERE name = 'b'"
        )
    finally:
        await conn.close()
    res = keyrotor("verify", "--json", env=env)
    doc = json.loads(res.stdout)
    assert res.returncode == 1
    assert doc["failed"] == 1
    assert doc["failures"][0]["name"] == "b"
    assert "sk-2" not in res.stdout + res.stderr


def test_import_jsonl(env: dict[str, str], tmp_path: Path) -> None:
    path = tmp_path / "keys.jsonl"
    rows = [
        {"scope": f"tenant-{i % 3}/openai", "name": f"user-{i}", "value": f"sk-{i:06d}"} for i in range(5000)
    ]
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    res = keyrotor("secrets", "import", str(path), "--json", env=env)
    assert res.returncode == 0, res.stderr
    assert json.loads(res.stdout)["imported"] == 5000
    got = keyrotor("secrets", "get", "tenant-1/openai", "user-4", env=env)
    assert got.stdout.strip() == "sk-000004"
    st = json.loads(keyrotor("status", "--json", env=env).stdout)
    assert sum(s["rows_total"] for s in st["scopes"]) == 5000


@pytest.mark.parametrize(
    ("content", "fragment"),
    [
        ('{"scope": "openai", "name": "a", "value": "x"}\nnot json\n', "line 2: not valid JSON"),
        ('{"scope": "Bad Scope", "name": "a", "value": "x"}\n', "line 1: invalid scope"),
        ('{"scope": "openai", "name": "a"}\n', "line 1: missing or non-text field(s): value"),
        ('{"scope": "openai", "name": "a", "value": ""}\n', "line 1: value is empty"),
        ("[1, 2]\n", "line 1: expected a JSON object"),
    ],
)
def test_import_bad_input_writes_nothing(
    env: dict[str, str], tmp_path: Path, content: str, fragment: str
) -> None:
    path = tmp_path / "bad.jsonl"
    path.write_text(content)
    res = keyrotor("secrets", "import", str(path), env=env)
    assert_one_line_error(res, 2)
    assert fragment in res.stderr
    st = json.loads(keyrotor("status", "--json", env=env).stdout)
    assert st["scopes"] == []  # validated before anything was written


def test_import_non_utf8_file(env: dict[str, str], tmp_path: Path) -> None:
    path = tmp_path / "latin1.jsonl"
    path.write_bytes(b'{"scope": "openai", "name": "a", "value": "\xff\xfe"}\n')
    assert_one_line_error(keyrotor("secrets", "import", str(path), env=env))


@pytest.mark.parametrize(
    ("args", "stdin", "fragment"),
    [
        (("secrets", "get", "openai", "missing"), None, "no secret 'missing'"),
        (("secrets", "get", "Not/Valid", "x"), None, "invalid scope"),
        (("secrets", "put", "openai", "x"), "", "value is empty"),
        (("secrets", "put", "openai", "x"), "x" * 70000, "value is too large"),
        (("secrets", "import", "/nonexistent.jsonl"), None, "no such file"),
        (("status", "nope"), None, "does not exist"),
    ],
)
def test_user_errors_are_one_line(
    env: dict[str, str], args: tuple[str, ...], stdin: str | None, fragment: str
) -> None:
    res = keyrotor(*args, env=env, stdin=stdin)
    assert_one_line_error(res)
    assert fragment in res.stderr


def test_weak_or_missing_key(env: dict[str, str]) -> None:
    for key in ("", "password123"):
        res = keyrotor("secrets", "put", "openai", "x", env={**env, "ENCRYPTION_KEY": key}, stdin="sk-1")
        assert_one_line_error(res, 2)
        assert "ENCRYPTION_KEY" in res.stderr
        if key:
            assert key not in res.stderr


def test_unreachable_database(env: dict[str, str]) -> None:
    """A database that does not answer names the variable to fix, not only the driver's error
    class (it used to be ``database unavailable: ConnectionRefusedError`` alone)."""
    res = keyrotor("status", env={**env, "DATABASE_URL": "postgresql://postgres:hunter2-pw@127.0.0.1:1/x"})
    assert_one_line_error(res, 1)
    assert "database unavailable" in res.stderr and "DATABASE_URL" in res.stderr
    assert "hunter2" not in res.stderr


@pytest.mark.parametrize("args", [("worker", "--burst"), ("rotate", "openai")])
def test_unreachable_redis_names_the_variable(env: dict[str, str], args: tuple[str, ...]) -> None:
    """A worker (or an enqueue) with no Redis to talk to: one line naming REDIS_URL (never its
    password), exit 1. It used to say ``cannot connect to Redis: ConnectionError`` alone."""
    put = keyrotor("secrets", "put", "openai", "prod", env=env, stdin="sk-proj-unreachable-redis\n")
    assert put.returncode == 0, put.stderr
    res = keyrotor(*args, env={**env, "REDIS_URL": "redis://:hunter2-pw@127.0.0.1:1/0"}, timeout=60)
    assert_one_line_error(res, 1)
    assert "cannot connect to Redis" in res.stderr and "REDIS_URL" in res.stderr
    assert "hunter2" not in res.stderr + res.stdout


def test_bad_configuration_value(env: dict[str, str]) -> None:
    res = keyrotor("status", env={**env, "KEYROTOR_DEK_CACHE_TTL_SECONDS": "-5"})
    assert_one_line_error(res, 2)
    assert "KEYROTOR_DEK_CACHE_TTL_SECONDS" in res.stderr


def test_usage_error_exit_2(env: dict[str, str]) -> None:
    res = keyrotor("secrets", "put", env=env)
    assert res.returncode == 2
    assert "Traceback" not in res.stderr


@pytest.mark.parametrize(
    ("args", "says"),
    [
        (("secrets", "put"), "Missing argument 'scope'"),
        (("policy", "set", "openai", "--interval-days", "abc"), "Invalid value for '--interval-days'"),
        (("rotate", "openai", "--bogus"), "No such option: --bogus"),
        (("no-such-command",), "No such command 'no-such-command'"),
    ],
)
def test_usage_errors_are_one_line_pointing_at_help(
    env: dict[str, str], args: tuple[str, ...], says: str
) -> None:
    res = keyrotor(*args, env=env)
    assert_one_line_error(res, 2)
    assert says in res.stderr and "--help`)" in res.stderr


def test_a_missing_or_unmigrated_database_says_what_to_run(env: dict[str, str]) -> None:
    base = env["DATABASE_URL"].rsplit("/", 1)[0]
    missing = keyrotor(
        "status", env={**env, "DATABASE_URL": f"{base}/kr_never_created_{uuid.uuid4().hex[:8]}"}
    )
    assert_one_line_error(missing, 2)
    assert "does not exist" in missing.stderr and "keyrotor db upgrade" in missing.stderr

    name = f"kr_bare_{uuid.uuid4().hex[:10]}"
    asyncio.run(_admin(f"CREATE DATABASE {name}"))
    try:
        bare = keyrotor("policy", "show", env={**env, "DATABASE_URL": f"{base}/{name}"})
        assert_one_line_error(bare, 2)
        assert "no keyrotor schema" in bare.stderr and "keyrotor db upgrade" in bare.stderr
    finally:
        asyncio.run(_admin(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)"))


@pytest.mark.parametrize(
    "redis_url",
    [
        "127.0.0.1:6379",  # no scheme
        "http://127.0.0.1:6379/0",  # not Redis
        "redis://:hunter2-pw@127.0.0.1:6379/",  # a trailing slash: arq reads int("")
        "redis://:hunter2-pw@127.0.0.1:6379/queue",  # the database must be a number
        "redis://127.0.0.1:99999/0",  # no such port
    ],
)
@pytest.mark.parametrize("args", [("worker", "--burst"), ("rotate", "openai"), ("health",)])
def test_a_bad_redis_url_is_a_configuration_error(
    env: dict[str, str], redis_url: str, args: tuple[str, ...]
) -> None:
    """A REDIS_URL the queue cannot use is refused like any other bad setting: one line naming
    the variable (never its value, which may hold a password), exit 2. It used to reach arq
    as an "unexpected RuntimeError/ValueError" (exit 1), while `keyrotor health` called the same
    Redis "ok"."""
    res = keyrotor(*args, env={**env, "REDIS_URL": redis_url}, timeout=60)
    assert_one_line_error(res, 2)
    assert "REDIS_URL" in res.stderr
    assert "hunter2" not in res.stderr + res.stdout


def test_an_unknown_log_level_is_a_configuration_error(env: dict[str, str]) -> None:
    """KEYROTOR_LOG_LEVEL=verbose (or a typo of DEBUG) used to be taken silently as INFO: the
    operator who asked for debug logs got none, and no word of why."""
    res = keyrotor("status", env={**env, "KEYROTOR_LOG_LEVEL": "verbose"})
    assert_one_line_error(res, 2)
    assert "KEYROTOR_LOG_LEVEL" in res.stderr
    ok = keyrotor("status", env={**env, "KEYROTOR_LOG_LEVEL": "debug"})
    assert ok.returncode == 0, ok.stderr


def test_health_before_db_upgrade_says_what_to_run(env: dict[str, str]) -> None:
    """``keyrotor health`` on a database that does not exist yet: every check that reads it says to
    run ``keyrotor db upgrade``; the postgres check used to say only ``DBAPIError``."""
    base = env["DATABASE_URL"].rsplit("/", 1)[0]
    url = f"{base}/kr_never_created_{uuid.uuid4().hex[:8]}"
    res = keyrotor("health", "--json", env={**env, "DATABASE_URL": url, "KEYROTOR_METRICS_PORT": "0"})
    assert res.returncode == 1 and "Traceback" not in res.stderr, res.stderr
    checks = json.loads(res.stdout)["checks"]
    for name in ("postgres", "kek", "census", "grants"):
        assert checks[name]["status"] == "fail", name
        assert "`keyrotor db upgrade` creates it" in checks[name]["error"], (name, checks[name])


def test_worker_before_db_upgrade_says_what_to_run_in_one_line(env: dict[str, str]) -> None:
    """``keyrotor worker`` on a database with no schema at all used to say "missing
    0016_..." (the newest migration, as if one were missing) after alembic's setup lines at
    info; now one line says there is no schema and what to run. A schema one migration behind
    still names what it lacks."""
    base = env["DATABASE_URL"].rsplit("/", 1)[0]
    name = f"kr_bare_{uuid.uuid4().hex[:10]}"
    asyncio.run(_admin(f"CREATE DATABASE {name}"))
    quiet = {"KEYROTOR_METRICS_PORT": "0"}
    try:
        bare = keyrotor(
            "worker", "--burst", env={**env, **quiet, "DATABASE_URL": f"{base}/{name}"}, timeout=60
        )
    finally:
        asyncio.run(_admin(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)"))
    assert_one_line_error(bare, 2)
    assert "no keyrotor schema" in bare.stderr and "keyrotor db upgrade" in bare.stderr
    assert "missing" not in bare.stderr, bare.stderr
    assert "alembic" not in bare.stdout + bare.stderr, bare.stdout

    # The two newest migrations, whatever they are when this runs.
    versions = ROOT / "keyrotor" / "store" / "migrations" / "versions"
    previous, newest = sorted(p.stem for p in versions.glob("[0-9][0-9][0-9][0-9]_*.py"))[-2:]

    async def one_behind() -> None:
        conn = await asyncpg.connect(env["DATABASE_URL"])
        try:
            await conn.execute("UPDATE alembic_version SET version_num = $1", previous)
        finally:
            await conn.close()

    asyncio.run(one_behind())
    behind = keyrotor("worker", "--burst", env={**env, **quiet}, timeout=60)
    assert_one_line_error(behind, 2)
    assert f"missing {newest}" in behind.stderr and "keyrotor db upgrade" in behind.stderr
    assert "alembic" not in behind.stdout + behind.stderr, behind.stdout
