"""The machinery of the reliability suite: worker processes, the SIGKILL loop, the invariants.

Builds on tests/rotation_helpers.py (``WorkerProcess``, ``keyrotor``, ``seed``, ``check_values``);
what is here is what the crash, outage and concurrency suites share.
"""

from __future__ import annotations

import asyncio
import base64
import json
import os
import random
import re
import time
from collections.abc import Awaitable, Callable, Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import asyncpg
import redis.asyncio as aioredis

from keyrotor import KeyManager, Settings
from keyrotor.kek.base import WrapContext, WrappedDek
from keyrotor.kek.factory import local_keyring
from keyrotor.kek.install_salt import read_install_salt
from tests.rotation_helpers import WORKER_REDIS_URL, WorkerProcess, fetch, value_for

SLOW = os.environ.get("KEYROTOR_SLOW_TESTS") == "1"
OPEN_STATES = ("pending", "running")


def sized(default: int, slow: int) -> int:
    """The default size, or the issue's full size under KEYROTOR_SLOW_TESTS=1."""
    return slow if SLOW else default


class Workers:
    """``keyrotor worker`` subprocesses of one test, each with its own log file."""

    def __init__(self, tmp_path: Path) -> None:
        self.tmp_path = tmp_path
        self.started: list[WorkerProcess] = []

    def start(self, env: Mapping[str, str], *args: str) -> WorkerProcess:
        w = WorkerProcess(env, self.tmp_path / f"worker-{len(self.started)}.log", *args)
        self.started.append(w)
        return w

    def output(self) -> str:
        """Everything every worker of this test printed."""
        return "\n".join(w.output() for w in self.started)

    def events(self) -> list[dict[str, Any]]:
        return [e for w in self.started for e in w.events()]

    def close_all(self) -> None:
        for w in self.started:
            w.close()


async def run_row(database_url: str, run_id: int) -> asyncpg.Record:
    # The outage tests terminate connections: the poll's own may die too; poll again.
    for _ in range(50):
        try:
            return (await fetch(database_url, "SELECT * FROM rotations WHERE id = $1", run_id))[0]
        except (
            asyncpg.PostgresConnectionError,
            asyncpg.InterfaceError,
            asyncpg.exceptions.InternalClientError,  # killed between protocol states
            OSError,
        ):
            await asyncio.sleep(0.05)
    return (await fetch(database_url, "SELECT * FROM rotations WHERE id = $1", run_id))[0]


async def wait_run(
    database_url: str, run_id: int, *, rows_done: int = 0, terminal: bool = False, timeout_s: float = 120
) -> asyncpg.Record:
    """Poll the run until it has ``rows_done`` rows (or ended); with ``terminal``, until it ends."""
    deadline = time.monotonic() + timeout_s
    run = await run_row(database_url, run_id)
    while time.monotonic() < deadline:
        if run["state"] not in OPEN_STATES or (not terminal and run["rows_done"] >= rows_done):
            return run
        await asyncio.sleep(0.01)
        run = await run_row(database_url, run_id)
    raise AssertionError(f"run {run_id} stuck: {dict(run)}")


@dataclass
class CrashReport:
    """What one SIGKILL loop did."""

    kills: list[dict[str, Any]] = field(default_factory=list)
    seconds: float = 0.0

    @property
    def landed_mid_run(self) -> int:
        return sum(1 for k in self.kills if k["state"] in OPEN_STATES)


async def crash_loop(
    workers: Workers,
    env: Mapping[str, str],
    database_url: str,
    start_run: Callable[[], Awaitable[int]],
    *,
    total: int,
    kills: int,
    rng: random.Random,
    jitter_s: float,
    timeout_s: float = 180,
) -> tuple[int, CrashReport]:
    """Start a worker, start a run, then SIGKILL the worker ``kills`` times and restart it.

    Kill points are random fractions of the run's progress (0 = as soon as it exists, which
    lands between steps: before the first batch, during planning or promotion), each followed
    by a random pause of up to ``jitter_s`` so that the kill lands inside a batch, and once
    the run has ended, the kill still happens (recorded as not landed). Returns the run id,
    after the run has ended, and what happened.
    """
    t0 = time.monotonic()
    report = CrashReport()
    worker = workers.start(env)
    await worker.wait_started()
    run_id = await start_run()
    # At most 0.7: a restarted worker resumes at full speed (its rate budgets start full), so a
    # later point could otherwise find the run already finished.
    points = sorted(0.0 if rng.random() < 0.15 else rng.uniform(0.02, 0.7) for _ in range(kills))
    for p in points:
        await wait_run(database_url, run_id, rows_done=int(p * total), timeout_s=timeout_s)
        await asyncio.sleep(rng.uniform(0, jitter_s))
        before = await run_row(database_url, run_id)
        worker.kill()
        report.kills.append(
            {"at_fraction": round(p, 3), "rows_done": before["rows_done"], "state": before["state"]}
        )
        worker = workers.start(env)
        await worker.wait_started()
    run = await wait_run(database_url, run_id, terminal=True, timeout_s=timeout_s)
    report.seconds = round(time.monotonic() - t0, 2)
    assert run["state"] == "completed", dict(run)
    return run_id, report


async def assert_no_open_runs(database_url: str) -> None:
    """No run is left pending or running, and no range of a finished run is left pending."""
    stuck = await fetch(
        database_url, "SELECT id, kind, state FROM rotations WHERE state = ANY($1)", OPEN_STATES
    )
    assert stuck == [], [dict(r) for r in stuck]
    ranges = await fetch(database_url, "SELECT count(*) FROM rotation_ranges WHERE state <> 'done'")
    assert ranges[0][0] == 0


# --- secrets hygiene -------------------------------------------------------------------------


