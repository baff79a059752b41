"""Fixtures for replication tests: a primary (the per-test database) and two secondary regions,
each a real database of its own on the local server with its own local wrapping key."""

from __future__ import annotations

import asyncio
import os
from collections.abc import AsyncIterator, Iterator, Mapping, Sequence
from contextlib import asynccontextmanager
from typing import Any

import asyncpg
import pytest

from keyrotor import KeyManager, Settings
from keyrotor.errors import KekUnavailable
from keyrotor.kek.base import KekProvider, WrapContext, WrappedDek
from keyrotor.replication.check import CheckReport, Replication, env_prefix
from tests.conftest import _admin, _url
from tests.replication.proxy import PgProxy

PRIMARY = "us-east-1"
REGIONS = ("eu-west-1", "ap-south-1")
# Strong test-only wrapping keys, one a region (never used outside tests).
# What a test may write in a region's database (promotion fills key_scopes and data_keys).
REGION_TABLES = (
    "replica_keys",
    "replica_promotions",
    "kek_replicas",
    "key_scopes",
    "data_keys",
    "replica_repair_log",
)
# A promotion starts the region's own audit chain, keyed with its own audit key. The log is
# append-only (a trigger refuses TRUNCATE): emptied with triggers off, as only a test may.
REGION_AUDIT_TABLES = ("encryption_audit_log", "audit_keys")
REGION_KEYS = {
    "eu-west-1": "eu-region-wrapping-key-5c1e9a77d0b34f6e8a2d19c4b7f03e61",
    "ap-south-1": "ap-region-wrapping-key-0b7d4e2f91c6a8353e7f1d9b2c4a6e80",
}


@pytest.fixture
async def proxies() -> AsyncIterator[dict[str, PgProxy]]:
    """A TCP proxy to the local Postgres for the primary and each region (to cut them off)."""
    out = {name: PgProxy() for name in (PRIMARY, *REGIONS)}
    for p in out.values():
        await p.start()
    try:
        yield out
    finally:
        for p in out.values():
            await p.close()


