"""The shared KEK call budget (keyrotor/kek/budget.py) against the real Redis.

Timing tolerance: the schedule is exact in Redis's clock, and a reservation says where its slot
starts on it (``Slot.starts_at``): pacing checks read that, so a caller that a busy machine woke
late cannot fail them. Where a test can only see when callers woke up (the processes' brackets,
total elapsed time), it allows ``SLACK_S`` = 60 ms of lag, far below the pace being checked (the
old per-process budget would be off by 100% of it, not by a few per cent).
"""

from __future__ import annotations

import asyncio
import json
import math
import os
import subprocess
import sys
import time
import uuid
from collections.abc import Sequence
from typing import Any, cast

import pytest
import redis.asyncio as aioredis

from keyrotor import Settings
from keyrotor.errors import ConfigurationError, QueueUnavailable
from keyrotor.kek.base import KekProvider, WrapContext
from keyrotor.kek.budget import SharedRateBudget, Slot, check_rate, kek_budget_key
from keyrotor.kek.factory import local_keyring, open_provider
from keyrotor.kek.metrics import KEK_ATTEMPT_FAILURES, KEK_CALLS
from keyrotor.kek.resilience import Throttled
from keyrotor.kek.throttle import ThrottledKek
from keyrotor.rotation.context import RotationContext
from keyrotor.settings import KekSettings
from tests.conftest import MASTER_KEY, REDIS_URL
from tests.kek.conftest import attempt_failures
from tests.rotation_helpers import keyrotor
from tests.servers import ServerProcess, aws_env, bao_root, create_kms_key, vault_env

SLACK_S = 0.06
CTX = WrapContext("tenant-5/openai", 1)


def assert_paced(events: Sequence[tuple[float, int]], rate: float, slack_s: float = SLACK_S) -> None:
    """Every run of consecutive acquisitions (time, units), in time order, was paid for:
    between the starts of acquisitions i and j, the units of i..j-1 took at least units / rate."""
    ordered = sorted(events)
    for i in range(len(ordered)):
        spent = 0
        for j in range(i + 1, len(ordered)):
            spent += ordered[j - 1][1]
            gap = ordered[j][0] - ordered[i][0]
            assert gap >= spent / rate - slack_s, (i, j, spent, gap, ordered)


def _key() -> str:
    return kek_budget_key(f"krtest:{uuid.uuid4().hex[:10]}")


async def test_fractional_rate_is_one_call_every_two_seconds(redis: aioredis.Redis) -> None:
    budget = SharedRateBudget(redis, _key(), 0.5)
    slots = []
    for _ in range(3):
        slots.append(await budget.acquire_slot())
        # acquire_slot returned no earlier than its slot (Redis runs on this machine's clock).
        assert time.time() >= slots[-1].starts_at - 0.001
    assert slots[0].wait_s == 0.0  # the first call of an idle budget goes at once
    # The spacing on Redis's clock is exact, however late a busy machine woke this caller.
    assert slots[1].starts_at - slots[0].starts_at == pytest.approx(2.0, abs=1e-5)
    assert slots[2].starts_at - slots[1].starts_at == pytest.approx(2.0, abs=1e-5)


async def test_several_units_at_once_cost_their_share(redis: aioredis.Redis) -> None:
    budget = SharedRateBudget(redis, _key(), 10)
    started = time.monotonic()
    assert await budget.acquire(3) == 0.0
    waited = await budget.acquire(1)
    # 3 units at 10/s: the next slot is 0.3 s after the first. The wait itself is shorter when a
    # busy machine delays the second call, so the bound that holds is on the time both took.
    assert time.monotonic() - started >= 0.3 - 0.01
    assert 0 < waited <= 0.3 + SLACK_S
    with pytest.raises(ValueError, match="at least 1"):
        await budget.acquire(0)


