"""worker/http.py in-process: readiness follows its checks, the KEK check is cached, a taken
port does not stop the process."""

from __future__ import annotations

import asyncio
import contextlib
import json
import socket

import aiohttp

from keyrotor.worker.http import OPS_SHUTDOWN_TIMEOUT_S, KekCheckCache, OpsServer


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


async def test_readyz_follows_the_checks_and_errors_name_only_the_class() -> None:
    state = {"redis_up": True}

    async def postgres() -> None:
        return None

    async def redis() -> None:
        if not state["redis_up"]:
            raise ConnectionError("redis://:hunter2@10.0.0.1:6379 refused")

    port = _port()
    server = OpsServer(
        role="worker", host="127.0.0.1", port=port, checks={"postgres": postgres, "redis": redis}
    )
    assert await server.start()
    try:
        async with aiohttp.ClientSession() as http:
            async with http.get(f"http://127.0.0.1:{port}/readyz") as resp:
                assert resp.status == 200
            state["redis_up"] = False
            async with http.get(f"http://127.0.0.1:{port}/readyz") as resp:
                body = json.loads(await resp.text())
                assert resp.status == 503
                assert body["checks"]["redis"] == {"ok": False, "error": "ConnectionError"}
                assert body["checks"]["postgres"]["ok"] is True
            async with http.get(f"http://127.0.0.1:{port}/healthz") as resp:
                assert resp.status == 200  # alive, just not ready
            async with http.get(f"http://127.0.0.1:{port}/metrics") as resp:
                assert resp.status == 200 and "keyrotor_rotations_completed_total" in await resp.text()
    finally:
        await server.stop()


async def test_kek_check_is_cached_and_remembers_failure() -> None:
    calls = 0
    fail = False

    async def check() -> None:
        nonlocal calls
        calls += 1
        if fail:
            raise TimeoutError

    cached = KekCheckCache(check, ttl_s=0.2)
    assert await cached() == "ok" and await cached() == "ok"
    assert calls == 1
    fail = True
    await asyncio.sleep(0.25)
    for _ in range(2):
        try:
            await cached()
        except RuntimeError as exc:
            assert str(exc) == "TimeoutError"
        else:
            raise AssertionError("a failed KEK check must fail readiness")
    assert calls == 2


async def test_a_taken_port_is_reported_not_fatal() -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        server = OpsServer(role="worker", host="127.0.0.1", port=port, checks={})
        assert await server.start() is False
        await server.stop()


async def test_readyz_never_echoes_a_check_errors_text() -> None:
    """Only the KEK check's own failure (a class name it recorded) is reported as text; any other
    error, a RuntimeError from a driver included, is named by its class."""

    async def redis() -> None:
        raise RuntimeError("pool for redis://:hunter2pw@10.0.0.1:6379/0 is closed")

    failed_kek = KekCheckCache(_raise_timeout, ttl_s=60)  # a KEK that stopped answering

    port = _port()
    server = OpsServer(role="worker", host="127.0.0.1", port=port, checks={"redis": redis, "kek": failed_kek})
    assert await server.start()
    try:
        async with (
            aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=10)) as http,
            http.get(f"http://127.0.0.1:{port}/readyz") as resp,
        ):
            text = await resp.text()
    finally:
        await server.stop()
    assert "hunter2pw" not in text
    body = json.loads(text)
    assert body["checks"]["redis"] == {"ok": False, "error": "RuntimeError"}
    assert body["checks"]["kek"] == {"ok": False, "error": "TimeoutError"}


async def _raise_timeout() -> None:
    raise TimeoutError


async def test_stop_does_not_wait_long_for_a_request_in_flight() -> None:
    # A check that holds on past its cancellation (a driver finishing a round trip, say) kept
    # aiohttp's shutdown waiting up to 60 s; a stopping process has a grace to keep.
    port = _port()
    entered = asyncio.Event()

    async def stubborn() -> None:
        entered.set()
        try:
            await asyncio.sleep(30)
        except asyncio.CancelledError:
            await asyncio.sleep(30)

    server = OpsServer(role="worker", host="127.0.0.1", port=port, checks={"postgres": stubborn})
    assert await server.start()
    async with aiohttp.ClientSession() as http:
        request = asyncio.ensure_future(http.get(f"http://127.0.0.1:{port}/readyz"))
        await asyncio.wait_for(entered.wait(), 10)
        loop = asyncio.get_running_loop()
        t0 = loop.time()
        await asyncio.wait_for(server.stop(), 30)
        assert loop.time() - t0 < 2 * OPS_SHUTDOWN_TIMEOUT_S + 1
        request.cancel()
        with contextlib.suppress(asyncio.CancelledError, aiohttp.ClientError):
            await request
