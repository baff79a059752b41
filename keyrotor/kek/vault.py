"""The Vault/OpenBao transit KEK provider (hvac, run off the event loop with ``asyncio.to_thread``).

The KEK is a transit key (``VAULT_TRANSIT_KEY``, default ``keyrotor``) of type ``aes256-gcm96``
with ``derived=true``: every request passes ``context = base64(WrapContext.as_aad())``, from which
transit derives a per-context key, so a wrapped DEK copied to another scope or DEK version does
not unwrap. The key is created on first use if it is missing; an existing key of another type,
or not derived, is refused (ConfigurationError) instead of silently losing the binding.

- ``wrap`` = ``encrypt``, ``unwrap`` = ``decrypt``, ``rotate`` = ``keys/<name>/rotate``,
  ``rewrap`` = ``rewrap`` with ``batch_input`` in chunks of at most 249 items. Not 250: since
  2.4.1 OpenBao's listener refuses a request body with more than ``max_request_json_strings``
  (default 1000) JSON strings, and a rewrap item costs four (two keys, two values) plus one for
  ``batch_input``: 1 + 4 x 249 = 997 fits, 250 items (1001) are refused ("refused JSON input due
  to high complexity"). A listener configured with a higher limit still gets 249 a request.
- The KEK version is transit's, read from the ``vault:vN:`` prefix of each ciphertext (so a wrap
  reports the version that really wrapped it). The blob is that ciphertext string in ASCII;
  ``kek_id`` is ``vault:[<namespace>/]<mount>/<key>``.
- :meth:`VaultTransitKek.set_min_decryption_version` retires old versions; call it only after
  every DEK has been rewrapped past them.

Authentication and the token's renewal: :mod:`keyrotor.kek.vault_client`.

hvac is synchronous (requests): each request runs in a worker thread, with hvac's own timeout
equal to the policy's, so a timed-out request does not hold its thread for long.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import os
import re
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from functools import partial
from typing import Any, TypeVar

import hvac
import hvac.exceptions as hv

from keyrotor.errors import ConfigurationError, KekError, KekUnavailable
from keyrotor.kek.base import DEK_BYTES, WrapContext, WrappedDek, check_dek, foreign_kek
from keyrotor.kek.metrics import CallObserver
from keyrotor.kek.resilience import CallBudget, CircuitOpen, Resilience, ResiliencePolicy
from keyrotor.kek.vault_client import TokenKeeper, VaultConfig, response_data, shown_address, vault_translator

T = TypeVar("T")

# OpenBao's default listener limit max_request_json_strings = 1000; a batch item is 4 strings.
_JSON_STRINGS_LIMIT = 1000
MAX_BATCH = (_JSON_STRINGS_LIMIT - 1) // 4  # 249
_VERSION_PREFIX = re.compile(r"^vault:v(\d+):")
_PROBE_CONTEXT = WrapContext("keyrotor/health", 1)


@dataclass(frozen=True)
class TransitKeyInfo:
    """What transit says about the key's versions."""

    latest_version: int
    min_decryption_version: int
    min_encryption_version: int


def ciphertext_version(ciphertext: str) -> int:
    """The key version of a transit ciphertext (``vault:vN:…``); KekError if it has none."""
    match = _VERSION_PREFIX.match(ciphertext)
    if match is None:
        raise KekError("vault: not a transit ciphertext (no vault:vN: prefix)")
    return int(match.group(1))


def _b64(data: bytes) -> str:
    return base64.b64encode(data).decode("ascii")


