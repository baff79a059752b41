"""What an operator meets on the command line: checks that say what is wrong, and servers that
fail in one line naming the address they could not take. Real processes, real Postgres."""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

from keyrotor import Settings
from tests.cli_helpers import ROOT, keyrotor
from tests.conftest import MASTER_KEY
from tests.destruction_helpers import record_location
from tests.rotation_helpers import run_burst_worker

KEY = "sk-ant-api03-" + "Qv7" * 30
OTHER_MASTER_KEY = "another-master-key-0a1b2c3d4e5f60718293a4b5c6d7e8f9"


def test_health_fails_the_kek_check_when_the_key_cannot_unwrap_the_stored_deks(env: dict[str, str]) -> None:
    put = keyrotor("secrets", "put", "anthropic", "prod", env=env, stdin=KEY)
    assert put.returncode == 0, put.stderr

    right = json.loads(keyrotor("health", "--json", env=env, timeout=60).stdout)
    assert right["checks"]["kek"]["status"] == "ok", right["checks"]["kek"]

    # A valid key, but not the one that wrapped the DEKs: the provider's own probe round trip
    # passes with any key, so only unwrapping a stored DEK tells the operator.
    wrong = keyrotor("health", "--json", env={**env, "ENCRYPTION_KEY": OTHER_MASTER_KEY}, timeout=60)
    assert wrong.returncode == 1
    kek = json.loads(wrong.stdout)["checks"]["kek"]
    assert kek["status"] == "fail", kek
    assert "KekMismatch" in kek["error"] and "anthropic" in kek["error"]
    assert MASTER_KEY not in wrong.stdout + wrong.stderr
    assert OTHER_MASTER_KEY not in wrong.stdout + wrong.stderr


def test_kek_status_fails_its_check_when_the_key_cannot_unwrap_the_stored_deks(env: dict[str, str]) -> None:
    put = keyrotor("secrets", "put", "anthropic", "prod", env=env, stdin=KEY)
    assert put.returncode == 0, put.stderr
    right = keyrotor("kek", "status", "--json", env=env, timeout=60)
    assert right.returncode == 0 and json.loads(right.stdout)["check"]["ok"], right.stdout + right.stderr

    wrong = keyrotor("kek", "status", "--json", env={**env, "ENCRYPTION_KEY": OTHER_MASTER_KEY}, timeout=60)
    assert wrong.returncode == 1
    check = json.loads(wrong.stdout)["check"]
    assert not check["ok"] and "KekMismatch" in check["error"], check
    assert MASTER_KEY not in wrong.stdout + wrong.stderr
    assert OTHER_MASTER_KEY not in wrong.stdout + wrong.stderr


def _assert_cannot_listen(proc: subprocess.CompletedProcess[str], where: str) -> None:
    """One line naming the address and the reason, exit 2 (a configuration mistake)."""
    err = proc.stderr.strip()
    assert proc.returncode == 2, err
    assert "Traceback" not in err
    assert err.splitlines()[-1] == f"keyrotor: error: cannot listen on {where}: address already in use", err


