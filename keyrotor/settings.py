"""Settings, read from the environment once.

``Settings.from_env()`` runs once per process (in the worker, the CLI, or an application's
start-up) and its values travel down as arguments. Applications that configure in code build
``Settings(...)`` directly with the same field names.

Environment variable names follow the old backend (``ENCRYPTION_KEY``, ``SECRETS_PROVIDER``)
and common conventions (``DATABASE_URL``, ``REDIS_URL``); keyrotor's own knobs are prefixed
``KEYROTOR_``. The README's configuration reference lists them all.
"""

from __future__ import annotations

import contextvars
import os
from collections.abc import Mapping
from typing import Any, Literal

from pydantic import AliasChoices, Field, SecretStr, ValidationError, field_validator
from pydantic_settings import BaseSettings, EnvSettingsSource, PydanticBaseSettingsSource, SettingsConfigDict

from keyrotor.errors import ConfigurationError

_ENVIRON: contextvars.ContextVar[Mapping[str, str] | None] = contextvars.ContextVar("_ENVIRON", default=None)


class _MappingEnvSource(EnvSettingsSource):
    """Reads the mapping handed to ``from_env`` instead of ``os.environ``."""

    def _load_env_vars(self) -> Mapping[str, str | None]:
        environ = _ENVIRON.get()
        source = os.environ if environ is None else environ
        return {k.lower(): v for k, v in source.items()}


def _env(name: str, *more: str) -> Any:
    return Field(validation_alias=AliasChoices(name, *more))


class Settings(BaseSettings):
    """All of keyrotor's configuration. Frozen: build a new one to change anything."""

    model_config = SettingsConfigDict(
        frozen=True, populate_by_name=True, extra="ignore", case_sensitive=False
    )

    # connections
    database_url: str = Field(
        default="postgresql://postgres@127.0.0.1:5432/keyrotor", validation_alias="DATABASE_URL", repr=False
    )
    # URLs may carry passwords: kept out of repr.
    redis_url: str = Field(default="redis://127.0.0.1:6379/0", validation_alias="REDIS_URL", repr=False)

    # the KEK
    secrets_provider: Literal["local", "aws", "vault"] = Field(
        default="local", validation_alias="SECRETS_PROVIDER"
    )
    encryption_key: SecretStr | None = Field(default=None, validation_alias="ENCRYPTION_KEY")
    encryption_key_version: int = Field(default=1, ge=1, validation_alias="ENCRYPTION_KEY_VERSION")
    encryption_keys_previous: dict[int, SecretStr] = Field(
        default_factory=dict, validation_alias="ENCRYPTION_KEYS_PREVIOUS"
    )
    # The old backend's master key, for legacy values; defaults to ENCRYPTION_KEY.
    legacy_encryption_key: SecretStr | None = Field(default=None, validation_alias="KEYROTOR_LEGACY_KEY")

    # the DEK cache
    dek_cache_ttl_s: float = Field(default=1800.0, gt=0, validation_alias="KEYROTOR_DEK_CACHE_TTL_SECONDS")
    dek_cache_max_entries: int = Field(
        default=10_000, ge=1, validation_alias="KEYROTOR_DEK_CACHE_MAX_ENTRIES"
    )
    # How long a process trusts its idea of a scope's active version without hearing from
    # Redis. Rotation also broadcasts, so this only bounds a process that missed the message.
    active_version_ttl_s: float = Field(
        default=30.0, gt=0, validation_alias="KEYROTOR_ACTIVE_VERSION_TTL_SECONDS"
    )

    # values
    max_value_bytes: int = Field(
        default=32_768, ge=1, le=1_048_576, validation_alias="KEYROTOR_MAX_VALUE_BYTES"
    )

    # rotation defaults for new scopes
    default_rotation_enabled: bool = Field(default=True, validation_alias="KEYROTOR_DEFAULT_ROTATION_ENABLED")
    default_interval_days: int = Field(
        default=90, ge=1, le=365, validation_alias="KEYROTOR_DEFAULT_INTERVAL_DAYS"
    )
    default_grace_days: int = Field(default=7, ge=0, le=365, validation_alias="KEYROTOR_DEFAULT_GRACE_DAYS")

    # logging
    log_level: str = Field(default="INFO", validation_alias="KEYROTOR_LOG_LEVEL")
    log_format: Literal["auto", "json", "console"] = Field(
        default="auto", validation_alias="KEYROTOR_LOG_FORMAT"
    )

    @classmethod
    def settings_customise_sources(
        cls,
        settings_cls: type[BaseSettings],
        init_settings: PydanticBaseSettingsSource,
        env_settings: PydanticBaseSettingsSource,
        dotenv_settings: PydanticBaseSettingsSource,
        file_secret_settings: PydanticBaseSettingsSource,
    ) -> tuple[PydanticBaseSettingsSource, ...]:
        return (init_settings, _MappingEnvSource(settings_cls, case_sensitive=False))

    @field_validator("encryption_key", "legacy_encryption_key", mode="before")
    @classmethod
    def _blank_is_none(cls, value: object) -> object:
        return None if value == "" else value

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None, **overrides: Any) -> Settings:
        """Read settings from ``environ`` (default ``os.environ``), then apply ``overrides``.

        Raises:
            ConfigurationError: a variable has an invalid value. The message names the
                variable, never its value (it may be a key).
        """
        token = _ENVIRON.set(environ)
        try:
            return cls(**overrides)
        except ValidationError as exc:
            raise ConfigurationError(_describe(exc)) from None
        finally:
            _ENVIRON.reset(token)

    @property
    def legacy_key(self) -> str | None:
        """The master key legacy values were encrypted with."""
        key = self.legacy_encryption_key or self.encryption_key
        return key.get_secret_value() if key else None


def _describe(exc: ValidationError) -> str:
    # pydantic's messages can echo the input; rebuild one from locations and types only.
    parts = []
    for err in exc.errors(include_input=False, include_url=False):
        where = ".".join(str(p) for p in err["loc"]) or "settings"
        parts.append(f"{where}: {err['msg']}")
    return "invalid configuration: " + "; ".join(parts)
