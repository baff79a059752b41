"""Rotation policies: the pure rules, and ``keyrotor policy set/show`` with its audit events."""

from __future__ import annotations

import asyncio
import json
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime, timedelta
from typing import Any

import pytest

from keyrotor.errors import InvalidInput
from keyrotor.schedule.rules import ScopePolicy, change_policy, retry_delay
from keyrotor.worker.cli import common, main
from tests.rotation_helpers import keyrotor
from tests.scheduler.conftest import seed_scopes, sql

NOW = datetime(2030, 6, 1, 12, tzinfo=UTC)
ANCHOR = NOW - timedelta(days=40)  # last rotation
P90 = ScopePolicy(True, 90, 7, None, ANCHOR + timedelta(days=90))


def test_interval_presets_and_any_whole_number() -> None:
    for days in (30, 60, 90, 1, 365, 17):
        p = change_policy(P90, anchor=ANCHOR, now=NOW, interval_days=days, grace_days=min(7, days))
        assert p.interval_days == days
        assert p.next_rotation_at == ANCHOR + timedelta(days=days)  # counted from the last rotation
    # 30 days after a rotation 40 days ago: due at once.
    assert change_policy(P90, anchor=ANCHOR, now=NOW, interval_days=30).due_reason(NOW, 0, 10) == "schedule"


@pytest.mark.parametrize(
    ("changes", "fragment"),
    [
        ({"interval_days": 0}, "interval must be 1-365 days, got 0"),
        ({"interval_days": -3}, "interval must be 1-365 days"),
        ({"interval_days": 366}, "interval must be 1-365 days"),
        ({"grace_days": -1}, "grace period cannot be negative"),
        ({"grace_days": 91}, "cannot be longer than the interval"),
        ({"interval_days": 5}, "cannot be longer than the interval"),  # grace 7 > 5
        ({"max_encryptions": 0}, "max encryptions must be"),
        ({"max_encryptions": 2**31 + 1}, "max encryptions must be"),
        ({"enabled": False, "next_rotation_at": NOW}, "needs rotation enabled"),
        ({"next_rotation_at": datetime(2030, 1, 1)}, "time zone"),
    ],
)
def test_bad_changes_are_refused(changes: dict[str, object], fragment: str) -> None:
    with pytest.raises(InvalidInput) as info:
        change_policy(P90, anchor=ANCHOR, now=NOW, **changes)  # type: ignore[arg-type]
    assert fragment in str(info.value)


def test_enable_disable_and_explicit_due_dates() -> None:
    off = change_policy(P90, anchor=ANCHOR, now=NOW, enabled=False)
    assert off.next_rotation_at is None and off.due_reason(NOW, 10**12, 1) is None
    on = change_policy(off, anchor=ANCHOR, now=NOW, enabled=True)
    assert on.next_rotation_at == ANCHOR + timedelta(days=90)
    past = change_policy(P90, anchor=ANCHOR, now=NOW, next_rotation_at=NOW - timedelta(days=1))
    assert past.due_reason(NOW, 0, 10) == "schedule"
    # Grace alone leaves the due date.
    assert change_policy(P90, anchor=ANCHOR, now=NOW, grace_days=14).next_rotation_at == P90.next_rotation_at


def test_usage_limit() -> None:
    limited = change_policy(P90, anchor=ANCHOR, now=NOW, max_encryptions=1000, encryptions=999)
    assert limited.next_rotation_at == P90.next_rotation_at and limited.due_reason(NOW, 999, 2**30) is None
    # A limit at or below what the active DEK already made: due now.
    hit = change_policy(P90, anchor=ANCHOR, now=NOW, max_encryptions=500, encryptions=999)
    assert hit.next_rotation_at == NOW and hit.due_reason(NOW, 999, 2**30) == "usage"
    cleared = change_policy(hit, anchor=ANCHOR, now=NOW, clear_max_encryptions=True, encryptions=999)
    assert cleared.max_encryptions is None and cleared.encryption_limit(2**30) == 2**30


def test_retry_delay_is_exponential_and_capped() -> None:
    delays = [retry_delay(n, base_s=300, max_s=21_600).total_seconds() for n in range(10)]
    assert delays == [0, 300, 600, 1200, 2400, 4800, 9600, 19200, 21600, 21600]
    assert retry_delay(10_000, base_s=300, max_s=21_600) == timedelta(hours=6)