async def test_concurrent_coroutines_with_their_own_connections_share_one_pace(
    redis: aioredis.Redis,
) -> None:
    key, rate = _key(), 20.0
    clients = [aioredis.Redis.from_url(REDIS_URL) for _ in range(5)]
    events: list[tuple[float, int]] = []

    async def caller(client: aioredis.Redis) -> None:
        budget = SharedRateBudget(client, key, rate)
        for _ in range(6):
            # The slot the budget granted, on Redis's clock, not when this coroutine happened to
            # read the reply: on a busy machine a late read would make two slots look closer.
            slot = await budget.reserve_slot()
            events.append((slot.starts_at, 1))
            await asyncio.sleep(slot.wait_s)

    try:
        started = time.monotonic()
        await asyncio.wait_for(asyncio.gather(*(caller(c) for c in clients)), timeout=30)
        elapsed = time.monotonic() - started
    finally:
        for c in clients:
            await c.aclose()
    assert len(events) == 30
    assert_paced(events, rate, slack_s=1e-5)
    # 30 calls at 20/s: the last starts 29/20 s after the first; 5 separate budgets would take 0.25 s.
    assert elapsed >= 29 / rate - SLACK_S


_CHILD = """
import asyncio, json, sys, time
import redis.asyncio as aioredis
from keyrotor.rotation.context import RotationContext
from keyrotor.kek.budget import SharedRateBudget

async def main() -> None:
    client = aioredis.Redis.from_url(sys.argv[1])
    budget = SharedRateBudget(client, sys.argv[2], float(sys.argv[3]))
    out = []
    for _ in range(int(sys.argv[4])):
        # Where the granted slot starts, bracketed: Redis computed its wait at some moment
        # between these two reads, so the slot starts within [before + wait, after + wait].
        before = time.time()
        wait = await budget.reserve()
        out.append([before + wait, time.time() + wait])
        await asyncio.sleep(wait)
    await client.aclose()
    print(json.dumps(out))

asyncio.run(main())
"""


async def test_processes_share_one_budget(redis: aioredis.Redis) -> None:
    key, rate, per_process = _key(), 12.5, 8
    procs = [
        await asyncio.create_subprocess_exec(
            sys.executable, "-c", _CHILD, REDIS_URL, key, str(rate), str(per_process), stdout=subprocess.PIPE
        )
        for _ in range(3)
    ]
    outs = [await asyncio.wait_for(p.communicate(), timeout=60) for p in procs]
    assert all(p.returncode == 0 for p in procs)
    slots = sorted((lo, hi) for out, _ in outs for lo, hi in json.loads(out))
    assert len(slots) == 3 * per_process
    # Wall clocks of processes on one machine agree; the pace holds across all three. A slot is
    # known only within its bracket (a busy machine widens it). The slots bracketed from
    # slots[i]'s start on are j - i + 1 distinct slots, all starting after slots[i][0], so the
    # last of them starts at least (j - i) / rate later, and no later than the latest bracket
    # end among them: only a real overlap fails. Separate budgets per process would grant three
    # slots at once, gaps ~0 however wide the brackets.
    for i in range(len(slots)):
        latest = slots[i][1]
        for j in range(i + 1, len(slots)):
            latest = max(latest, slots[j][1])
            assert latest - slots[i][0] >= (j - i) / rate - SLACK_S, (i, j, slots)
    span = slots[-1][1] - slots[0][0]
    assert span >= (len(slots) - 1) / rate - SLACK_S


async def test_a_slot_says_when_it_starts_on_redis_clock(redis: aioredis.Redis) -> None:
    # What the workers log for tests/jobs/test_kek_budget.py: exact spacing, on Redis's clock
    # (this machine's: Redis runs here), however late the caller reads the reply.
    budget = SharedRateBudget(redis, _key(), 10)
    before = time.time()
    first = await budget.reserve_slot(3)
    after = time.time()
    assert first.wait_s == 0.0 and before - 0.001 <= first.starts_at <= after + 0.001
    second = await budget.reserve_slot()
    assert second.starts_at - first.starts_at == pytest.approx(0.3, abs=1e-5)
    assert 0 < second.wait_s <= 0.3


