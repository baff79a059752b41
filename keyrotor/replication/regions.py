"""Secondary regions: their configuration, their databases and wrapping keys, and the DEK
copies they hold (``replica_keys``). Used by :mod:`keyrotor.replication.check` (check, repair,
failover) and :mod:`keyrotor.replication.promotion`; docs/replication.md describes the whole.

A region is configured by ``KEYROTOR_REGIONS`` (``name=database_url,...``) and its wrapping key
by the usual provider variables behind the prefix ``KEYROTOR_REGION_<NAME>__``. A copy's
fingerprint is a key check value: ``HMAC-SHA256(dek, "keyrotor/replica-fingerprint/v1")``
truncated to 128 bits, which says whether two copies hold the same DEK and nothing about it.
"""

from __future__ import annotations

import asyncio
import hmac
import logging
import os
import re
from collections.abc import Awaitable, Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession, async_sessionmaker

from keyrotor.errors import ConfigurationError, KekError, KekUnavailable, KeyrotorError
from keyrotor.kek.base import KekProvider, WrapContext, WrappedDek
from keyrotor.kek.factory import open_provider
from keyrotor.kek.local import LocalKeyring
from keyrotor.settings import Settings
from keyrotor.store import db
from keyrotor.store import replication as store
from keyrotor.store.replication import ReplicaCopy

log = logging.getLogger("keyrotor.replication.check")

_FINGERPRINT_LABEL = b"keyrotor/replica-fingerprint/v1"
_REGION_NAME = re.compile(r"^[a-z0-9][a-z0-9-]{0,62}$")
_CONCURRENCY = 64


def fingerprint(dek: bytes) -> str:
    """The key check value of a DEK: 128 bits of an HMAC of a fixed label under it (hex)."""
    return hmac.digest(dek, _FINGERPRINT_LABEL, "sha256")[:16].hex()


def error_text(exc: BaseException) -> str:
    """For a report or a log: our errors with their message (never key material), any other
    error by its class only (its text may quote data or URLs)."""
    if isinstance(exc, KeyrotorError):
        return f"{type(exc).__name__}: {exc}"[:300]
    return type(exc).__name__


# --- configuration -------------------------------------------------------------------------


@dataclass(frozen=True)
class RegionConfig:
    """A secondary region: its name, its database and the variables of its wrapping key."""

    name: str
    database_url: str = field(repr=False)
    env: Mapping[str, str] = field(repr=False)

    @property
    def prefix(self) -> str:
        """The prefix of its wrapping-key variables, e.g. ``KEYROTOR_REGION_EU_WEST_1__``."""
        return env_prefix(self.name)


def env_prefix(region: str) -> str:
    """``KEYROTOR_REGION_<NAME>__``: ``eu-west-1`` gives ``KEYROTOR_REGION_EU_WEST_1__``."""
    return "KEYROTOR_REGION_" + re.sub(r"[^A-Z0-9]", "_", region.upper()) + "__"


def parse_regions(settings: Settings, environ: Mapping[str, str] | None = None) -> list[RegionConfig]:
    """The secondaries of ``KEYROTOR_REGIONS`` (``name=database_url,...``), in order.

    A region's wrapping key is configured by the usual provider variables with the region's
    prefix (``KEYROTOR_REGION_EU_WEST_1__SECRETS_PROVIDER``, ``..._ENCRYPTION_KEY``,
    ``..._KEYROTOR_KMS_KEY_ID``...), read from ``environ`` (default ``os.environ``).

    Raises:
        ConfigurationError: a malformed entry, a bad or repeated name, the primary's name, a
            URL that is not PostgreSQL, or a database another region or the primary uses.
            Messages never contain the URL (it may hold a password).
    """
    env = os.environ if environ is None else environ
    primary = settings.primary_region
    if not _REGION_NAME.match(primary):
        raise ConfigurationError(
            "KEYROTOR_PRIMARY_REGION: region names are lowercase letters, digits and '-'"
        )
    out: list[RegionConfig] = []
    seen = {primary}
    databases = {_database_identity(settings.database_url): primary} if settings.database_url else {}
    upper = {k.upper(): v for k, v in env.items()}
    for i, entry in enumerate(e.strip() for e in settings.regions.split(",")):
        if not entry:
            continue
        name, sep, url = entry.partition("=")
        name, url = name.strip(), url.strip()
        if not sep or not name or not url:
            raise ConfigurationError(f"KEYROTOR_REGIONS: entry {i + 1} is not name=database_url")
        if not _REGION_NAME.match(name):
            raise ConfigurationError(
                f"KEYROTOR_REGIONS: entry {i + 1}: region names are lowercase letters, digits and '-'"
            )
        if name in seen:
            raise ConfigurationError(f"KEYROTOR_REGIONS: region {name!r} is named twice (or is the primary)")
        seen.add(name)
        try:
            identity = _database_identity(url)
        except ConfigurationError:
            raise ConfigurationError(f"KEYROTOR_REGIONS: region {name!r} needs a postgresql:// URL") from None
        if identity in databases:
            # One replica_keys table for two regions: each check would rewrite the other's
            # copies under its own key, so one region always held copies it cannot unwrap.
            raise ConfigurationError(
                f"KEYROTOR_REGIONS: region {name!r} names the same database as {databases[identity]!r}; "
                "each region needs a database of its own"
            )
        databases[identity] = name
        prefix = env_prefix(name)
        sub = {k[len(prefix) :]: v for k, v in upper.items() if k.startswith(prefix)}
        out.append(RegionConfig(name, url, sub))
    return out


