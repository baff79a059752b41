"""Every error answer of ``keyrotor serve`` is the one envelope, with what a client needs to act.

A path no route serves is told apart from a missing resource; a throttled legacy decrypt says
when to retry; an unhealthy ``/v1/health`` still answers in the error envelope, and tells an
outage from a database without keyrotor's schema.
"""

from __future__ import annotations

from urllib.parse import urlsplit

import asyncpg
import pytest
from aiohttp.test_utils import TestClient, TestServer

from keyrotor import KeyManager, Settings
from keyrotor.api.app import create_app
from keyrotor.crypto import legacy_format
from tests.api.conftest import Api
from tests.legacy_helpers import store_legacy_secret
from tests.replication.proxy import PgProxy


async def test_a_path_no_route_serves_is_not_a_missing_resource(api: Api) -> None:
    resp = await api.client.get("/v1/secretz/openai/prod", headers=api.auth())
    assert resp.status == 404
    assert (await resp.json())["error"]["code"] == "no_route"
    # A missing secret keeps its own code, so a client can tell the two apart.
    resp = await api.client.get("/v1/secrets/openai/missing", headers=api.auth())
    assert resp.status == 404 and (await resp.json())["error"]["code"] == "not_found"


@pytest.fixture
def api_env(env: dict[str, str]) -> dict[str, str]:
    # This module's server: one failed legacy decrypt a minute, so the second is refused.
    return {**env, "KEYROTOR_API_TOKEN_CACHE_SECONDS": "0", "KEYROTOR_LEGACY_FAILURES_PER_MINUTE": "1"}


@pytest.mark.timeout(120)
async def test_a_throttled_legacy_decrypt_says_when_to_retry(api: Api, api_env: dict[str, str]) -> None:
    # Sealed under another master key: authentication fails after the scrypt derivation. Stored
    # as the old backend's rows were imported, since a legacy value opens only through its row.
    foreign = legacy_format.encrypt("sk-foreign", "another-master-key-0123456789abcdef0123")
    await api.km.put_secret("openai", "other", "sk-1")  # the scope exists
    await store_legacy_secret(api_env["DATABASE_URL"], "openai", "prod", foreign)
    doc = {"scope": "openai", "ciphertext": foreign, "context": "secret:prod"}
    first = await api.client.post("/v1/decrypt", json=doc, headers=api.auth())
    assert first.status == 400, await first.text()
    second = await api.client.post("/v1/decrypt", json=doc, headers=api.auth())
    assert second.status == 429
    assert (await second.json())["error"]["code"] == "throttled"
    assert 1 <= int(second.headers["Retry-After"]) <= 60


@pytest.mark.timeout(60)
async def test_an_unhealthy_health_answers_in_the_error_envelope(api_env: dict[str, str]) -> None:
    proxy = PgProxy()
    await proxy.start()
    database = urlsplit(api_env["DATABASE_URL"]).path.lstrip("/")
    settings = Settings.from_env({**api_env, "DATABASE_URL": proxy.url(database)})
    try:
        async with KeyManager(settings) as km, TestClient(TestServer(create_app(settings, km=km))) as client:
            assert (await (await client.get("/v1/health")).json()) == {"status": "ok"}
            await proxy.cut()
            resp = await client.get("/v1/health")
            assert resp.status == 503
            doc = await resp.json()
            assert doc["status"] == "unavailable"
            assert doc["error"]["code"] == "unavailable" and doc["error"]["message"]
            await proxy.start()  # back, so the manager closes cleanly
    finally:
        await proxy.cut()


@pytest.mark.timeout(60)
async def test_a_database_without_the_schema_is_misconfigured(api_env: dict[str, str]) -> None:
    """Reached, but without keyrotor's schema: the probe still fails (503, ``unavailable``), and
    the code says it is the server's configuration, which no retry mends, not an outage."""
    settings = Settings.from_env(api_env)
    async with KeyManager(settings) as km, TestClient(TestServer(create_app(settings, km=km))) as client:
        assert (await (await client.get("/v1/health")).json()) == {"status": "ok"}
        conn = await asyncpg.connect(settings.database_url)
        try:
            await conn.execute("DROP SCHEMA public CASCADE; CREATE SCHEMA public")
        finally:
            await conn.close()
        resp = await client.get("/v1/health")
        assert resp.status == 503
        doc = await resp.json()
        assert doc["status"] == "unavailable"
        assert doc["error"]["code"] == "misconfigured"
        assert doc["error"]["message"] == "the server is misconfigured; see its log"