async def test_deployments_on_one_redis_have_a_budget_each(redis: aioredis.Redis) -> None:
    one = SharedRateBudget(redis, _key(), 1)
    other = SharedRateBudget(redis, _key(), 1)
    assert await one.acquire() == 0.0
    assert await other.acquire() == 0.0  # another queue name: not waiting for the first
    assert await one.reserve() > 0.9


async def test_idle_time_is_not_saved_up_for_a_burst(redis: aioredis.Redis) -> None:
    budget = SharedRateBudget(redis, _key(), 4)
    await budget.acquire()
    await asyncio.sleep(1.0)  # four calls' worth of idle time
    now = await budget.acquire_slot()
    assert now.wait_s == 0.0
    nxt = await budget.reserve_slot()  # the next still waits its 1/4 s after that one
    assert nxt.starts_at - now.starts_at == pytest.approx(0.25, abs=1e-5) and 0 < nxt.wait_s <= 0.25


@pytest.mark.parametrize("bad", [0, -1, math.nan, math.inf, -math.inf, 2e6, "5", True, None])
async def test_nonsense_rates_are_refused(redis: aioredis.Redis, bad: object) -> None:
    with pytest.raises(ConfigurationError, match="KEYROTOR_KEK_CALLS_PER_SECOND"):
        check_rate(bad)
    with pytest.raises(ConfigurationError):
        SharedRateBudget(redis, _key(), bad)  # type: ignore[arg-type]


@pytest.mark.parametrize("bad", ["abc", "-1", "nan", "inf", "-inf", "1e400", "2e6", ""])
def test_bad_settings_value_is_a_configuration_error(bad: str) -> None:
    with pytest.raises(ConfigurationError, match="KEYROTOR_KEK_CALLS_PER_SECOND"):
        Settings.from_env({"KEYROTOR_KEK_CALLS_PER_SECOND": bad})


@pytest.mark.parametrize("bad", ["abc", "-0.5", "nan", "inf"])
def test_the_worker_refuses_a_bad_value_in_one_line_exit_2(bad: str) -> None:
    out = keyrotor("worker", "--burst", env={"KEYROTOR_KEK_CALLS_PER_SECOND": bad})
    assert out.returncode == 2, out.stderr
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("keyrotor: error: invalid configuration: "), out.stderr
    assert "KEYROTOR_KEK_CALLS_PER_SECOND" in lines[0] and "Traceback" not in out.stderr


def test_fractions_are_accepted() -> None:
    s = Settings.from_env(
        {"KEYROTOR_KEK_CALLS_PER_SECOND": "0.5", "KEYROTOR_REENCRYPT_ROWS_PER_SECOND": "2.5"}
    )
    assert s.kek_calls_per_second == 0.5 and s.reencrypt_rows_per_second == 2.5
    with pytest.raises(ConfigurationError, match="KEYROTOR_REENCRYPT_ROWS_PER_SECOND"):
        Settings.from_env({"KEYROTOR_REENCRYPT_ROWS_PER_SECOND": "nan"})


async def test_unreachable_redis_is_a_transient_error_never_an_unthrottled_call() -> None:
    # Nothing listens on port 1: every round trip fails at once.
    dead = aioredis.Redis.from_url("redis://127.0.0.1:1/0", socket_connect_timeout=0.5)
    budget = SharedRateBudget(dead, _key(), 100, attempts=3, retry_delay_s=0.05)
    kek = ThrottledKek(local_keyring(Settings.from_env({"ENCRYPTION_KEY": MASTER_KEY})), budget)
    try:
        started = time.monotonic()
        with pytest.raises(QueueUnavailable, match="no KEK call is made without it"):
            await asyncio.wait_for(kek.wrap(b"\x00" * 32, WrapContext("anthropic", 1)), timeout=10)
        assert time.monotonic() - started >= 0.05 + 0.1  # it retried (0.05 s, then 0.1 s) first
        with pytest.raises(QueueUnavailable):
            await asyncio.wait_for(kek.check(), timeout=10)
    finally:
        await dead.aclose()


