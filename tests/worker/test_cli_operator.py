"""What an operator meets on the command line: checks that say what is wrong, and servers that
fail in one line naming the address they could not take. Real processes, real Postgres."""

from __future__ import annotations

import json

from tests.cli_helpers import keyrotor
from tests.conftest import MASTER_KEY

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