def _database_identity(url: str) -> tuple[str, int, str]:
    """Which database a URL names: host (or socket directory), port, database name.

    Raises:
        ConfigurationError: not a PostgreSQL URL.
    """
    u = db.async_url(url)
    host = u.host or str(u.query.get("host") or "localhost")
    return host.lower(), u.port or 5432, u.database or ""


def region_settings(cfg: RegionConfig) -> Settings:
    """The settings a region's wrapping key is built from (its prefixed variables).

    Raises:
        ConfigurationError: a variable is invalid (the message names the region).
    """
    try:
        return Settings.from_env({**cfg.env, "DATABASE_URL": cfg.database_url})
    except ConfigurationError as exc:
        raise ConfigurationError(f"region {cfg.name} ({cfg.prefix}*): {exc}") from None


async def open_region_kek(cfg: RegionConfig) -> KekProvider:
    """Open a region's wrapping key provider.

    Raises:
        ConfigurationError: missing or weak key, or bad provider variables (names the region).
        KekUnavailable: the provider cannot be reached now.
    """
    settings = region_settings(cfg)
    try:
        return await open_provider(
            settings, {**cfg.env, "DATABASE_URL": cfg.database_url}, install_salt=False
        )
    except ConfigurationError as exc:
        raise ConfigurationError(f"region {cfg.name} ({cfg.prefix}*): {exc}") from None


class Region:
    """A secondary region: its database engine and its (lazily opened) wrapping key."""

    def __init__(
        self, cfg: RegionConfig, settings: Settings, kek: KekProvider | None = None, *, owns_kek: bool = False
    ) -> None:
        self.cfg = cfg
        self.name = cfg.name
        self.engine: AsyncEngine = db.create_engine(
            cfg.database_url,
            pool_size=2,
            max_overflow=4,
            connect_args={
                "timeout": settings.region_connect_timeout_s,
                # every statement (and the pool's ping) has a deadline: a silent region fails
                "command_timeout": settings.region_statement_timeout_s,
            },
            hide_parameters=True,  # statements carry wrapped keys: never in an error message
        )
        self.sessions: async_sessionmaker[AsyncSession] = db.sessionmaker(self.engine)
        self._kek = kek
        self._owns_kek = kek is None or owns_kek
        self._kek_lock = asyncio.Lock()
        self.down_until = 0.0  # monotonic: skip for failover reads until then

    def __repr__(self) -> str:
        return f"Region({self.name!r})"

    async def kek(self) -> KekProvider:
        """The region's wrapping key provider (opened on first use).

        Raises:
            ConfigurationError: its variables are missing or invalid.
            KekUnavailable: it cannot be reached now.
        """
        if self._kek is None:
            async with self._kek_lock:
                if self._kek is None:
                    self._kek = await open_region_kek(self.cfg)
        return self._kek

    async def copies(self, scope: str | None = None) -> dict[tuple[str, int], ReplicaCopy]:
        """Every copy in the region (or one scope's). Raises StoreUnavailable if it is down."""
        async with db.transaction(self.sessions) as session:
            return await store.region_copies(session, scope)

    async def promotion(self) -> dict[str, Any] | None:
        """The region's promotion record, if it was promoted to primary."""
        async with db.transaction(self.sessions) as session:
            return await store.promotion_record(session)

    async def unwrap_copy(
        self,
        scope: str,
        version: int,
        *,
        states: Sequence[str] | None = None,
        proven_within_s: float | None = None,
    ) -> bytes | None:
        """The DEK from the region's copy, verified against its fingerprint; None if it has none
        (or, with ``states``, none in one of those states; or, with ``proven_within_s``, none
        written or proven in sync by a full check within that many seconds).

        Raises:
            StoreUnavailable, KekUnavailable: the region cannot serve it now.
            KekError: the copy does not unwrap (corrupt, or the wrong regional key).
        """
        async with db.transaction(self.sessions) as session:
            row = await store.region_copy(session, self.name, scope, version)
        if row is None or (states is not None and row.state not in states):
            return None
        if proven_within_s is not None and row.proven_age_s > proven_within_s:
            log.warning(
                "region %s: the copy of %s v%d was last proven current %.1f days ago: not served",
                self.name,
                scope,
                version,
                row.proven_age_s / 86_400,
            )
            return None
        kek = await self.kek()
        dek = await kek.unwrap(
            WrappedDek(row.region_kek_id, row.region_kek_version, row.wrapped), WrapContext(scope, version)
        )
        if not hmac.compare_digest(fingerprint(dek), row.fingerprint):
            raise KekError(
                f"region {self.name}: the copy of {scope} v{version} does not match its fingerprint"
            )
        return dek

    async def mark_verified(self, *, primary: str, keys: int) -> None:
        """Record in the region that a full check just proved all its copies in sync (the
        freshness failover reads ask of a copy). Raises StoreUnavailable if the region is down."""
        async with db.transaction(self.sessions) as session:
            await store.mark_verified(session, self.name, primary=primary, keys=keys)

    async def drop_copy(self, scope: str, version: int) -> int:
        """Delete the region's copy of one DEK version (the primary destroyed it). Returns how
        many rows went (0 or 1). Raises StoreUnavailable if the region is down."""
        async with db.transaction(self.sessions) as session:
            return await store.delete_copy(session, scope, version)

    async def aclose(self) -> None:
        """Dispose of the engine and close the wrapping key provider this region opened."""
        await self.engine.dispose()
        if self._owns_kek and self._kek is not None:
            await self._kek.aclose()
            self._kek = None


