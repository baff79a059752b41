"""The connections and the KEK: what opening a KEK provider needs (:mod:`keyrotor.kek.factory`).

The database belongs here because the local keyring is salted with the install salt kept in
``DATABASE_URL``'s database. Environment variable names follow the old backend
(``ENCRYPTION_KEY``, ``SECRETS_PROVIDER``) and common conventions (``DATABASE_URL``,
``REDIS_URL``); keyrotor's own knobs are prefixed ``KEYROTOR_``.
"""

from __future__ import annotations

from typing import Literal
from urllib.parse import parse_qs, urlsplit

from pydantic import Field, SecretStr, field_validator

from keyrotor.settings.base import SettingsPart


class ConnectionSettings(SettingsPart):
    """Where the store and Redis are."""

    database_url: str = Field(
        default="postgresql://postgres@127.0.0.1:5432/keyrotor", validation_alias="DATABASE_URL", repr=False
    )
    # URLs may carry passwords: kept out of repr.
    redis_url: str = Field(default="redis://127.0.0.1:6379/0", validation_alias="REDIS_URL", repr=False)

    @field_validator("redis_url")
    @classmethod
    def _redis_url(cls, value: str) -> str:
        # Checked here, as arq's RedisSettings.from_dsn will read it, so that a URL the queue
        # cannot use is a configuration error naming the variable (never the URL: it may hold a
        # password) rather than an untyped error from inside arq, and `keyrotor health` cannot
        # call a Redis "ok" that no worker can use.
        problem = redis_url_problem(value)
        if problem is not None:
            raise ValueError(problem)
        return value


def redis_url_problem(url: str) -> str | None:
    """What makes ``url`` unusable as the queue's Redis URL (arq and redis-py), or None."""
    try:
        parts = urlsplit(url)
        _ = parts.port  # raises ValueError for a port that is not 0-65535
    except ValueError:
        return "is not a valid URL (redis://[:password@]host:port/db)"
    if parts.scheme not in ("redis", "rediss", "unix"):
        return "must start with redis://, rediss:// or unix:// (redis://[:password@]host:port/db)"
    db = parse_qs(parts.query).get("db")
    if db is not None:
        text = db[0]
    elif parts.scheme == "unix":
        return None
    else:
        text = parts.path.lstrip("/") if parts.path else "0"
    if not text.isascii() or not text.isdigit():
        return "must name its database by number (redis://host:6379/0), without a trailing slash"
    return None


class KekSettings(ConnectionSettings):
    """The KEK provider, its keys, and the old backend's master key (docs/providers.md)."""

    secrets_provider: Literal["local", "aws", "vault"] = Field(
        default="local", validation_alias="SECRETS_PROVIDER"
    )
    encryption_key: SecretStr | None = Field(default=None, validation_alias="ENCRYPTION_KEY")
    encryption_key_version: int = Field(default=1, ge=1, validation_alias="ENCRYPTION_KEY_VERSION")
    encryption_keys_previous: dict[int, SecretStr] = Field(
        default_factory=dict, validation_alias="ENCRYPTION_KEYS_PREVIOUS"
    )
    # Providers (besides SECRETS_PROVIDER) that unwrap the DEKs they wrapped, comma-separated
    # (`aws,vault`): set during a provider migration (docs/providers.md).
    kek_read_providers: str = Field(default="", validation_alias="KEYROTOR_KEK_READ_PROVIDERS")
    # The old backend's master key, for legacy values; defaults to ENCRYPTION_KEY.
    legacy_encryption_key: SecretStr | None = Field(default=None, validation_alias="KEYROTOR_LEGACY_KEY")

    @field_validator("encryption_key", "legacy_encryption_key", mode="before")
    @classmethod
    def _blank_is_none(cls, value: object) -> object:
        return None if value == "" else value

    @property
    def legacy_key(self) -> str | None:
        """The master key legacy values were encrypted with."""
        key = self.legacy_encryption_key or self.encryption_key
        return key.get_secret_value() if key else None