@pytest.fixture
def busy_port() -> Iterator[int]:
    """A port another process's socket listens on."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen()
        yield sock.getsockname()[1]


def test_serve_on_a_busy_port_says_so_in_one_line(env: dict[str, str], busy_port: int) -> None:
    proc = keyrotor("serve", "--port", str(busy_port), env=env, timeout=60)
    _assert_cannot_listen(proc, f"127.0.0.1:{busy_port}")
    assert "keyrotor API on" not in proc.stderr


def test_serve_on_an_unknown_host_says_so_in_one_line(env: dict[str, str]) -> None:
    proc = keyrotor("serve", "--host", "no-such-host.invalid", "--port", "8180", env=env, timeout=60)
    err = proc.stderr.strip()
    assert proc.returncode == 2, err
    assert err.splitlines()[-1].startswith("keyrotor: error: cannot listen on no-such-host.invalid:8180: "), (
        err
    )


def test_audit_serve_on_a_busy_port_says_so_and_announces_nothing(
    env: dict[str, str], busy_port: int
) -> None:
    token_env = {**env, "KEYROTOR_AUDIT_API_TOKEN": "t" * 32}
    proc = keyrotor("audit", "serve", "--port", str(busy_port), env=token_env, timeout=60)
    _assert_cannot_listen(proc, f"127.0.0.1:{busy_port}")
    assert len(proc.stderr.strip().splitlines()) == 1, proc.stderr  # no "audit API on ..." first


def test_verify_of_a_scope_that_does_not_exist_is_an_error_not_a_pass(env: dict[str, str]) -> None:
    put = keyrotor("secrets", "put", "anthropic", "prod", env=env, stdin=KEY)
    assert put.returncode == 0, put.stderr
    ok = keyrotor("verify", "anthropic", "--json", env=env)
    assert ok.returncode == 0 and json.loads(ok.stdout)["checked"] == 1, ok.stderr

    # A typo must not read as "every value verified": status says the same of it.
    for args in (("verify", "antropic"), ("verify", "antropic", "--json")):
        typo = keyrotor(*args, env=env)
        assert typo.returncode == 2, typo.stdout + typo.stderr
        assert typo.stdout == ""
        assert typo.stderr == "keyrotor: error: scope 'antropic' does not exist\n"


def test_the_cli_runs_as_a_module_too(env: dict[str, str]) -> None:
    # `python -m keyrotor.worker.cli` is the console script without the script, for a
    # virtualenv whose bin/ is not on PATH.
    run_env = {"PATH": os.environ.get("PATH", ""), "PYTHONPATH": str(ROOT), **env}
    keygen = subprocess.run(
        [sys.executable, "-m", "keyrotor.worker.cli", "keygen"],
        capture_output=True,
        text=True,
        env=run_env,
        timeout=60,
        check=False,
    )
    assert keygen.returncode == 0, keygen.stderr
    assert keygen.stdout.startswith("krk1_")
    bad = subprocess.run(
        [sys.executable, "-m", "keyrotor.worker.cli", "status", "Not A Scope"],
        capture_output=True,
        text=True,
        env=run_env,
        timeout=60,
        check=False,
    )
    assert bad.returncode == 2
    assert bad.stderr.startswith("keyrotor: error: invalid scope name") and bad.stderr.count("\n") == 1


async def test_a_refused_retire_keeps_stdout_for_json_and_its_log_line_on_stderr(
    env: dict[str, str], wenv: dict[str, str]
) -> None:
    # The refusal is logged by the library in this process: that line must go to stderr (and
    # through the redactor), never onto the stdout a script parses.
    # wenv: this test's own queue, emptied by the fixture.
    assert keyrotor("secrets", "put", "openai", "prod", env=wenv, stdin=KEY).returncode == 0
    assert keyrotor("rotate", "openai", env=wenv).returncode == 0
    await run_burst_worker(Settings.from_env(wenv))
    await record_location(env["DATABASE_URL"], "openai", 1, "users.api_key")

    refused = keyrotor("retire", "openai", "1", "--force-now", "--json", env=wenv, timeout=60)
    assert refused.returncode == 1, refused.stderr
    assert refused.stdout == ""
    (line,) = refused.stderr.strip().splitlines()  # the warning would only repeat the error
    assert line.startswith("keyrotor: error: openai: DEK v1 is kept: values of it were encrypted")

    # An operator who asks for a log level gets the library's events, on stderr, as JSON.
    verbose = {**wenv, "KEYROTOR_LOG_LEVEL": "WARNING"}
    again = keyrotor("retire", "openai", "1", "--force-now", "--json", env=verbose, timeout=60)
    assert again.returncode == 1 and again.stdout == "", again.stderr
    lines = again.stderr.strip().splitlines()
    assert lines[-1].startswith("keyrotor: error: openai: DEK v1 is kept"), lines
    (logged,) = [json.loads(line) for line in lines[:-1]]
    assert logged["event"] == "retire_refused" and logged["level"] == "warning"


def test_promote_asks_even_with_json_and_off_a_terminal_needs_yes(env: dict[str, str]) -> None:
    # --json picks the output format; it must not also skip the question before a promotion,
    # which fences the region for good. Off a terminal (a script) the answer is --yes.
    regions = {
        **env,
        "KEYROTOR_PRIMARY_REGION": "us-east-1",
        "KEYROTOR_REGIONS": "eu-west-1=" + env["DATABASE_URL"].rsplit("/", 1)[0] + "/keyrotor_no_such_region",
        "KEYROTOR_REGION_EU_WEST_1__SECRETS_PROVIDER": "local",
        "KEYROTOR_REGION_EU_WEST_1__ENCRYPTION_KEY": OTHER_MASTER_KEY,
    }
    for args in (("--json",), ()):
        proc = keyrotor("replicas", "promote", "eu-west-1", *args, env=regions, stdin="")
        assert proc.returncode == 2, proc.stdout + proc.stderr
        assert proc.stdout == ""
        assert proc.stderr == (
            "keyrotor: error: promoting a region cannot be undone: confirm on a terminal, or pass --yes\n"
        )


def test_a_missing_region_database_is_not_blamed_on_database_url(env: dict[str, str]) -> None:
    missing = "keyrotor_no_such_region"
    regions = {
        **env,
        "KEYROTOR_PRIMARY_REGION": "us-east-1",
        "KEYROTOR_REGIONS": "eu-west-1=" + env["DATABASE_URL"].rsplit("/", 1)[0] + "/" + missing,
        "KEYROTOR_REGION_EU_WEST_1__SECRETS_PROVIDER": "local",
        "KEYROTOR_REGION_EU_WEST_1__ENCRYPTION_KEY": OTHER_MASTER_KEY,
    }
    proc = keyrotor("replicas", "promote", "eu-west-1", "--yes", env=regions)
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr == (
        f"keyrotor: error: the database {missing!r} does not exist; it is not DATABASE_URL's: "
        "a secondary region's database is created by `keyrotor replicas init`\n"
    )


def test_processes_started_with_the_test_env_run_this_checkout(env: dict[str, str], tmp_path: Path) -> None:
    # Workers, schedulers and servers are started with `env` (plus PATH/HOME) from the console
    # script, whose own directory, not the checkout, leads sys.path (a cwd elsewhere stands for
    # it here): they must import the keyrotor these tests belong to, not the installed copy.
    proc = subprocess.run(
        [sys.executable, "-c", "import keyrotor; print(keyrotor.__file__)"],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        env={"PATH": os.environ.get("PATH", ""), **env},
        timeout=60,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == str(ROOT / "keyrotor" / "__init__.py")


def test_replicas_check_of_an_unreachable_region_does_not_offer_a_repair_that_cannot_help(
    env: dict[str, str],
) -> None:
    regions = {
        **env,
        "KEYROTOR_PRIMARY_REGION": "us-east-1",
        "KEYROTOR_REGIONS": "eu-west-1=" + env["DATABASE_URL"].rsplit("/", 1)[0] + "/keyrotor_no_such_region",
        "KEYROTOR_REGION_EU_WEST_1__SECRETS_PROVIDER": "local",
        "KEYROTOR_REGION_EU_WEST_1__ENCRYPTION_KEY": OTHER_MASTER_KEY,
    }
    assert keyrotor("secrets", "put", "openai", "prod", env=regions, stdin=KEY).returncode == 0
    proc = keyrotor("replicas", "check", env=regions)
    assert proc.returncode == 1
    assert "--repair" not in proc.stderr  # a repair writes nothing to a region it cannot reach
    assert proc.stderr.strip().splitlines()[-1] == (
        "unreachable: eu-west-1 (its database or its key did not answer; a region database never "
        "created: `keyrotor replicas init`)"
    )