class VaultTransitKek:
    """KEK provider backed by a Vault/OpenBao transit key. Build it with :meth:`open`."""

    def __init__(
        self,
        *,
        config: VaultConfig,
        client: hvac.Client,
        tokens: TokenKeeper,
        resilience: Resilience,
        version_ttl_s: float,
        batch_size: int,
    ) -> None:
        self.config = config
        self._client = client
        self._tokens = tokens
        self.resilience = resilience
        self._version_ttl_s = version_ttl_s
        self._batch_size = batch_size
        self._version = 0
        self._version_read_at = float("-inf")
        prefix = f"{config.namespace.strip('/')}/" if config.namespace else ""
        self._kek_id = f"vault:{prefix}{config.mount_point}/{config.transit_key}"

    @classmethod
    async def open(
        cls,
        config: VaultConfig,
        *,
        policy: ResiliencePolicy | None = None,
        limiter: CallBudget | None = None,
        observer: CallObserver | None = None,
        version_ttl_s: float = 30.0,
        batch_size: int = MAX_BATCH,
    ) -> VaultTransitKek:
        """Log in, and create the transit key if it is missing.

        Args:
            config: address, namespace, credentials and key name.
            policy: timeouts, retries, breaker and rate budget.
            limiter: a rate budget shared with other providers.
            observer: metrics hooks.
            version_ttl_s: how long :meth:`current_version` caches the key's latest version.
            batch_size: items per rewrap request (at most :data:`MAX_BATCH`, 249).

        Raises:
            ConfigurationError: the key exists with another type or without ``derived``, or it
                cannot be created (no transit engine at the mount point).
            KekError: login refused, or permission denied.
            KekUnavailable: the server cannot be reached.
        """
        if not 1 <= batch_size <= MAX_BATCH:
            raise ConfigurationError(f"vault: batch_size must be within 1..{MAX_BATCH}, got {batch_size}")
        policy = policy or ResiliencePolicy()
        options: dict[str, Any] = {
            "url": config.addr,
            "namespace": config.namespace,
            "verify": config.verify_tls,
            "timeout": policy.timeout_s,  # hvac's own (requests) timeout, per request
        }
        client = hvac.Client(**options)
        target = f"vault ({shown_address(config.addr)})"
        resilience = Resilience(
            "vault", policy, vault_translator(target), target=target, limiter=limiter, observer=observer
        )
        tokens = TokenKeeper(client, config, time.monotonic)
        provider = cls(
            config=config,
            client=client,
            tokens=tokens,
            resilience=resilience,
            version_ttl_s=version_ttl_s,
            batch_size=batch_size,
        )
        try:
            await resilience.call("login", lambda: asyncio.to_thread(tokens.start))
            await provider._ensure_key()
        except BaseException:
            await provider.aclose()
            raise
        return provider

    @property
    def name(self) -> str:
        return "vault"

    @property
    def kek_id(self) -> str:
        return self._kek_id

    @property
    def token_accessor(self) -> str | None:
        """The accessor of the token in use (not a secret: it cannot authenticate)."""
        return self._tokens.accessor

    @property
    def token_renewals(self) -> int:
        return self._tokens.renewals

    @property
    def token_logins(self) -> int:
        return self._tokens.logins

    # --- plumbing ------------------------------------------------------------------------------

    def _in_thread(self, request: Callable[[], T]) -> T:
        self._tokens.ensure()
        try:
            return request()
        except hv.Forbidden:
            # The token was revoked or expired early: an AppRole can log in again, once.
            if not self._tokens.relogin():
                raise
            return request()

    async def _call(self, operation: str, request: Callable[[], T], *, retry: bool = True) -> T:
        return await self.resilience.call(
            operation, lambda: asyncio.to_thread(self._in_thread, request), retry=retry
        )

    @property
    def _transit(self) -> Any:
        return self._client.secrets.transit

    async def _ensure_key(self) -> None:
        name, mount = self.config.transit_key, self.config.mount_point
        try:
            data = response_data(
                await self._call("read_key", lambda: self._transit.read_key(name, mount_point=mount))
            )
        except KekError as err:
            if not isinstance(err.__cause__, hv.InvalidPath):
                raise
            try:
                await self._call(
                    "create_key",
                    lambda: self._transit.create_key(
                        name, key_type="aes256-gcm96", derived=True, mount_point=mount
                    ),
                )
            except KekError as create_err:
                raise ConfigurationError(
                    f"vault: cannot create transit key {name} at {mount}/ (is a transit engine mounted "
                    f"there, and may the token create keys?): {create_err}"
                ) from create_err
            data = response_data(
                await self._call("read_key", lambda: self._transit.read_key(name, mount_point=mount))
            )
        if data.get("type") != "aes256-gcm96" or not data.get("derived"):
            raise ConfigurationError(
                f"vault: transit key {name} is {data.get('type')} with derived={data.get('derived')}; "
                "keyrotor needs aes256-gcm96 with derived=true "
                "(the context binds each DEK to its scope and version)"
            )
        self._remember(self._info(data).latest_version)

    @staticmethod
    def _info(data: Mapping[str, Any]) -> TransitKeyInfo:
        return TransitKeyInfo(
            latest_version=int(data["latest_version"]),
            min_decryption_version=int(data.get("min_decryption_version") or 1),
            min_encryption_version=int(data.get("min_encryption_version") or 0),
        )

    def _remember(self, version: int) -> int:
        self._version = max(self._version, version)
        self._version_read_at = asyncio.get_running_loop().time()
        return self._version

    def _check_kek_id(self, wrapped: WrappedDek) -> str:
        foreign = foreign_kek("vault", self._kek_id, wrapped)
        if foreign is not None:
            raise foreign
        if wrapped.kek_id != self._kek_id:
            raise KekError(
                f"vault: DEK was wrapped by {wrapped.kek_id}, this provider uses {self._kek_id} "
                "(VAULT_NAMESPACE or VAULT_TRANSIT_KEY names another key)"
            )
        try:
            ciphertext = wrapped.blob.decode("ascii")
        except UnicodeDecodeError:
            ciphertext = None  # raised below, not here: the decoder's error holds the blob
        if ciphertext is None:
            raise KekError("vault: wrapped DEK is not a transit ciphertext")
        if ciphertext_version(ciphertext) != wrapped.kek_version:
            raise KekError(
                f"vault: wrapped DEK claims KEK v{wrapped.kek_version} but its ciphertext is "
                f"v{ciphertext_version(ciphertext)} (tampered)"
            )
        return ciphertext

    # --- the Protocol ------------------------------------------------------------------------

    async def key_info(self) -> TransitKeyInfo:
        """Read the key's latest, min decryption and min encryption versions."""
        name, mount = self.config.transit_key, self.config.mount_point
        info = self._info(
            response_data(
                await self._call("read_key", lambda: self._transit.read_key(name, mount_point=mount))
            )
        )
        self._remember(info.latest_version)
        return info

    async def current_version(self) -> int:
        """The key's latest version (cached for ``version_ttl_s``)."""
        if asyncio.get_running_loop().time() - self._version_read_at < self._version_ttl_s:
            return self._version
        return (await self.key_info()).latest_version

    async def wrap(self, dek: bytes, context: WrapContext) -> WrappedDek:
        check_dek("vault", dek)
        name, mount = self.config.transit_key, self.config.mount_point
        plaintext, derivation = _b64(dek), _b64(context.as_aad())
        response = await self._call(
            "encrypt",
            lambda: self._transit.encrypt_data(
                name, plaintext=plaintext, context=derivation, mount_point=mount
            ),
        )
        ciphertext = str(response_data(response)["ciphertext"])
        version = ciphertext_version(ciphertext)
        self._remember(version)
        return WrappedDek(kek_id=self._kek_id, kek_version=version, blob=ciphertext.encode("ascii"))

    async def unwrap(self, wrapped: WrappedDek, context: WrapContext) -> bytes:
        ciphertext = self._check_kek_id(wrapped)
        name, mount = self.config.transit_key, self.config.mount_point
        derivation = _b64(context.as_aad())
        try:
            response = await self._call(
                "decrypt",
                lambda: self._transit.decrypt_data(
                    name, ciphertext=ciphertext, context=derivation, mount_point=mount
                ),
            )
        except KekError as err:
            raise KekError(
                f"vault: wrapped DEK for {context.scope} v{context.dek_version} does not unwrap "
                f"(wrapped for another scope or version, tampered, or its KEK version retired): {err}"
            ) from err
        try:
            dek = base64.b64decode(response_data(response)["plaintext"], validate=True)
        except (KeyError, binascii.Error):
            raise KekError(f"vault: decrypt of the DEK for {context.scope} returned no plaintext") from None
        if len(dek) != DEK_BYTES:
            raise KekError(f"vault: wrapped DEK for {context.scope} v{context.dek_version} is not a DEK")
        return dek

    async def rewrap(self, items: Sequence[tuple[WrappedDek, WrapContext]]) -> list[WrappedDek]:
        """Rewrap server side with transit ``rewrap``, ``batch_input`` chunks of ``batch_size`` (<= 249)."""
        ciphertexts = [self._check_kek_id(wrapped) for wrapped, _ in items]
        name, mount = self.config.transit_key, self.config.mount_point
        out: list[WrappedDek] = []
        for start in range(0, len(items), self._batch_size):
            chunk = range(start, min(start + self._batch_size, len(items)))
            batch = [{"ciphertext": ciphertexts[i], "context": _b64(items[i][1].as_aad())} for i in chunk]
            request = partial(self._transit.rewrap_data, name, None, batch_input=batch, mount_point=mount)
            response = await self._call("rewrap", request)
            results = response_data(response).get("batch_results") or []
            if len(results) != len(batch):
                raise KekError(f"vault: rewrap returned {len(results)} results for {len(batch)} items")
            for i, result in zip(chunk, results, strict=True):
                if result.get("error"):
                    context = items[i][1]
                    raise KekError(
                        f"vault: wrapped DEK for {context.scope} v{context.dek_version} (item {i}) does not "
                        f"rewrap: {result['error']}"
                    )
                ciphertext = str(result["ciphertext"])
                version = ciphertext_version(ciphertext)
                out.append(
                    WrappedDek(kek_id=self._kek_id, kek_version=version, blob=ciphertext.encode("ascii"))
                )
        if out:
            self._remember(max(w.kek_version for w in out))
        return out

    async def latest_version(self) -> int:
        """The key's latest version, read from the server now."""
        return (await self.key_info()).latest_version

    async def rotate(self) -> int:
        """Rotate the transit key and return its new latest version (see :meth:`rotate_from`)."""
        return await self.rotate_from(await self.latest_version())

    async def rotate_from(self, version: int) -> int:
        """Rotate the transit key from ``version``, unless it is past ``version`` already.

        Transit's rotate has no idempotency token: a request that timed out may yet be carried
        out. So it is sent once (never retried), and a key found past ``version`` (before the
        request, or after it failed) is taken as rotated, not rotated again.

        Returns:
            The key's latest version.

        Raises:
            KekUnavailable: the server cannot be reached and shows no new version (call again
                with the same ``version``: if the request went through meanwhile, it is adopted).
            KekError: permission denied.
        """
        latest = await self.latest_version()
        if latest > version:
            return latest
        name, mount = self.config.transit_key, self.config.mount_point
        try:
            await self._call("rotate", lambda: self._transit.rotate_key(name, mount_point=mount), retry=False)
        except KekUnavailable as err:
            if isinstance(err, CircuitOpen):
                raise
            latest = await self.latest_version()
            if latest <= version:
                raise
            return latest
        return await self.latest_version()

    async def set_min_decryption_version(self, version: int) -> None:
        """Refuse to decrypt with key versions below ``version`` (transit keeps them until trimmed).

        Call it only after every DEK wrapped under an older version has been rewrapped.

        Raises:
            KekError: ``version`` is not between 1 and the latest version, or permission denied.
        """
        info = await self.key_info()
        if not 1 <= version <= info.latest_version:
            raise KekError(
                f"vault: min_decryption_version {version} is outside 1..{info.latest_version} "
                f"for transit key {self.config.transit_key}"
            )
        name, mount = self.config.transit_key, self.config.mount_point
        await self._call(
            "configure_key",
            lambda: self._transit.update_key_configuration(
                name, min_decryption_version=version, mount_point=mount
            ),
        )

    async def min_decryption_version(self) -> int:
        """The transit key's ``min_decryption_version``."""
        return (await self.key_info()).min_decryption_version

    async def raise_min_decryption_version(self, version: int) -> int | None:
        """Raise the key's ``min_decryption_version`` to ``version``; never lower it.

        ``rotate_kek`` calls it once every DEK wrapped by this key is on ``version`` or later.
        Transit keeps the older versions (nothing is trimmed), so an operator can lower it again
        with ``bao write transit/keys/<key>/config min_decryption_version=<n>``.

        Returns:
            The previous ``min_decryption_version``, or None if it was already ``version`` or higher.

        Raises:
            KekError: ``version`` is not between 1 and the latest version, or permission denied.
        """
        before = await self.min_decryption_version()
        if version <= before:
            return None
        await self.set_min_decryption_version(version)
        return before

    async def check(self) -> None:
        """Round-trip a random probe through encrypt and decrypt."""
        probe = os.urandom(DEK_BYTES)
        if await self.unwrap(await self.wrap(probe, _PROBE_CONTEXT), _PROBE_CONTEXT) != probe:
            raise KekError(f"vault: transit key {self.config.transit_key} failed its round trip")

    async def aclose(self) -> None:
        await asyncio.to_thread(self._client.adapter.close)
