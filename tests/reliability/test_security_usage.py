"""Security (#19, finding 5): the AES-GCM usage limit was soft.

The attack, as the review reproduced it: with ``KEYROTOR_MAX_ENCRYPTIONS_PER_DEK=3`` and rotation
disabled, 10 encryptions went through under one DEK; counts were only flushed every interval
(lost when a process died), and the limit could be set to 2**32, NIST's bound itself. Now the
counts are reserved in the database before use, the limit is a hard stop when rotation is
disabled (twice the limit, at most 2**31, when it is enabled) and no limit above 2**31 is taken.
"""

from __future__ import annotations

import asyncio
import os
import signal
import sys
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path

import pytest

from keyrotor import KeyManager, Settings
from keyrotor.census.usage import BLOCK_FIRST, HARD_CEILING
from keyrotor.errors import ConfigurationError, InvalidInput, KeyExhausted
from keyrotor.queue.client import KeyrotorClient
from keyrotor.schedule.rules import check_max_encryptions
from tests.rotation_helpers import fetch, run_burst_worker

ROOT = Path(__file__).resolve().parents[2]
API_KEY = "sk-ant-api03-" + "v" * 95
_USED = (
    "SELECT d.version, d.encryptions FROM data_keys d JOIN key_scopes s ON s.id = d.scope_id "
    "WHERE s.name = $1 ORDER BY d.version"
)


def _limited(env: dict[str, str], limit: int, *, rotation: bool) -> dict[str, str]:
    return {
        **env,
        "KEYROTOR_MAX_ENCRYPTIONS_PER_DEK": str(limit),
        "KEYROTOR_DEFAULT_ROTATION_ENABLED": "true" if rotation else "false",
        "KEYROTOR_LISTEN_KEY_CHANGES": "false",
        "KEYROTOR_USAGE_FLUSH_INTERVAL_SECONDS": "3600",  # nothing may depend on a flush
    }


async def _child(
    env: dict[str, str], scope: str, n: int, *, hold: bool = False
) -> asyncio.subprocess.Process:
    return await asyncio.create_subprocess_exec(
        sys.executable,
        "-m",
        "tests.reliability.usage_child",
        scope,
        str(n),
        *(["hold"] if hold else []),
        cwd=ROOT,
        env={**os.environ, **env},
        stdout=asyncio.subprocess.PIPE,
        stderr=asyncio.subprocess.PIPE,
    )


async def _outcomes(proc: asyncio.subprocess.Process) -> list[str]:
    """The outcomes of the child's calls, up to its ``done`` (deadline: 60 s)."""
    assert proc.stdout is not None
    lines: list[str] = []
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        line = (await asyncio.wait_for(proc.stdout.readline(), deadline - time.monotonic())).decode().strip()
        if not line or line == "done":
            break
        if line.startswith("call "):  # (the child's log lines go to stdout too)
            lines.append(line.removeprefix("call "))
    else:
        pytest.fail("the child did not finish in time")
    return lines


async def test_limit_3_rotation_disabled_two_processes_make_3_encryptions(
    env: dict[str, str], record: Callable[..., None]
) -> None:
    e = _limited(env, 3, rotation=False)
    async with KeyManager(Settings.from_env(e)) as km:  # the scope and its DEK, no encryption yet
        await km._active_record("anthropic")
    procs = [await _child(e, "anthropic", 5) for _ in range(2)]
    outcomes = Counter(o for lines in await asyncio.gather(*map(_outcomes, procs)) for o in lines)
    for p in procs:
        assert await asyncio.wait_for(p.wait(), 60) == 0
    assert outcomes == {"ok": 3, "KeyExhausted": 7}
    assert [tuple(r) for r in await fetch(e["DATABASE_URL"], _USED, "anthropic")] == [(1, 3)]
    # A third process, the library itself: refused with a typed error that says what to do.
    async with KeyManager(Settings.from_env(e)) as km:
        with pytest.raises(KeyExhausted, match=r"3 of at most 3 encryptions.*rotate"):
            await km.encrypt("anthropic", API_KEY)
    record(
        "security",
        finding=5,
        what="limit 3, rotation disabled: 2 processes x 5 encrypts, then a third process",
        tries=8,
        held=8,
        made=outcomes["ok"],
    )


