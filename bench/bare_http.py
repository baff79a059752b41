"""The HTTP ceiling of bench/bench_http.py: a bare aiohttp server, in its own process, whose
``POST /v1/decrypt`` reads the same JSON body as ``keyrotor serve``'s, decrypts the value with one
AES-GCM call (the AAD of the same length) and answers ``{"plaintext": ...}``; nothing else (no
token, no grant, no audit, no log). ``POST /v1/decrypt/batch`` does the same for each item of a
batch. With ``--durable DSN`` each request also INSERTs one row and
COMMITs it (autocommit, on a pool of connections) before it answers, a batch one row an item in
one transaction: what one durable write a request costs on this database, without keyrotor's
group commit.

    .venv/bin/python -m bench.bare_http --port 8199 --key HEX [--durable postgresql://...]

The readiness probe is ``GET /v1/health``.
"""

from __future__ import annotations

import argparse
import asyncio
import base64
import json
import signal

import asyncpg
from aiohttp import web
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

TABLE = "bench_bare_audit"
INSERT = f"INSERT INTO {TABLE} (scope, context) VALUES ($1, $2)"


def make_app(key: bytes, pool: asyncpg.Pool | None) -> web.Application:
    cipher = AESGCM(key)

    async def decrypt(request: web.Request) -> web.Response:
        doc = json.loads(await request.read())
        raw = base64.urlsafe_b64decode(doc["ciphertext"] + "==")
        aad = (doc["scope"] + "\x00" + doc["context"]).encode()
        plaintext = cipher.decrypt(raw[:12], raw[12:], aad).decode()
        if pool is not None:
            await pool.execute(INSERT, doc["scope"], doc["context"])
        return web.json_response({"plaintext": plaintext})

    async def decrypt_batch(request: web.Request) -> web.Response:
        doc = json.loads(await request.read())
        results = []
        for item in doc["items"]:
            raw = base64.urlsafe_b64decode(item["ciphertext"] + "==")
            aad = (doc["scope"] + "\x00" + item["context"]).encode()
            results.append({"plaintext": cipher.decrypt(raw[:12], raw[12:], aad).decode()})
        if pool is not None:
            rows = [(doc["scope"], item["context"]) for item in doc["items"]]
            await pool.executemany(INSERT, rows)  # one transaction: executemany is atomic
        return web.json_response({"results": results})

    async def health(request: web.Request) -> web.Response:
        return web.json_response({"status": "ok"})

    app = web.Application()
    app.router.add_post("/v1/decrypt", decrypt)
    app.router.add_post("/v1/decrypt/batch", decrypt_batch)
    app.router.add_get("/v1/health", health)
    return app


def seal(key: bytes, plaintext: str, scope: str, context: str, nonce: bytes) -> str:
    """A value the bare server opens (nonce || ciphertext || tag, unpadded base64url)."""
    aad = (scope + "\x00" + context).encode()
    raw = nonce + AESGCM(key).encrypt(nonce, plaintext.encode(), aad)
    return base64.urlsafe_b64encode(raw).rstrip(b"=").decode()


async def _keep_session(conn: asyncpg.Connection) -> None:
    """Nothing to reset: the pool has already rolled back any open transaction."""


async def main_async(port: int, key: bytes, durable: str | None) -> None:
    pool = None
    if durable:
        # reset=: asyncpg's default reset sends a query (RESET ALL, ...) each time a connection
        # goes back to the pool, a second round trip a request that a durable write does not need
        # (these connections change no session state).
        pool = await asyncpg.create_pool(durable, min_size=8, max_size=32, reset=_keep_session)
        await pool.execute(
            f"CREATE TABLE IF NOT EXISTS {TABLE} (id bigserial PRIMARY KEY, scope text, context text,"
            " created_at timestamptz DEFAULT now())"
        )
    runner = web.AppRunner(make_app(key, pool), access_log=None, handle_signals=False)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    stop = asyncio.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        asyncio.get_running_loop().add_signal_handler(sig, stop.set)
    await stop.wait()
    await runner.cleanup()
    if pool is not None:
        await pool.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--key", required=True, help="the AES-256 key, hex")
    parser.add_argument("--durable", default=None, help="a database URL: one INSERT+COMMIT a request")
    args = parser.parse_args()
    asyncio.run(main_async(args.port, bytes.fromhex(args.key), args.durable))


if __name__ == "__main__":
    main()
