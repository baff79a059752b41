"""``keyrotor columns ignore`` acknowledges a location for scopes, not for whoever writes there next.

An operator who says "the values at ``cache.token`` may be lost" has looked at the values there
now. A scope that begins storing values it needs at the same location later (a new feature
reusing a context, a new tenant) must keep its DEK versions until an operator says the same of
it: the acknowledgement covers the scopes with values recorded there when it was given, those
named with ``--scope``, or every scope, now and later, with ``--all-scopes``.
"""

from __future__ import annotations

import json
import os
import subprocess
from typing import Any

import pytest

from keyrotor import KeyManager, Settings
from keyrotor.census import report as census_report
from keyrotor.queue.client import KeyrotorClient
from keyrotor.rotation import dek as rotation
from keyrotor.rotation.context import RotationContext
from keyrotor.rotation.retire import LocationNotCovered
from keyrotor.store import db
from tests.cli_helpers import BIN, keyrotor


def _json(env: dict[str, str], *args: str) -> Any:
    done = keyrotor(*args, "--json", env=env)
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout)


def _refused(env: dict[str, str], *commands: tuple[str, ...]) -> list[str]:
    """Run ``commands`` at once (each refuses its input): exit 2 and one line each."""
    full = {"PATH": os.environ.get("PATH", ""), "HOME": os.environ.get("HOME", "/root"), **env}
    procs = [
        subprocess.Popen(
            [str(BIN), *args], env=full, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True
        )
        for args in commands
    ]
    lines = []
    for proc in procs:
        _, err = proc.communicate(timeout=60)
        got = err.strip().splitlines()
        assert proc.returncode == 2 and len(got) == 1 and got[0].startswith("keyrotor: error: "), err
        lines.append(got[0])
    return lines


async def _coverage(s: Settings) -> dict[str, str]:
    """What `columns list` shows for cache.token, per scope (its code, in this process)."""
    engine = db.create_engine(s.database_url)
    try:
        async with db.transaction(db.sessionmaker(engine)) as session:
            views = await census_report.list_locations(session)
    finally:
        await engine.dispose()
    return {v.scope: v.coverage for v in views if v.location == "cache.token"}


async def test_an_acknowledgement_covers_its_scopes_not_one_that_writes_there_later(
    env: dict[str, str],
) -> None:
    s = Settings.from_env(env)
    async with KeyManager(s) as km:
        await km.encrypt("anthropic", "sk-ant-cached-0123456789", context="cache.token:1")
    acked = _json(env, "columns", "ignore", "cache.token", "--reason", "a cache, rebuilt daily")
    assert acked["acknowledged"]["scopes"] == ["anthropic"]

    # Later another scope stores a value it needs at the same location; both scopes rotate.
    async with KeyManager(s) as km:
        await km.encrypt("openai", "sk-oa-needed-0123456789", context="cache.token:2")
        rc = RotationContext(km.sessions, km.kek, s)
        for scope in ("anthropic", "openai"):
            await rotation.rotate_dek(rc, scope)
    assert await _coverage(s) == {"anthropic": "acknowledged", "openai": "unregistered"}
    async with KeyrotorClient(s) as client:
        with pytest.raises(LocationNotCovered, match=r"cache\.token"):
            await client.retire("openai", 1, force_now=True)
        await client.retire("anthropic", 1, force_now=True)  # passes the census (a run is opened)

    # Named scopes, then every scope; taking one scope back leaves the others.
    assert _json(env, "columns", "ignore", "cache.token", "--scope", "openai", "--reason", "also a cache")[
        "acknowledged"
    ]["scopes"] == ["anthropic", "openai"]
    assert await _coverage(s) == {"anthropic": "acknowledged", "openai": "acknowledged"}
    removed = _json(env, "columns", "unignore", "cache.token", "--scope", "anthropic")["removed"]
    assert removed["scopes"] == ["anthropic"]
    assert await _coverage(s) == {"anthropic": "unregistered", "openai": "acknowledged"}
    every = _json(env, "columns", "ignore", "cache.token", "--all-scopes", "--reason", "all caches")
    assert every["acknowledged"]["scopes"] == ["*", "openai"]
    async with KeyManager(s) as km:
        await km.encrypt("mistral", "sk-mi-later-0123456789", context="cache.token:3")
    assert set((await _coverage(s)).items()) == {
        ("anthropic", "acknowledged"),
        ("mistral", "acknowledged"),
        ("openai", "acknowledged"),
    }

    # A scope without values there is a typo; --scope and --all-scopes together say two things.
    typo, both, unacked = _refused(
        env,
        ("columns", "ignore", "cache.token", "--scope", "groq", "--reason", "x"),
        ("columns", "ignore", "cache.token", "--scope", "openai", "--all-scopes", "--reason", "x"),
        ("columns", "unignore", "cache.token", "--scope", "mistral"),
    )
    assert "no value of scope 'groq'" in typo
    assert "not both" in both
    assert "not acknowledged for scope 'mistral'" in unacked
    # What the operator sees lists the same coverage.
    listed = _json(env, "columns", "list")["locations"]
    assert {v["scope"]: v["coverage"] for v in listed if v["location"] == "cache.token"} == await _coverage(s)