@pytest.fixture(scope="session")
def region_databases(template_db: str) -> Iterator[dict[str, str]]:
    """One migrated database a secondary region, for the session (emptied before each test:
    creating and dropping databases costs seconds on a busy server, emptying them milliseconds)."""
    names = {region: f"kr_r_{os.getpid()}_{region.replace('-', '_')}" for region in REGIONS}

    async def create() -> None:
        for name in names.values():
            await _admin(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")
            await _admin(f"CREATE DATABASE {name} TEMPLATE {template_db}")

    async def drop() -> None:
        await asyncio.gather(*(_admin(f"DROP DATABASE IF EXISTS {n} WITH (FORCE)") for n in names.values()))

    asyncio.run(create())
    yield names
    asyncio.run(drop())


@pytest.fixture
async def region_urls(
    region_databases: dict[str, str], proxies: dict[str, PgProxy]
) -> AsyncIterator[dict[str, str]]:
    """Each secondary region's (emptied) database, reached through its proxy."""
    for name in region_databases.values():
        await sql(_url(name), f"TRUNCATE {', '.join(REGION_TABLES)} CASCADE")
        conn = await asyncpg.connect(_url(name))
        try:
            await conn.execute(
                f"SET session_replication_role = replica; TRUNCATE {', '.join(REGION_AUDIT_TABLES)} CASCADE"
            )
        finally:
            await conn.close()
    yield {region: proxies[region].url(name) for region, name in region_databases.items()}


def region_env(region_urls: Mapping[str, str], keys: Mapping[str, str] = REGION_KEYS) -> dict[str, str]:
    """The variables configuring the secondaries and their wrapping keys."""
    env = {
        "KEYROTOR_PRIMARY_REGION": PRIMARY,
        "KEYROTOR_REGIONS": ",".join(f"{r}={u}" for r, u in region_urls.items()),
        "KEYROTOR_FAILOVER_RETRY_SECONDS": "0.3",
        "KEYROTOR_FAILOVER_TIMEOUT_SECONDS": "2",
        "KEYROTOR_REGION_CONNECT_TIMEOUT_SECONDS": "2",
        "KEYROTOR_REGION_STATEMENT_TIMEOUT_SECONDS": "3",
        "KEYROTOR_LISTEN_KEY_CHANGES": "false",
    }
    for region in region_urls:
        env[env_prefix(region) + "ENCRYPTION_KEY"] = keys[region]
    return env


@pytest.fixture
def renv(
    env: dict[str, str],
    region_urls: dict[str, str],
    proxies: dict[str, PgProxy],
    monkeypatch: pytest.MonkeyPatch,
) -> dict[str, str]:
    """The environment of a process of the primary region (reached through its proxy) with two
    secondaries. Region variables are also set in ``os.environ`` (a worker reads its own)."""
    extra = region_env(region_urls)
    for k, v in extra.items():
        monkeypatch.setenv(k, v)
    primary = proxies[PRIMARY].url(env["DATABASE_URL"].rsplit("/", 1)[1])
    return {**env, **extra, "DATABASE_URL": primary}


@pytest.fixture
def rsettings(renv: dict[str, str]) -> Settings:
    return Settings.from_env(renv)


@pytest.fixture
async def rkm(rsettings: Settings, renv: dict[str, str]) -> AsyncIterator[KeyManager]:
    async with KeyManager(rsettings, environ=renv) as manager:
        yield manager


def rep_of(km: KeyManager) -> Replication:
    assert km.replication is not None
    return km.replication


async def settle(km: KeyManager) -> None:
    """Wait for the background replication of new scopes."""
    rep = rep_of(km)
    while rep._tasks:
        await asyncio.gather(*list(rep._tasks))


def statuses(report: CheckReport) -> dict[str, str]:
    return {r.region: r.status for r in report.regions}


async def sql(url: str, query: str, *args: Any) -> list[asyncpg.Record]:
    conn = await asyncpg.connect(url)
    try:
        return list(await conn.fetch(query, *args))
    finally:
        await conn.close()


@asynccontextmanager
async def unreachable(proxy: PgProxy) -> AsyncIterator[None]:
    """The database behind ``proxy`` is off the network for the block."""
    await proxy.cut()
    try:
        yield
    finally:
        await proxy.heal()


def assert_no_secrets(text: str, secrets: list[bytes | str]) -> None:
    """None of ``secrets`` (raw, hex or base64) appears in ``text``."""
    import base64

    for secret in secrets:
        raw = secret.encode() if isinstance(secret, str) else secret
        forms = [
            raw.hex(),
            base64.b64encode(raw).decode(),
            base64.urlsafe_b64encode(raw).decode().rstrip("="),
        ]
        if isinstance(secret, str):
            forms.append(secret)
        for form in forms:
            assert form not in text


class FailingKek:
    """The real local keyring, switched off on demand (a KMS or Vault outage)."""

    def __init__(self, inner: KekProvider) -> None:
        self.inner = inner
        self.down = False

    @property
    def name(self) -> str:
        return self.inner.name

    def _check(self) -> None:
        if self.down:
            raise KekUnavailable("KEK provider unreachable (test outage)")

    async def current_version(self) -> int:
        self._check()
        return await self.inner.current_version()

    async def wrap(self, dek: bytes, context: WrapContext) -> WrappedDek:
        self._check()
        return await self.inner.wrap(dek, context)

    async def unwrap(self, wrapped: WrappedDek, context: WrapContext) -> bytes:
        self._check()
        return await self.inner.unwrap(wrapped, context)

    async def rewrap(self, items: Sequence[tuple[WrappedDek, WrapContext]]) -> list[WrappedDek]:
        self._check()
        return await self.inner.rewrap(items)

    async def rotate(self) -> int:
        return await self.inner.rotate()

    async def check(self) -> None:
        self._check()

    async def aclose(self) -> None:
        await self.inner.aclose()
