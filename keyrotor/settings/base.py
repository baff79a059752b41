"""What every part of the settings shares: frozen fields read from an environment mapping.

Each part (:mod:`keyrotor.settings.kek`, ``library``, ``audit``, ``replication``, ``worker``,
``scheduler``) derives from :class:`SettingsPart`, so a part can be read alone with its own
``from_env`` (tests, a tool that needs only the KEK) and :class:`keyrotor.settings.Settings`
is all of them together.
"""

from __future__ import annotations

import contextvars
import os
import re
from collections.abc import Mapping
from typing import Any, Self

from pydantic import ValidationError
from pydantic_settings import (
    BaseSettings,
    EnvSettingsSource,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
    SettingsError,
)

from keyrotor.errors import ConfigurationError

# The mapping handed to `from_env`, for the source below: a context variable rather than an
# argument because pydantic-settings builds its sources itself, from the class alone.
_ENVIRON: contextvars.ContextVar[Mapping[str, str] | None] = contextvars.ContextVar("_ENVIRON", default=None)


class _MappingEnvSource(EnvSettingsSource):
    """Reads the mapping handed to ``from_env`` instead of ``os.environ``."""

    def _load_env_vars(self) -> Mapping[str, str | None]:
        environ = _ENVIRON.get()
        source = os.environ if environ is None else environ
        return {k.lower(): v for k, v in source.items()}


class SettingsPart(BaseSettings):
    """A frozen group of settings, each field read from the environment variable its alias names.

    Only the explicit arguments and the environment count: no ``.env`` file, no secrets directory.
    """

    model_config = SettingsConfigDict(
        frozen=True, populate_by_name=True, extra="ignore", case_sensitive=False
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

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None, **overrides: Any) -> Self:
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
        except SettingsError as exc:
            # A JSON-valued variable (ENCRYPTION_KEYS_PREVIOUS) that is not JSON: pydantic-settings
            # raises its own error, which must not escape untyped. Its text names the field only.
            field = re.search(r'field "([a-z_]+)"', str(exc))
            raise ConfigurationError(
                f"invalid configuration: {field.group(1) if field else 'settings'}: not valid JSON"
            ) from None
        finally:
            _ENVIRON.reset(token)


def check_backoff_cap(base_name: str, base_s: float, cap_name: str, cap_s: float) -> None:
    """Refuse a backoff whose cap is below its base (ValueError naming both variables).

    Refused rather than taken as the cap: every wait would then be the cap, and the base an
    operator set would silently mean nothing.
    """
    if cap_s < base_s:
        raise ValueError(f"{cap_name} ({cap_s:g}) cannot be below {base_name} ({base_s:g})")


def _describe(exc: ValidationError) -> str:
    # pydantic's messages can echo the input; rebuild one from locations and types only.
    parts = []
    for err in exc.errors(include_input=False, include_url=False):
        where = ".".join(str(p) for p in err["loc"]) or "settings"
        parts.append(f"{where}: {err['msg']}")
    return "invalid configuration: " + "; ".join(parts)
