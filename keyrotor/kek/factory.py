"""Build the configured KEK provider from settings (``SECRETS_PROVIDER``)."""

from __future__ import annotations

import functools
import os
from collections.abc import Mapping

from keyrotor.errors import ConfigurationError, StoreUnavailable
from keyrotor.kek.base import KekProvider
from keyrotor.kek.budget import RateBudget
from keyrotor.kek.install_salt import DeferredLocalKeyring, read_install_salt
from keyrotor.kek.local import LocalKeyring, check_master_key
from keyrotor.kek.routing import RoutingKek
from keyrotor.kek.throttle import ThrottledKek
from keyrotor.settings import KekSettings


def local_keyring(settings: KekSettings, install_salt: bytes | None = None) -> LocalKeyring:
    """The local keyring from ``ENCRYPTION_KEY`` (+ ``ENCRYPTION_KEYS_PREVIOUS``).

    ``install_salt`` is this install's salt (:func:`keyrotor.kek.install_salt.read_install_salt`;
    :func:`open_provider` reads it); None keeps passphrase keys on the pre-salt derivation.

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
    return LocalKeyring.from_keys(keys, current=settings.encryption_key_version, install_salt=install_salt)


async def open_provider(
    settings: KekSettings,
    environ: Mapping[str, str] | None = None,
    *,
    install_salt: bool = True,
    budget: RateBudget | None = None,
) -> KekProvider:
    """Open the provider ``settings.secrets_provider`` names.

    ``local`` is built from ``settings``; ``aws`` and ``vault`` read their own variables from
    ``environ`` (default ``os.environ``; see the README's configuration reference). With
    ``KEYROTOR_KEK_READ_PROVIDERS`` set, the result is a :class:`~keyrotor.kek.routing.RoutingKek`
    that also unwraps DEKs those providers wrapped (during a provider migration).

    The local keyring is salted with the install salt of ``settings.database_url``; a regional
    keyring (``install_salt=False``) is not, since its database holds only copies.

    ``budget`` (the worker's ``KEYROTOR_KEK_CALLS_PER_SECOND``) is spent once per request a remote
    provider sends, retries and its own reads (the KMS rotation count) included, from the first
    request of its opening on; the local keyring sends none and spends a unit per DEK it handles
    (:class:`~keyrotor.kek.throttle.ThrottledKek`).
    """
    env = os.environ if environ is None else environ
    primary = await _open_one(settings.secrets_provider, settings, env, install_salt, budget)
    names = read_providers(settings)
    if not names:
        return primary
    readers: dict[str, KekProvider] = {}
    try:
        for name in names:
            reader = await _open_one(name, settings, env, install_salt, budget)
            readers[reader.name] = reader
    except BaseException:
        for reader in readers.values():
            await reader.aclose()
        await primary.aclose()
        raise
    return RoutingKek(primary, readers)


def read_providers(settings: KekSettings) -> list[str]:
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


async def _open_one(
    name: str,
    settings: KekSettings,
    environ: Mapping[str, str],
    install_salt: bool,
    budget: RateBudget | None,
) -> KekProvider:
    if name == "local":
        local = await _open_local(settings, install_salt)
        return local if budget is None else ThrottledKek(local, budget)
    # Imported here: the remote providers load the AWS and Vault clients (aiobotocore, hvac),
    # which a process on the local keyring never needs.
    from keyrotor.kek.remote import open_remote_provider

    # The budget goes to the provider's resilience layer, which spends it per attempt: a
    # wrapper around the provider would see one call where a throttled retry sends four.
    return await open_remote_provider(name, environ, limiter=budget)


async def _open_local(settings: KekSettings, install_salt: bool) -> KekProvider:
    check_master_key(settings.encryption_key.get_secret_value() if settings.encryption_key else None)
    if not install_salt:
        return local_keyring(settings)
    try:
        salt = await read_install_salt(settings.database_url)
    except StoreUnavailable:
        # Start anyway, as without the salt nothing needs the KEK: it is read on first use.
        return DeferredLocalKeyring(functools.partial(local_keyring, settings), settings.database_url)
    return local_keyring(settings, salt)
