"""Health follows real outages: ``keyrotor health`` and the processes' ``/readyz`` go red when a
Redis or a PostgreSQL server is really stopped, and green again when it is back.

The machine's shared Postgres and Redis are never stopped: each test runs its own server (a
throwaway Postgres cluster from ``tests/reliability/pg_cluster.py``, or a private
``redis-server``) with a worker and a scheduler against it.
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import signal
import subprocess
import time
from collections.abc import Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from keyrotor import Settings
from keyrotor.store import db
from keyrotor.worker.cli.health import collect, healthy
from tests.reliability.pg_cluster import throwaway_cluster
from tests.rotation_helpers import BIN, WorkerProcess, cleanup_queue, keyrotor, worker_env
from tests.worker.test_ops import ALL_GREEN, free_port, get

DEADLINE_S = 45.0


def _spawn(args: list[str], env: dict[str, str], log_path: Path) -> subprocess.Popen[bytes]:
    full = {"PATH": os.environ.get("PATH", ""), "HOME": os.environ.get("HOME", "/root"), **env}
    with log_path.open("ab") as out:
        return subprocess.Popen(args, env=full, stdout=out, stderr=subprocess.STDOUT)


class PrivateRedis:
    """A ``redis-server`` of one test's own on a free loopback port, which it may stop and start."""

    def __init__(self) -> None:
        self.port = free_port()
        self.url = f"redis://127.0.0.1:{self.port}/0"
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        self.proc = subprocess.Popen(
            [
                "redis-server",
                "--port",
                str(self.port),
                "--bind",
                "127.0.0.1",
                "--save",
                "",
                "--appendonly",
                "no",
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )
        for _ in range(200):
            ping = subprocess.run(
                ["redis-cli", "-p", str(self.port), "ping"], capture_output=True, check=False
            )
            if ping.stdout.strip() == b"PONG":
                return
            time.sleep(0.05)
        raise AssertionError("private redis-server did not start")

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)  # a crash, not a clean shutdown
            self.proc.wait(10)
        self.proc = None


@pytest.fixture
def private_redis() -> Iterator[PrivateRedis]:
    if shutil.which("redis-server") is None:
        pytest.skip("redis-server is not installed")
    server = PrivateRedis()
    server.start()
    try:
        yield server
    finally:
        server.stop()


class Processes:
    """A worker and a scheduler, restarted the way a supervisor (systemd, Kubernetes) would."""

    def __init__(self, env: dict[str, str], tmp_path: Path) -> None:
        self.env = env
        self.tmp_path = tmp_path
        self.worker_port = free_port()
        self.sched_port = free_port()
        self.worker: WorkerProcess | None = None
        self.scheduler: subprocess.Popen[bytes] | None = None
        self.restarts = 0

    def _worker_env(self) -> dict[str, str]:
        return {
            **self.env,
            "KEYROTOR_METRICS_PORT": str(self.worker_port),
            "KEYROTOR_METRICS_HOST": "127.0.0.1",
        }

    def start(self) -> None:
        self.worker = WorkerProcess(self._worker_env(), self.tmp_path / "worker.log")
        sched_env = {
            **self.env,
            "KEYROTOR_METRICS_PORT": str(self.sched_port),
            "KEYROTOR_METRICS_HOST": "127.0.0.1",
        }
        self.scheduler = _spawn([str(BIN), "scheduler"], sched_env, self.tmp_path / "scheduler.log")

    def supervise(self) -> None:
        """Restart a process that exited (arq's worker exits when Redis goes away)."""
        assert self.worker is not None and self.scheduler is not None
        if self.worker.proc.poll() is not None:
            self.worker.close()
            self.worker = WorkerProcess(self._worker_env(), self.tmp_path / "worker.log")
            self.restarts += 1
        if self.scheduler.poll() is not None:
            sched_env = {
                **self.env,
                "KEYROTOR_METRICS_PORT": str(self.sched_port),
                "KEYROTOR_METRICS_HOST": "127.0.0.1",
            }
            self.scheduler = _spawn([str(BIN), "scheduler"], sched_env, self.tmp_path / "scheduler.log")
            self.restarts += 1

    def logs(self) -> str:
        return "\n".join(
            f"--- {p.name}\n" + p.read_text(errors="replace")[-3000:]
            for p in sorted(self.tmp_path.glob("*.log"))
        )

    def stop(self) -> dict[str, int]:
        codes: dict[str, int] = {}
        if self.scheduler is not None and self.scheduler.poll() is None:
            self.scheduler.send_signal(signal.SIGTERM)
            codes["scheduler"] = self.scheduler.wait(30)
        if self.worker is not None and self.worker.proc.poll() is None:
            codes["worker"] = self.worker.terminate(30)
        return codes

    def close(self) -> None:
        if self.scheduler is not None and self.scheduler.poll() is None:
            self.scheduler.kill()
            self.scheduler.wait(10)
        if self.worker is not None:
            self.worker.close()


@pytest.fixture
def processes(tmp_path: Path) -> Iterator[list[Processes]]:
    started: list[Processes] = []
    yield started
    for p in started:
        p.close()


def _health(env: dict[str, str]) -> tuple[int, dict[str, Any]]:
    result = keyrotor("health", "--json", env=env, timeout=60)
    assert result.stdout, result.stderr
    doc: dict[str, Any] = json.loads(result.stdout)
    return result.returncode, doc


def _status(port: int, path: str) -> int:
    try:
        return get(port, path)[0]
    except OSError:  # not listening (yet)
        return 0


def _statuses(doc: dict[str, Any]) -> dict[str, str]:
    return {name: check["status"] for name, check in doc["checks"].items()}