async def unwrap_many(
    kek: KekProvider, items: Sequence[tuple[WrappedDek, WrapContext]]
) -> list[bytes | BaseException]:
    """Unwrap many DEKs: in a loop for the local keyring (microseconds of CPU, no I/O), else up
    to ``_CONCURRENCY`` provider calls in flight. Failures are returned, not raised."""
    if isinstance(kek, LocalKeyring):
        out: list[bytes | BaseException] = []
        for wrapped, ctx in items:
            try:
                out.append(kek.unwrap_sync(wrapped, ctx))
            except Exception as exc:
                out.append(exc)
        return out

    async def one(item: tuple[WrappedDek, WrapContext]) -> bytes:
        return await kek.unwrap(*item)

    return await bounded_map(one, items)


async def corrupt_copies(
    kek: KekProvider, copies: Mapping[tuple[str, int], ReplicaCopy], keys: Sequence[tuple[str, int]]
) -> list[tuple[str, int]]:
    """The copies among ``keys`` that do not unwrap with the region's key to the DEK their
    fingerprint names.

    Raises:
        KekUnavailable: the region's key provider cannot be reached (nothing can be said).
    """
    items = []
    for key in keys:
        c = copies[key]
        items.append((WrappedDek(c.region_kek_id, c.region_kek_version, c.wrapped), WrapContext(*key)))
    bad = []
    for key, dek in zip(keys, await unwrap_many(kek, items), strict=True):
        if isinstance(dek, KekUnavailable):
            raise dek
        if isinstance(dek, BaseException) or not hmac.compare_digest(
            fingerprint(dek), copies[key].fingerprint
        ):
            bad.append(key)
    return bad


async def bounded_map(fn: Callable[[Any], Awaitable[Any]], items: Sequence[Any]) -> list[Any]:
    out: list[Any] = []
    for i in range(0, len(items), _CONCURRENCY):
        out.extend(
            await asyncio.gather(*(fn(x) for x in items[i : i + _CONCURRENCY]), return_exceptions=True)
        )
    return out


async def init_regions(settings: Settings, environ: Mapping[str, str] | None = None) -> list[str]:
    """Create each region's database if needed and migrate it to keyrotor's schema.

    Raises:
        StoreUnavailable: a region's server cannot be reached.
    """
    done = []
    for cfg in parse_regions(settings, environ):
        await db.ensure_database(cfg.database_url)
        engine = db.create_engine(cfg.database_url, pool_size=1)
        try:
            await db.upgrade(engine)
        finally:
            await engine.dispose()
        done.append(cfg.name)
    return done