async def test_a_fractional_row_budget_paces_as_it_reads() -> None:
    # KEYROTOR_REENCRYPT_ROWS_PER_SECOND stays per process (an in-memory bucket); 0.5 is one
    # row every 2 s, not one a second.
    s = Settings.from_env({"ENCRYPTION_KEY": MASTER_KEY, "KEYROTOR_REENCRYPT_ROWS_PER_SECOND": "0.5"})
    rc = RotationContext(cast(Any, None), local_keyring(s), s)
    assert rc.batch_rows == 1
    started = time.monotonic()
    await rc.spend_rows(1)
    first = time.monotonic() - started
    await asyncio.wait_for(rc.spend_rows(1), timeout=5)
    second = time.monotonic() - started
    assert first < 0.05 and 1.95 <= second - first <= 2.0 + SLACK_S


# --- what the budget counts: requests sent to the provider, retries included ----------------


class CountingBudget(SharedRateBudget):
    """The real shared budget, counting the units it grants (every spend reserves its slot)."""

    units = 0

    async def reserve_slot(self, units: int = 1) -> Slot:
        self.units += units
        return await super().reserve_slot(units)


def requests_sent(provider: str) -> float:
    """Requests ``provider`` has sent in this process: one a successful call, one a failed attempt."""
    sent = 0.0
    for metric in (KEK_CALLS, KEK_ATTEMPT_FAILURES):
        for family in metric.collect():
            for sample in family.samples:
                labels = sample.labels
                mine = sample.name.endswith("_total") and labels["provider"] == provider
                if mine and (metric is KEK_ATTEMPT_FAILURES or labels["outcome"] == "ok"):
                    sent += sample.value
    return sent


async def budgeted(env: dict[str, str], budget: SharedRateBudget) -> KekProvider:
    """The provider of ``env`` with ``budget``, opened as the worker opens it."""
    return await open_provider(KekSettings.from_env(env), env, budget=budget)


async def test_a_throttled_vault_call_spends_a_unit_per_attempt(
    redis: aioredis.Redis, bao_server: ServerProcess
) -> None:
    env = {**vault_env(bao_server), "SECRETS_PROVIDER": "vault"}
    key = env["VAULT_TRANSIT_KEY"]
    root = bao_root(bao_server)
    quota = f"budget-{key}"
    budget = CountingBudget(redis, _key(), 1000)
    sent_before = requests_sent("vault")
    kek = await budgeted(env, budget)
    try:
        # One encrypt every 10 s: the first wrap takes it, the next is throttled on every attempt.
        root.sys.create_or_update_quota(quota, rate=1, path=f"transit/encrypt/{key}", interval="10s")
        await kek.wrap(os.urandom(32), CTX)
        throttled_before = attempt_failures("vault", "encrypt", "throttled")
        with pytest.raises(Throttled):
            await asyncio.wait_for(kek.wrap(os.urandom(32), CTX), timeout=30)
        assert attempt_failures("vault", "encrypt", "throttled") - throttled_before >= 2  # it retried
    finally:
        root.sys.delete_quota(quota)
        await kek.aclose()
    assert budget.units == requests_sent("vault") - sent_before


async def test_a_kms_rotation_spends_a_unit_per_request(
    redis: aioredis.Redis, moto_server: ServerProcess
) -> None:
    # rotate() polls ListKeyRotations and GetKeyRotationStatus besides RotateKeyOnDemand.
    env = {**aws_env(moto_server, AWS_KMS_KEY_ID=create_kms_key(moto_server)), "SECRETS_PROVIDER": "aws"}
    budget = CountingBudget(redis, _key(), 1000)
    sent_before = requests_sent("aws-kms")
    kek = await budgeted(env, budget)
    try:
        assert await asyncio.wait_for(kek.rotate(), timeout=30) == 2
        await kek.wrap(os.urandom(32), CTX)
    finally:
        await kek.aclose()
    sent = requests_sent("aws-kms") - sent_before
    assert sent >= 5
    assert budget.units == sent
