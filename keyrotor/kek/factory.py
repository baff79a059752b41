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
    ``environ`` (default ``os.environ``; see the README's configuration reference). With
    ``KEYROTOR_KEK_READ_PROVIDERS`` set, the result is a :class:`~keyrotor.kek.routing.RoutingKek`
    that also unwraps DEKs those providers wrapped (during a provider migration).
    """
    env = os.environ if environ is None else environ
    primary = await _open_one(settings.secrets_provider, settings, env)
    names = read_providers(settings)
    if not names:
        return primary
    from keyrotor.kek.routing import RoutingKek

    readers: dict[str, KekProvider] = {}
    try:
        for name in names:
            reader = await _open_one(name, settings, env)
            readers[reader.name] = reader
    except BaseException:
        for reader in readers.values():
            await reader.aclose()
        await primary.aclose()
        raise
    return RoutingKek(primary, readers)


def read_providers(settings: Settings) -> list[str]:
    """``KEYROTOR_KEK_READ_PROVIDERS`` as a list, without ``SECRETS_PROVIDER`` itself.

    Raises:
        ConfigurationError: a name is not ``local``, ``aws`` or ``vault``.
    """
    names = [n.strip() for n in settings.kek_read_providers.split(",") if n.strip()]
    for name in names:
        if name not in ("local", "aws", "vault"):
            raise ConfigurationError(
                f"KEYROTOR_KEK_READ_PROVIDERS: unknown provider {name!r} (expected local, aws or vault)"
            )
    return [n for n in dict.fromkeys(names) if n != settings.secrets_provider]


async def _open_one(name: str, settings: Settings, environ: Mapping[str, str]) -> KekProvider:
    if name == "local":
        return local_keyring(settings)
    from keyrotor.kek.remote import open_remote_provider

    return await open_remote_provider(name, environ)