async def test_a_killed_process_reservation_stays_counted(
    env: dict[str, str], record: Callable[..., None]
) -> None:
    e = _limited(env, 100, rotation=False)
    proc = await _child(e, "openai", 1, hold=True)
    try:
        assert await _outcomes(proc) == ["ok"]
        # Reserved before use: the whole first block is counted while the child holds it.
        assert [tuple(r) for r in await fetch(e["DATABASE_URL"], _USED, "openai")] == [(1, BLOCK_FIRST)]
    finally:
        proc.send_signal(signal.SIGKILL)
        await asyncio.wait_for(proc.wait(), 30)
    made = 0
    async with KeyManager(Settings.from_env(e)) as km:
        with pytest.raises(KeyExhausted):
            for _ in range(200):
                await km.encrypt("openai", API_KEY)
                made += 1
    # The killed process's unused reservation counts as used: fewer than 100 in all, never more.
    assert made == 100 - BLOCK_FIRST
    assert [tuple(r) for r in await fetch(e["DATABASE_URL"], _USED, "openai")] == [(1, 100)]
    record(
        "security",
        finding=5,
        what="a process SIGKILLed holding a reservation; another encrypts to the limit",
        tries=1,
        held=1,
        made=1 + made,
        lost=BLOCK_FIRST - 1,
    )


def test_no_limit_above_2_31_is_taken(env: dict[str, str], record: Callable[..., None]) -> None:
    for limit in (2**31 + 1, 2**32):
        with pytest.raises(ConfigurationError, match="KEYROTOR_MAX_ENCRYPTIONS_PER_DEK"):
            Settings.from_env({**env, "KEYROTOR_MAX_ENCRYPTIONS_PER_DEK": str(limit)})
        with pytest.raises(InvalidInput, match=r"1-2147483648"):
            check_max_encryptions(limit)
    assert check_max_encryptions(2**31) == HARD_CEILING
    record(
        "security", finding=5, what="limits of 2**31+1 and 2**32 refused (settings, policy)", tries=4, held=4
    )


async def test_a_stored_limit_of_2_32_stops_at_the_ceiling(
    env: dict[str, str], record: Callable[..., None]
) -> None:
    # A scope limit written before the ceiling existed (the policy accepted 2**32 then).
    e = _limited(env, 1000, rotation=False)
    async with KeyManager(Settings.from_env(e)) as km:
        await km._active_record("google")
    await fetch(
        e["DATABASE_URL"],
        "UPDATE key_scopes SET max_encryptions = 4294967296 WHERE name = 'google'",
    )
    await fetch(
        e["DATABASE_URL"],
        "UPDATE data_keys d SET encryptions = $1 FROM key_scopes s "
        "WHERE s.id = d.scope_id AND s.name = 'google'",
        HARD_CEILING - 2,
    )
    async with KeyManager(Settings.from_env(e)) as km:
        await km.encrypt("google", API_KEY)
        await km.encrypt("google", API_KEY)
        with pytest.raises(KeyExhausted):
            await km.encrypt("google", API_KEY)
    assert [tuple(r) for r in await fetch(e["DATABASE_URL"], _USED, "google")] == [(1, HARD_CEILING)]
    record("security", finding=5, what="a stored limit of 2**32 stops at 2**31", tries=1, held=1)


async def test_rotation_enabled_stops_at_twice_the_limit_until_rotated(
    wenv: dict[str, str], record: Callable[..., None]
) -> None:
    e = _limited(wenv, 3, rotation=True)
    s = Settings.from_env(e)
    due = "SELECT next_rotation_at <= now() FROM key_scopes WHERE name = 'mistral'"
    async with KeyManager(s) as km:
        for i in range(3):
            await km.encrypt("mistral", API_KEY, context=f"m:{i}")
        assert (await fetch(e["DATABASE_URL"], due))[0][0] is True  # due at the limit, no flush
        for i in range(3, 6):  # room for the rotation to happen
            await km.encrypt("mistral", API_KEY, context=f"m:{i}")
        with pytest.raises(KeyExhausted):
            await km.encrypt("mistral", API_KEY)
        async with KeyrotorClient(s) as client:
            handle = await client.rotate("mistral")
            await run_burst_worker(s)
            await handle.result(timeout_s=30)
        # This process missed the announcement (no listener): the refusal re-reads the active
        # version, and the new DEK takes the value.
        token = await km.encrypt("mistral", API_KEY)
        assert token.startswith("kr1:2:")
    assert [tuple(r) for r in await fetch(e["DATABASE_URL"], _USED, "mistral")] == [(1, 6), (2, 1)]
    record(
        "security", finding=5, what="limit 3, rotation enabled: refused at 6 until rotated", tries=1, held=1
    )
