"""Two ``keyrotor serve`` processes and a worker together: every decrypt succeeds, through either
process, while a rotation changes the DEK underneath."""

from __future__ import annotations

import asyncio
import itertools
import time
from collections.abc import Iterator
from pathlib import Path

import aiohttp
import asyncpg
import pytest

from keyrotor import KeyManager, Settings
from keyrotor.api import tokens
from tests.api.processes import ServeProcess
from tests.cli_helpers import keyrotor
from tests.keyrotor.audit_helpers import verify
from tests.rotation_helpers import WorkerProcess, cleanup_queue, worker_env
from tests.servers import free_port

N = 40


@pytest.fixture
def cluster_env(env: dict[str, str]) -> Iterator[dict[str, str]]:
    wenv = worker_env(env)
    yield wenv
    asyncio.run(cleanup_queue(wenv["KEYROTOR_QUEUE_NAME"]))


async def test_decrypts_succeed_through_two_servers_during_a_rotation(
    cluster_env: dict[str, str], tmp_path: Path
) -> None:
    settings = Settings.from_env(cluster_env)
    async with KeyManager(settings) as km:
        token = (await tokens.create_token(km.sessions, "app", by="admin")).token
        await km.put_secrets("openai", [(f"k{i}", f"sk-{i}") for i in range(N)])
        held = [(await km.encrypt("openai", f"held-{i}", context=f"c:{i}"), i) for i in range(N)]
    servers = [ServeProcess(cluster_env, tmp_path / f"serve{n}.log") for n in (1, 2)]
    worker = WorkerProcess(cluster_env, tmp_path / "worker.log")
    try:
        for s in servers:
            s.wait_ready()
        await worker.wait_started(60)
        headers = {"Authorization": f"Bearer {token}"}
        async with aiohttp.ClientSession(headers=headers, timeout=aiohttp.ClientTimeout(total=20)) as http:
            failures: list[str] = []
            done = asyncio.Event()
            count = 0

            async def reader() -> None:
                nonlocal count
                for s, (ct, i) in zip(itertools.cycle(servers), itertools.cycle(held), strict=False):
                    if done.is_set():
                        return
                    body = {"scope": "openai", "ciphertext": ct, "context": f"c:{i}"}
                    async with http.post(s.url + "/v1/decrypt", json=body) as r:
                        doc = await r.json()
                        if r.status != 200 or doc.get("plaintext") != f"held-{i}":
                            failures.append(f"{r.status} {doc}")
                    async with http.get(f"{s.url}/v1/secrets/openai/k{i}") as r:
                        doc = await r.json()
                        if r.status != 200 or doc.get("value") != f"sk-{i}":
                            failures.append(f"{r.status} {doc}")
                    count += 1

            readers = [asyncio.create_task(reader()) for _ in range(4)]
            await asyncio.sleep(0.5)
            async with http.post(servers[0].url + "/v1/rotate/openai") as r:
                assert r.status == 202, await r.text()
                run_id = (await r.json())["run_id"]
            deadline = time.monotonic() + 90
            state = "pending"
            while state not in ("completed", "failed") and time.monotonic() < deadline:
                async with http.get(f"{servers[1].url}/v1/runs/{run_id}") as r:
                    state = (await r.json())["state"]
                await asyncio.sleep(0.2)
            await asyncio.sleep(0.5)  # reads after the switch too
            done.set()
            await asyncio.wait_for(asyncio.gather(*readers), 30)
            assert state == "completed", worker.output()[-3000:]
            assert failures == [] and count > N
            async with http.get(servers[1].url + "/v1/status") as r:
                (scope,) = (await r.json())["scopes"]
            assert scope["active_version"] == 2
    finally:
        worker.terminate(30)
        for s in servers:
            s.stop()


async def test_workers_share_one_port_and_stop_together(env: dict[str, str], tmp_path: Path) -> None:
    settings = Settings.from_env(env)
    async with KeyManager(settings) as km:
        token = (await tokens.create_token(km.sessions, "app", by="admin")).token
        held = [(await km.encrypt("openai", f"held-{i}", context=f"c:{i}"), i) for i in range(N)]
    server = ServeProcess(env, tmp_path / "serve.log", "--workers", "2")
    try:
        server.wait_ready()
        headers = {"Authorization": f"Bearer {token}"}
        timeout = aiohttp.ClientTimeout(total=20)
        for ct, i in held:  # a connection each: the kernel spreads them over both processes
            async with aiohttp.ClientSession(headers=headers, timeout=timeout) as http:
                body = {"scope": "openai", "ciphertext": ct, "context": f"c:{i}"}
                async with http.post(server.url + "/v1/decrypt", json=body) as r:
                    assert (r.status, await r.json()) == (200, {"plaintext": f"held-{i}"})
    finally:
        code = server.stop()
    assert code == 0, server.log()[-2000:]
    async with KeyManager(settings) as km:
        report = await verify(km)  # two writers, one chain
    conn = await asyncpg.connect(env["DATABASE_URL"])
    try:
        decrypts = await conn.fetchval(
            "SELECT count(*) FROM encryption_audit_log WHERE event_type = 'decrypt'"
        )
    finally:
        await conn.close()
    assert report.ok and decrypts == N


@pytest.mark.parametrize("workers", ["1", "2"])
def test_serve_reports_mistakes_in_one_line_with_any_number_of_workers(
    env: dict[str, str], tmp_path: Path, workers: str
) -> None:
    """A configuration mistake or a missing database is a user's mistake: `keyrotor serve` says so in
    one line and exits 2, whether it runs one process or starts several (`--workers`)."""
    no_db = env["DATABASE_URL"].rsplit("/", 1)[0] + "/kr_no_such_database"
    cases = [
        ({**env, "KEYROTOR_API_TLS_CERT": str(tmp_path / "missing.pem")}, "KEYROTOR_API_TLS_KEY"),
        ({**env, "KEYROTOR_API_TRUSTED_PROXIES": "not-a-proxy"}, "KEYROTOR_API_TRUSTED_PROXIES"),
        ({**env, "DATABASE_URL": no_db}, "keyrotor db upgrade"),
    ]
    for case_env, says in cases:
        proc = keyrotor("serve", "--port", str(free_port()), "--workers", workers, env=case_env, timeout=60)
        assert proc.returncode == 2, proc.stderr[-3000:]
        assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
        lines = proc.stderr.strip().splitlines()
        assert lines[0].startswith("keyrotor: error: ") and says in lines[0], lines
        assert all(line.startswith("keyrotor") for line in lines), lines
