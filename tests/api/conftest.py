"""An in-process ``keyrotor serve`` (aiohttp's TestServer) on the test's own database."""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass

import pytest
from aiohttp.test_utils import TestClient, TestServer

from keyrotor import KeyManager, Settings
from keyrotor.api import tokens
from keyrotor.api.app import create_app


@dataclass
class Api:
    client: TestClient  # type: ignore[type-arg]
    km: KeyManager
    token: str  # of actor "app": encrypt and decrypt everywhere (the open default grant)

    def auth(self, token: str | None = None) -> dict[str, str]:
        return {"Authorization": f"Bearer {token or self.token}"}

    async def token_for(self, actor: str, days: int | None = None) -> str:
        issued = await tokens.create_token(self.km.sessions, actor, by="admin", expires_in_days=days)
        return issued.token


@pytest.fixture
def api_env(env: dict[str, str]) -> dict[str, str]:
    return {**env, "KEYROTOR_API_TOKEN_CACHE_SECONDS": "0"}


@pytest.fixture
async def api(api_env: dict[str, str]) -> AsyncIterator[Api]:
    settings = Settings.from_env(api_env)
    async with KeyManager(settings) as km:
        server = TestServer(create_app(settings, km=km))
        async with TestClient(server) as client:
            issued = await tokens.create_token(km.sessions, "app", by="admin")
            yield Api(client, km, issued.token)
