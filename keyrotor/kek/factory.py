"""Build the configured KEK provider from settings (``SECRETS_PROVIDER``)."""

from __future__ import annotations

import os
from collections.abc import Mapping

from keyrotor.errors import ConfigurationError
from keyrotor.kek.base import KekProvider
from keyrotor.kek.local import LocalKeyring
from keyrotor.settings import Settings


def local_keyring(settings: Settings) -> LocalKeyring:
    """The local keyring from ``ENCRYPTION_KEY`` (+ ``ENCRYPTION_KEYS_PREVIOUS``).

    Raises:
        WeakKeyError: ``ENCRYPTION_KEY`` missing or weak.
        ConfigurationError: the versions do not fit together.
    """
    keys: dict[int, str] = {v: k.get_secret_value() for v, k in settings.encryption_keys_previous.items()}
    if settings.encryption_key_version in keys:
        raise ConfigurationError(
            f"ENCRYPTION_KEYS_PREVIOUS must not contain the current version {settings.encryption_key_version}"
        )
    keys[settings.encryption_key_version] = (
        settings.encryption_key.get_secret_value() if settings.encryption_key else ""
    )
    return LocalKeyring.from_keys(keys, current=settings.encryption_key_version)


async def open_provider(settings: Settings, environ: Mapping[str, str] | None = None) -> KekProvider:
    """Open the provider ``settings.secrets_provider`` names.

    ``local`` is built from ``settings``; ``aws`` and ``vault`` read their own variables from
    ``environ`` (default ``os.environ``; see the README's configuration reference).
    """
    if settings.secrets_provider == "local":
        return local_keyring(settings)
    from keyrotor.kek.remote import open_remote_provider

    return await open_remote_provider(settings.secrets_provider, os.environ if environ is None else environ)
