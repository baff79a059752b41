"""Reading a remote KEK provider's variables from the environment."""

from __future__ import annotations

from collections.abc import Mapping

from keyrotor.errors import ConfigurationError


def env_value(environ: Mapping[str, str], name: str) -> str | None:
    """The variable's value, or None if it is unset or blank."""
    value = environ.get(name)
    if value is None or not value.strip():
        return None
    return value.strip()


def env_required(environ: Mapping[str, str], name: str, why: str = "") -> str:
    """The variable's value; ConfigurationError naming it if it is unset or blank."""
    value = env_value(environ, name)
    if value is None:
        raise ConfigurationError(f"{name} is not set{why}")
    return value