Condition = Callable[[], Awaitable[tuple[bool, dict[str, Any]]]]


async def _until(condition: Condition, procs: Processes, what: str) -> tuple[bool, dict[str, Any]]:
    """Poll ``condition()`` (supervising the processes) until its first item is true."""
    deadline = time.monotonic() + DEADLINE_S
    last: Any = None
    while time.monotonic() < deadline:
        procs.supervise()
        last = await condition()
        if last[0]:
            return last
        await asyncio.sleep(0.25)
    raise AssertionError(f"{what}: last {last!r}\n{procs.logs()}")


async def _green_here(env: dict[str, str]) -> tuple[bool, dict[str, Any]]:
    """The checks of ``keyrotor health``, run in this process: a cheap first look, so that the
    command (a Python start-up of 1-2 s each time) runs only once they all pass."""
    results = await collect(Settings.from_env(env))
    return healthy(results), {"checks": results}


async def _upgrade(url: str) -> None:
    """What ``keyrotor db upgrade`` does (create the database, migrate), without its start-up."""
    await db.ensure_database(url)
    engine = db.create_engine(url)
    try:
        await db.upgrade(engine)
    finally:
        await engine.dispose()


def _green(env: dict[str, str]) -> Condition:
    async def check() -> tuple[bool, dict[str, Any]]:
        here = await _green_here(env)
        if not here[0]:
            return here
        code, doc = _health(env)  # the command's own answer is the one that counts
        return code == 0, doc

    return check


async def test_health_red_while_redis_is_stopped_green_when_back(
    env: dict[str, str], private_redis: PrivateRedis, tmp_path: Path, processes: list[Processes]
) -> None:
    wenv = worker_env(env, REDIS_URL=private_redis.url, KEYROTOR_SCAN_INTERVAL_SECONDS="1")
    wenv["KEYROTOR_SCHEDULER_LEADER_KEY"] = f"{wenv['KEYROTOR_QUEUE_NAME']}:scheduler:leader"
    procs = Processes(wenv, tmp_path)
    processes.append(procs)
    procs.start()

    _, doc = await _until(_green(wenv), procs, "health never went green")
    assert _statuses(doc) == ALL_GREEN

    private_redis.stop()
    code, doc = _health(wenv)
    assert code == 1
    statuses = _statuses(doc)
    assert statuses["redis"] == "fail" and statuses["postgres"] == "ok" and statuses["kek"] == "ok"
    assert statuses["worker"] == "fail" and statuses["scheduler"] == "fail"  # both are read from Redis
    assert "127.0.0.1" not in json.dumps(doc)  # errors name classes, not URLs
    # The scheduler stays up without Redis and says it is not ready.
    status, body = get(procs.sched_port, "/readyz")
    assert status == 503 and json.loads(body)["checks"]["redis"]["ok"] is False, body

    private_redis.start()  # back, empty
    _, doc = await _until(_green(wenv), procs, "health never went green again")
    assert _statuses(doc) == ALL_GREEN
    status, _ = get(procs.sched_port, "/readyz")
    assert status == 200
    assert set(procs.stop().values()) <= {0}


async def test_health_red_while_postgres_is_stopped_green_when_back(
    tmp_path: Path, processes: list[Processes]
) -> None:
    from tests.conftest import MASTER_KEY
    from tests.rotation_helpers import WORKER_REDIS_URL

    with throwaway_cluster() as cluster:
        base = {
            "DATABASE_URL": cluster.url("keyrotor"),
            "REDIS_URL": WORKER_REDIS_URL,
            "ENCRYPTION_KEY": MASTER_KEY,
            "SECRETS_PROVIDER": "local",
        }
        wenv = worker_env(base, KEYROTOR_SCAN_INTERVAL_SECONDS="1")
        wenv["KEYROTOR_SCHEDULER_LEADER_KEY"] = f"{wenv['KEYROTOR_QUEUE_NAME']}:scheduler:leader"
        try:
            await _upgrade(wenv["DATABASE_URL"])
            procs = Processes(wenv, tmp_path)
            processes.append(procs)
            procs.start()
            _, doc = await _until(_green(wenv), procs, "health never went green")
            assert _statuses(doc) == ALL_GREEN

            cluster.stop()  # immediate: every connection cut, as in a crash
            code, doc = _health(wenv)
            assert code == 1
            statuses = _statuses(doc)
            assert statuses["postgres"] == "fail" and statuses["redis"] == "ok", statuses
            assert str(cluster.port) not in json.dumps(doc)  # no URL in an error
            for port in (procs.worker_port, procs.sched_port):
                status, body = get(port, "/readyz")
                assert status == 503 and json.loads(body)["checks"]["postgres"]["ok"] is False, body
                status, _ = get(port, "/healthz")
                assert status == 200  # alive: a restart would not bring the database back

            cluster.start()

            async def ready_again() -> tuple[bool, dict[str, Any]]:
                ready = [_status(p, "/readyz") for p in (procs.worker_port, procs.sched_port)]
                if ready != [200, 200]:
                    return False, {"readyz": ready}
                here = await _green_here(wenv)
                if not here[0]:
                    return here
                code, doc = _health(wenv)
                ready = [_status(p, "/readyz") for p in (procs.worker_port, procs.sched_port)]
                return code == 0 and ready == [200, 200], doc

            _, doc = await _until(ready_again, procs, "health never went green again")
            assert _statuses(doc) == ALL_GREEN
            assert procs.restarts == 0  # both processes rode out the database outage
            assert set(procs.stop().values()) <= {0}
        finally:
            await cleanup_queue(wenv["KEYROTOR_QUEUE_NAME"])
