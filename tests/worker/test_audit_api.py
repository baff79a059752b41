"""The read-only HTTP API of the audit log, on a real server socket and the real database."""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest
from aiohttp.test_utils import TestClient, TestServer
from pydantic import SecretStr

from keyrotor import KeyManager, Settings
from keyrotor.errors import ConfigurationError
from keyrotor.worker.audit_api import create_app
from tests.keyrotor.audit_helpers import tamper

TOKEN = "audit-api-token-" + "7" * 24
AUTH = {"Authorization": f"Bearer {TOKEN}"}
OPENAI = "sk-proj-" + "h2J" * 16


@pytest.fixture
async def client(settings: Settings) -> AsyncIterator[TestClient]:  # type: ignore[type-arg]
    app = create_app(settings.model_copy(update={"audit_api_token": SecretStr(TOKEN)}))
    async with TestClient(TestServer(app)) as c:
        yield c


async def _events(km: KeyManager, n: int) -> None:
    token = await km.encrypt("tenant-1/openai", OPENAI, actor="writer")
    for i in range(n):
        await km.decrypt("tenant-1/openai", token, actor=f"reader-{i % 2}")
    await km.flush_audit()


@pytest.mark.parametrize(
    "headers",
    [{}, {"Authorization": "Bearer wrong"}, {"Authorization": TOKEN}, {"Authorization": f"Basic {TOKEN}"}],
)
async def test_requests_without_the_token_are_refused(client: TestClient, headers: dict[str, str]) -> None:  # type: ignore[type-arg]
    for path in ("/audit/events", "/audit/verify"):
        resp = await client.get(path, headers=headers)
        assert resp.status == 401
        assert resp.headers["WWW-Authenticate"].startswith("Bearer")
        assert TOKEN not in await resp.text()


async def test_events_with_filters_and_keyset_pages(client: TestClient, km: KeyManager) -> None:  # type: ignore[type-arg]
    await _events(km, 9)
    resp = await client.get("/audit/events", headers=AUTH, params={"limit": "4"})
    assert resp.status == 200
    page1 = await resp.json()
    assert [e["id"] for e in page1["events"]] == [1, 2, 3, 4] and page1["next_after_id"] == 4
    page3 = await (
        await client.get("/audit/events", headers=AUTH, params={"limit": "4", "after_id": "8"})
    ).json()
    assert [e["id"] for e in page3["events"]] == [9, 10] and page3["next_after_id"] is None

    filtered = await (
        await client.get(
            "/audit/events",
            headers=AUTH,
            params={
                "event": "decrypt",
                "actor": "reader-1",
                "scope": "tenant-1/*",
                "since": "1h",
                "until": "now",
            },
        )
    ).json()
    assert len(filtered["events"]) == 4
    assert {(e["event_type"], e["actor"]) for e in filtered["events"]} == {("decrypt", "reader-1")}
    assert set(filtered["events"][0]) >= {"id", "created_at", "scope", "key_version", "row_hash", "metadata"}


@pytest.mark.parametrize(
    "params",
    [
        {"since": "not-a-date"},
        {"event": "nope"},
        {"limit": "100000"},
        {"after_id": "-1"},
        {"colour": "red"},
        # well-formed but out of datetime's range: an OverflowError, not a 500
        {"since": "999999d"},
        {"since": "999999999w"},
        {"until": "9999-12-31T23:59:59-05:00"},
        {"actor": "a\x00b"},
    ],
)
async def test_bad_parameters_are_400(client: TestClient, params: dict[str, str]) -> None:  # type: ignore[type-arg]
    resp = await client.get("/audit/events", headers=AUTH, params=params)
    assert resp.status == 400
    assert "error" in await resp.json()


async def test_verify_endpoint(client: TestClient, km: KeyManager, database_url: str) -> None:  # type: ignore[type-arg]
    await _events(km, 5)
    ok = await (await client.get("/audit/verify", headers=AUTH)).json()
    assert ok["ok"] is True and ok["checked"] == 6 and ok["head_id"] == 6
    await tamper(database_url, "UPDATE encryption_audit_log SET scope = 'elsewhere' WHERE id = 3")
    bad = await (await client.get("/audit/verify", headers=AUTH)).json()
    assert (bad["ok"], bad["bad_id"], bad["problem"]) == (False, 3, "edited")


async def test_read_only(client: TestClient) -> None:  # type: ignore[type-arg]
    for method in ("POST", "PUT", "DELETE", "PATCH"):
        resp = await client.request(method, "/audit/events", headers=AUTH)
        assert resp.status == 405


@pytest.mark.parametrize("token", [None, "", "short-token"])
def test_refuses_to_start_without_a_token(settings: Settings, token: str | None) -> None:
    s = settings.model_copy(update={"audit_api_token": None if token is None else SecretStr(token)})
    with pytest.raises(ConfigurationError, match="KEYROTOR_AUDIT_API_TOKEN"):
        create_app(s)