async def key_material(settings: Settings, *, extra_master_keys: Iterable[str] = ()) -> list[str]:
    """Every spelling of every DEK and wrapped DEK of the database, and the master keys."""
    forbidden = [settings.encryption_key.get_secret_value()] if settings.encryption_key else []
    forbidden += list(extra_master_keys)
    deks = await fetch(
        settings.database_url, "SELECT k.name, d.* FROM data_keys d JOIN key_scopes k ON k.id = d.scope_id"
    )
    keyring = local_keyring(settings, await read_install_salt(settings.database_url))
    for d in deks:
        if d["encrypted_dek"] is None:
            continue
        blob = bytes(d["encrypted_dek"])
        forbidden += [base64.b64encode(blob).decode(), blob.hex()]
        try:
            dek = keyring.unwrap_sync(
                WrappedDek(d["kek_id"], d["kek_version"], blob), WrapContext(d["name"], d["version"])
            )
        except Exception:  # noqa: S112 - wrapped under a KEK these settings do not hold
            continue
        forbidden += [dek.hex(), base64.b64encode(dek).decode(), base64.urlsafe_b64encode(dek).decode()]
    return forbidden


async def redis_payloads(queue: str, url: str = WORKER_REDIS_URL) -> list[bytes]:
    """Every string arq keeps for this queue: job payloads, results, in-progress markers."""
    client: Any = aioredis.from_url(url)
    try:
        out = []
        async for key in client.scan_iter(match=f"*{queue}*", count=1000):
            if (await client.type(key)) == b"string":
                value = await client.get(key)
                if value:
                    out.append(value)
        return out
    finally:
        await client.aclose()


async def db_texts(database_url: str) -> list[str]:
    """Audit rows (with metadata) and run errors: what the database keeps about operations."""
    rows = await fetch(
        database_url,
        "SELECT (to_jsonb(a) - 'prev_hash' - 'row_hash')::text FROM encryption_audit_log a",
    )
    runs = await fetch(database_url, "SELECT coalesce(error, '') FROM rotations")
    return [r[0] for r in rows] + [r[0] for r in runs]


# Every needle we look for (API keys, hex, base64, base64url, master keys) is made of these.
_TOKEN_CHARS = "A-Za-z0-9+/=_-"
_IS_TOKEN = re.compile(f"[{_TOKEN_CHARS}]+")


def assert_clean(haystacks: Iterable[str | bytes], forbidden: Iterable[str], *, where: str) -> int:
    """Assert no forbidden string occurs in any haystack. Returns how many bytes were scanned.

    A needle made only of token characters can occur only inside a maximal run of them, so
    only runs at least as long as the shortest needle are searched, by a set lookup of each
    window of each needle length: linear in the haystack, not needles x haystack (100,000
    values against megabytes of logs). Other needles are searched for directly.
    """
    needles = {s for s in forbidden if len(s) >= 8}
    plain = {s for s in needles if _IS_TOKEN.fullmatch(s)}
    odd = needles - plain
    lengths = sorted({len(s) for s in plain})
    runs = re.compile(f"[{_TOKEN_CHARS}]{{{lengths[0]},}}") if lengths else None
    scanned = 0
    for hay in haystacks:
        text = hay.decode("latin-1") if isinstance(hay, bytes) else hay
        scanned += len(text)
        for secret in odd:
            assert secret not in text, f"key material or plaintext found in {where}"
        if runs is None:
            continue
        for m in runs.finditer(text):
            run = m.group()
            for n in lengths:
                if n > len(run):
                    break
                for i in range(len(run) - n + 1):
                    assert run[i : i + n] not in plain, f"key material or plaintext found in {where}"
    return scanned


def json_lines(text: str) -> list[dict[str, Any]]:
    out = []
    for line in text.splitlines():
        try:
            doc = json.loads(line)
        except ValueError:
            continue
        if isinstance(doc, dict):
            out.append(doc)
    return out


def leaked_processes(queue: str, workers: Workers) -> list[str]:
    """Processes of this test's queue that nobody owns any more (e.g. pool children of a
    SIGKILLed worker): any process with the queue in its environment whose parent is neither
    this test nor a live worker."""
    live = {os.getpid()} | {w.proc.pid for w in workers.started if w.proc.poll() is None}
    marker = f"KEYROTOR_QUEUE_NAME={queue}".encode()
    out = []
    for d in Path("/proc").iterdir():
        if not d.name.isdigit() or int(d.name) in live:
            continue
        try:
            environ = (d / "environ").read_bytes().split(b"\0")
            stat = (d / "stat").read_text()
            cmd = (d / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace")
        except OSError:
            continue
        ppid = int(stat.rsplit(")", 1)[1].split()[1])
        if marker in environ and ppid not in live:
            out.append(f"{d.name} (ppid {ppid}): {cmd[:100]}")
    return out


async def assert_no_leaked_processes(queue: str, workers: Workers, timeout_s: float = 10) -> None:
    deadline = time.monotonic() + timeout_s
    while (leaked := leaked_processes(queue, workers)) and time.monotonic() < deadline:
        await asyncio.sleep(0.2)
    assert leaked == [], leaked


async def seed_scopes(settings: Settings, scopes: Iterable[str], per_scope: int) -> dict[str, dict[str, str]]:
    """``per_scope`` values in each scope, through one KeyManager (``seed`` opens one a call)."""
    out: dict[str, dict[str, str]] = {}
    async with KeyManager(settings.model_copy(update={"listen_key_changes": False})) as km:
        for scope in scopes:
            out[scope] = {f"k{i:06d}": value_for(scope, i) for i in range(per_scope)}
            await km.put_secrets(scope, list(out[scope].items()))
    return out