# --- the CLI ---------------------------------------------------------------------------------


async def audit_changes(database_url: str) -> list[dict[str, Any]]:
    rows = await sql(
        database_url,
        "SELECT scope, actor, metadata FROM encryption_audit_log "
        "WHERE event_type = 'config_change' ORDER BY id",
    )
    return [{"scope": r[0], "actor": r[1], **json.loads(r[2])} for r in rows]


@pytest.fixture
def cli(
    senv: dict[str, str], monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> Callable[..., Awaitable[tuple[int, str, str]]]:
    """``keyrotor ARGS`` in-process (a thread of its own: the CLI runs its own event loop).
    Returns (exit code, stdout, stderr). The console script itself is run once per test below."""
    for key, value in {**senv, "COLUMNS": "200"}.items():
        monkeypatch.setenv(key, value)
    # The consoles read COLUMNS when first imported (pytest-xdist workers set it to 80): widen them.
    for console in (common.out_console, common.err_console):
        monkeypatch.setattr(console, "width", 200)

    async def call(*args: str) -> tuple[int, str, str]:
        capsys.readouterr()
        try:
            await asyncio.to_thread(main, list(args))
            code = 0
        except SystemExit as exc:
            code = int(exc.code or 0)
        out = capsys.readouterr()
        return code, out.out, out.err

    return call


async def test_policy_set_and_show_record_config_changes(
    senv: dict[str, str], cli: Callable[..., Awaitable[tuple[int, str, str]]]
) -> None:
    url = senv["DATABASE_URL"]
    await seed_scopes(
        url, 1, due_at=datetime.now(UTC) + timedelta(days=80), prefix="anthropic", interval_days=90
    )
    scope = "anthropic000000"
    # The console script, once.
    res = keyrotor(
        "policy",
        "set",
        scope,
        "--interval-days",
        "30",
        "--grace-days",
        "3",
        "--as",
        "ops:alice",
        "--json",
        env=senv,
    )
    assert res.returncode == 0, res.stderr
    doc = json.loads(res.stdout)
    assert doc["changed"] and doc["after"]["interval_days"] == 30 and doc["after"]["grace_period_days"] == 3
    changes = await audit_changes(url)
    assert len(changes) == 1
    (change,) = changes
    assert change["scope"] == scope and change["actor"] == "ops:alice" and change["what"] == "policy"
    assert change["before"]["interval_days"] == 90 and change["after"]["interval_days"] == 30
    assert change["after"]["grace_period_days"] == 3
    # The same values again: nothing written.
    code, _, err = await cli("policy", "set", scope, "--interval-days", "30")
    assert code == 0 and "unchanged" in err
    assert len(await audit_changes(url)) == 1
    # Past due date, usage limit, disable.
    past = (datetime.now(UTC) - timedelta(hours=1)).isoformat()
    assert (await cli("policy", "set", scope, "--next-rotation-at", past))[0] == 0
    assert (await cli("policy", "set", scope, "--max-encryptions", "1000000"))[0] == 0
    shown = json.loads((await cli("policy", "show", scope, "--json"))[1])["policies"][0]
    assert shown["due"] == "schedule" and shown["max_encryptions"] == 1_000_000
    assert (await cli("policy", "set", scope, "--disable"))[0] == 0
    shown = json.loads((await cli("policy", "show", "--json"))[1])["policies"][0]
    assert shown["enabled"] is False and shown["next_rotation_at"] is None and shown["due"] is None
    assert [c["after"]["enabled"] for c in await audit_changes(url)] == [True, True, True, False]
    code, out, err = await cli("audit", "verify", "--json")  # the events are links of the hash chain
    assert code == 0 and json.loads(out)["checked"] == 4, (out, err)
    code, table, err = await cli("policy", "show")
    assert code == 0 and scope in table and "disabled" in table and "showing the first" not in err
    # A list cut short says so.
    await seed_scopes(url, 2, due_at=None, prefix="zz")
    doc = json.loads((await cli("policy", "show", "--limit", "2", "--json"))[1])
    assert [p["scope"] for p in doc["policies"]] == [scope, "zz000000"]
    assert doc["total_scopes"] == 3 and doc["truncated"] is True
    code, table, err = await cli("policy", "show", "--limit", "2")
    assert code == 0 and "zz000001" not in table and "showing the first 2 of 3 scopes by name" in err
    doc = json.loads((await cli("policy", "show", "--json"))[1])
    assert len(doc["policies"]) == doc["total_scopes"] == 3 and doc["truncated"] is False


BAD_INPUT = [
    (("--interval-days", "0"), "interval must be 1-365 days, got 0"),
    (("--interval-days", "-5"), "interval must be 1-365 days, got -5"),
    (("--interval-days", "366"), "interval must be 1-365 days, got 366"),
    (("--grace-days", "31"), "grace period (31 days) cannot be longer than the interval (30 days)"),
    (("--interval-days", "5"), "grace period (7 days) cannot be longer than the interval (5 days)"),
    (("--grace-days", "-1"), "grace period cannot be negative"),
    (("--next-rotation-at", "2030-13-01"), "invalid time '2030-13-01'"),
    (("--next-rotation-at", "tomorrow"), "invalid time 'tomorrow'"),
    (("--next-rotation-at", "9999-12-31T23:00:00-05:00"), "invalid time '9999-12-31T23:00:00-05:00'"),
    (("--disable", "--next-rotation-at", "now"), "needs rotation enabled"),
    (("--max-encryptions", "-1"), "max encryptions cannot be negative"),
    (("--max-encryptions", str(2**31 + 1)), "max encryptions must be 1-2147483648"),
    ((), "nothing to change"),
]


async def test_policy_set_bad_input_is_one_line_and_changes_nothing(
    senv: dict[str, str], cli: Callable[..., Awaitable[tuple[int, str, str]]]
) -> None:
    url = senv["DATABASE_URL"]
    await seed_scopes(url, 1, due_at=datetime(2031, 1, 1, tzinfo=UTC), prefix="openai")
    before = await sql(url, "SELECT * FROM key_scopes")
    cases = [(("set", "openai000000", *args), fragment) for args, fragment in BAD_INPUT]
    cases += [
        (("set", "nope", "--interval-days", "30"), "scope 'nope' does not exist"),
        (("show", "nope"), "scope 'nope' does not exist"),
        (("show", "--limit", "0"), "--limit must be 1-1000000, got 0"),
        (("set", "Bad Scope", "--interval-days", "30"), "invalid scope name"),
    ]
    for args, fragment in cases:
        code, out, err = await cli("policy", *args)
        assert code == 2, (args, err)
        assert err.count("\n") == 1 and err.startswith("keyrotor: error: ") and fragment in err, (args, err)
        assert out == ""
    # And through the console script.
    res = keyrotor("policy", "set", "openai000000", "--interval-days", "0", env=senv)
    assert res.returncode == 2 and res.stderr == "keyrotor: error: interval must be 1-365 days, got 0\n"
    assert await sql(url, "SELECT * FROM key_scopes") == before
    assert await audit_changes(url) == []


async def test_dry_runs_report_and_write_nothing(
    senv: dict[str, str], cli: Callable[..., Awaitable[tuple[int, str, str]]], rq: Any
) -> None:
    from keyrotor import KeyManager, Settings

    url = senv["DATABASE_URL"]
    async with KeyManager(Settings.from_env(senv)) as km:
        await km.put_secrets("anthropic", [(f"k{i}", f"sk-{i}") for i in range(40)])
        await km.put_secrets("openai", [("k", "sk")])
    assert (await cli("policy", "set", "anthropic", "--next-rotation-at", "2020-01-01"))[0] == 0
    tables = ("rotations", "data_keys", "key_scopes", "secrets", "encryption_audit_log")
    before = {t: await sql(url, f"SELECT * FROM {t} ORDER BY 1") for t in tables}

    code, out, err = await cli("rotate", "openai", "--dry-run", "--json")
    assert code == 0, err
    plan = json.loads(out)
    assert (plan["from_version"], plan["to_version"], plan["rows_by_version"]) == (1, 2, {"1": 1})
    assert plan["dry_run"] and plan["due"] is None and plan["open_run"] is None

    configured = Settings.from_env(senv).estimate_rows_per_second  # KEYROTOR_ESTIMATE_ROWS_PER_SECOND
    assert plan["rate_source"] == "configured" and plan["rows_per_second"] == configured
    code, _, err = await cli("rotate", "openai", "--dry-run")
    assert code == 0 and "openai v1 -> v2: re-encrypt 1 rows (v1: 1)" in err and "nothing written" in err

    code, out, err = await cli("scheduler", "--dry-run", "--once", "--json")
    assert code == 0, err
    doc = json.loads(out)
    assert [(p["scope"], p["rows_total"], p["due"]["reason"]) for p in doc["rotations"]] == [
        ("anthropic", 40, "schedule")
    ]
    assert [p["rows_by_version"] for p in doc["rotations"]] == [{"1": 40}]
    assert doc["estimated_seconds"] == round(40 / configured, 3) and doc["replica_job"].endswith("0000Z")
    # No rotation has completed here yet: the configured rate, and the output says so.
    assert doc["rate_source"] == "configured" and doc["rate_runs"] == 0
    code, table, err = await cli("scheduler", "--once", "--dry-run")
    assert code == 0 and "1 rotations (40 rows" in err and "KEYROTOR_ESTIMATE_ROWS_PER_SECOND" in err
    assert "rotate_dek" in table and "anthropic" in table and "v1 -> v2" in table and "v1: 40" in table

    # Bad input: one line, exit 2, nothing written either.
    for args, fragment in [
        (("rotate", "nope", "--dry-run"), "scope 'nope' does not exist"),
        (("rotate", "Bad Scope", "--dry-run"), "invalid scope name"),
        (("scheduler", "--json"), "--json needs --once or --dry-run"),
    ]:
        code, out, err = await cli(*args)
        assert code == 2 and out == "" and err.count("\n") == 1 and fragment in err, (args, err)

    assert {t: await sql(url, f"SELECT * FROM {t} ORDER BY 1") for t in tables} == before
    assert [k async for k in rq.scan_iter(match=f"*{senv['KEYROTOR_QUEUE_NAME']}*")] == []


async def test_new_scopes_take_the_default_policy_from_the_environment(senv: dict[str, str]) -> None:
    from keyrotor import KeyManager, Settings

    url = senv["DATABASE_URL"]
    for scope, extra in [
        ("openai", {}),  # the defaults: enabled, 90 days, 7 days grace
        ("anthropic", {"KEYROTOR_DEFAULT_INTERVAL_DAYS": "30", "KEYROTOR_DEFAULT_GRACE_DAYS": "3"}),
        ("google", {"KEYROTOR_DEFAULT_ROTATION_ENABLED": "false"}),
    ]:
        async with KeyManager(Settings.from_env({**senv, **extra})) as km:
            await km.encrypt(scope, "sk-x")
    rows = await sql(
        url,
        "SELECT s.name, s.rotation_enabled, s.interval_days, s.grace_period_days, "
        "s.next_rotation_at - d.activated_at, s.max_encryptions FROM key_scopes s "
        "JOIN data_keys d ON d.scope_id = s.id ORDER BY s.name",
    )
    assert [tuple(r) for r in rows] == [
        ("anthropic", True, 30, 3, timedelta(days=30), None),
        ("google", False, 90, 7, None, None),
        ("openai", True, 90, 7, timedelta(days=90), None),
    ]
    # A default grace longer than the default interval is refused when the process starts, like
    # the same policy given to `policy set`: one line, exit 2, nothing written.
    res = keyrotor("policy", "show", env={**senv, "KEYROTOR_DEFAULT_INTERVAL_DAYS": "5"})
    assert res.returncode == 2 and res.stdout == ""
    assert res.stderr.count("\n") == 1 and res.stderr.startswith("keyrotor: error: invalid configuration")
    assert (
        "KEYROTOR_DEFAULT_GRACE_DAYS (7) cannot be longer than KEYROTOR_DEFAULT_INTERVAL_DAYS (5)"
        in res.stderr
    )
    assert [tuple(r) for r in await sql(url, "SELECT count(*) FROM key_scopes")] == [(3,)]
