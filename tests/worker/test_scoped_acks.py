"""``keyrotor columns ignore`` acknowledges a location for scopes, not for whoever writes there next.

An operator who says "the values at ``cache.token`` may be lost" has looked at the values there
now. A scope that begins storing values it needs at the same location later (a new feature
reusing a context, a new tenant) must keep its DEK versions until an operator says the same of
it: the acknowledgement covers the scopes with values recorded there when it was given, those
named with ``--scope``, or every scope, now and later, with ``--all-scopes``.
"""

from __future__ import annotations

import json
from typing import Any

import pytest

from keyrotor import KeyManager, Settings
from keyrotor.queue.client import KeyrotorClient
from keyrotor.rotation import dek as rotation
from keyrotor.rotation.context import RotationContext
from keyrotor.rotation.retire import LocationNotCovered
from tests.cli_helpers import keyrotor


def _json(env: dict[str, str], *args: str) -> Any:
    done = keyrotor(*args, "--json", env=env)
    assert done.returncode == 0, done.stderr
    return json.loads(done.stdout)


def _refused(env: dict[str, str], *args: str) -> str:
    done = keyrotor(*args, env=env)
    lines = done.stderr.strip().splitlines()
    assert done.returncode == 2 and len(lines) == 1 and lines[0].startswith("keyrotor: error: "), done
    return lines[0]


def _coverage(env: dict[str, str]) -> dict[str, str]:
    doc = _json(env, "columns", "list")
    return {v["scope"]: v["coverage"] for v in doc["locations"] if v["location"] == "cache.token"}


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
    assert _coverage(env) == {"anthropic": "acknowledged", "openai": "unregistered"}
    async with KeyrotorClient(s) as client:
        with pytest.raises(LocationNotCovered, match=r"cache\.token"):
            await client.retire("openai", 1, force_now=True)
        await client.retire("anthropic", 1, force_now=True)  # passes the census (a run is opened)

    # Named scopes, then every scope; taking one scope back leaves the others.
    assert _json(env, "columns", "ignore", "cache.token", "--scope", "openai", "--reason", "also a cache")[
        "acknowledged"
    ]["scopes"] == ["anthropic", "openai"]
    assert _coverage(env) == {"anthropic": "acknowledged", "openai": "acknowledged"}
    removed = _json(env, "columns", "unignore", "cache.token", "--scope", "anthropic")["removed"]
    assert removed["scopes"] == ["anthropic"]
    assert _coverage(env) == {"anthropic": "unregistered", "openai": "acknowledged"}
    every = _json(env, "columns", "ignore", "cache.token", "--all-scopes", "--reason", "all caches")
    assert every["acknowledged"]["scopes"] == ["*", "openai"]
    async with KeyManager(s) as km:
        await km.encrypt("mistral", "sk-mi-later-0123456789", context="cache.token:3")
    assert set(_coverage(env).items()) == {
        ("anthropic", "acknowledged"),
        ("mistral", "acknowledged"),
        ("openai", "acknowledged"),
    }

    # A scope without values there is a typo; --scope and --all-scopes together say two things.
    assert "no value of scope 'groq'" in _refused(
        env, "columns", "ignore", "cache.token", "--scope", "groq", "--reason", "x"
    )
    assert "not both" in _refused(
        env, "columns", "ignore", "cache.token", "--scope", "openai", "--all-scopes", "--reason", "x"
    )
    assert "not acknowledged for scope 'mistral'" in _refused(
        env, "columns", "unignore", "cache.token", "--scope", "mistral"
    )
