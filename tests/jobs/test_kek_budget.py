"""Two real ``keyrotor worker`` processes doing KEK work under one KEYROTOR_KEK_CALLS_PER_SECOND.

Each worker logs (at debug level) every spend of its budget (``kek_budget_spent``): the units,
the slot the budget granted (``slot_at``, on Redis's clock) and the moment the call was let
through (``at``). Merged, the two streams' slots must keep the one budget's pace, and no call
may go before its slot: with a budget per process, as before, they would run at twice the rate.

Why slots and not the moments calls went through: on a loaded machine a process may wake up
from its wait late, and its call then goes through close to the next process's, although the
budget spaced their slots correctly (the test failed so at load 8-10 on 2 cores, with 60 ms of
slack). Lateness is not something the budget can or should prevent; an early call is. The slots
are Redis's own schedule, exact to the microsecond whatever the load, so they are checked with
no allowance for it, and each call only against its own slot, which lateness cannot break.
Redis runs on this machine: its clock is the one ``time.time()`` reads.
"""

from __future__ import annotations

import json
from pathlib import Path

from keyrotor import KeyManager
from keyrotor.queue.client import KeyrotorClient
from tests.conftest import MASTER_KEY
from tests.jobs.conftest import settings_of
from tests.kek.test_budget import assert_paced
from tests.rotation_helpers import WorkerProcess

RATE = 8.0
# Slots are whole microseconds on Redis's clock, read here as float seconds since the epoch
# (about 0.2 us apart at this magnitude): the only allowance the checks need.
CLOCK_S = 0.001


async def test_two_workers_stay_within_one_kek_budget(wenv: dict[str, str], tmp_path: Path) -> None:
    env = {
        **wenv,
        "KEYROTOR_KEK_CALLS_PER_SECOND": str(RATE),
        "KEYROTOR_LOG_LEVEL": "DEBUG",
        "KEYROTOR_WORKER_MAX_JOBS": "4",
        "KEYROTOR_METRICS_PORT": "0",
    }
    s = settings_of(env)
    scopes = [f"tenant-{i}/openai" for i in range(12)]
    async with KeyManager(s.model_copy(update={"listen_key_changes": False})) as km:
        for i, scope in enumerate(scopes):
            await km.put_secret(scope, "prod", f"sk-proj-budget-{i:04d}-5d1c9a7e3b")
    # KEK v2 (as test_rotate_dek's single-worker budget test): a KEK rotation rewraps the 12
    # DEKs in chunks of one second's budget while the DEK rotations wrap and unwrap.
    env.update(
        ENCRYPTION_KEY="kek-budget-master-key-v2-9c7e5a3b1d2f4e6a8c0b",
        ENCRYPTION_KEY_VERSION="2",
        ENCRYPTION_KEYS_PREVIOUS=json.dumps({"1": MASTER_KEY}),
    )
    s = settings_of(env)
    workers = [WorkerProcess(env, tmp_path / f"w{i}.log") for i in range(2)]
    try:
        for w in workers:
            await w.wait_started()
        async with KeyrotorClient(s) as client:
            handles = [await client.rotate_kek()] + [await client.rotate(scope) for scope in scopes]
            for h in handles:  # a few KEK calls a DEK rotation, 3 a rewrapped DEK: ~80 at 8/s
                run = await h.result(timeout_s=120)
                assert run.state == "completed"
        spent = [[e for e in w.events() if e.get("event") == "kek_budget_spent"] for w in workers]
    finally:
        for w in workers:
            w.close()
    # Both workers did KEK work for rotations (a new DEK's wrap happens only in a rotation).
    for mine in spent:
        assert any(e["operation"] == "wrap" for e in mine), [e["operation"] for e in mine]
    assert any(e["operation"] == "rewrap" and e["units"] > 1 for mine in spent for e in mine)
    slots = [(float(e["slot_at"]), int(e["units"])) for mine in spent for e in mine]
    assert len(slots) >= len(scopes) + 2
    # The schedule the two workers were given keeps the pace over every stretch of the merged
    # stream, the whole of it included: between the starts of slots i and j, the units of
    # i..j-1 took at least units / RATE.
    assert_paced(slots, RATE, slack_s=CLOCK_S)
    # And every call waited for its slot (going late is the machine's doing; early, the budget's).
    early = [e for mine in spent for e in mine if float(e["at"]) < float(e["slot_at"]) - CLOCK_S]
    assert not early, early
