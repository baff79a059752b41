"""The local KEK provider: a versioned keyring derived from ``ENCRYPTION_KEY``.

``ENCRYPTION_KEY`` (the name the old Node backend used) is the current master key, with
version ``ENCRYPTION_KEY_VERSION`` (default 1). Older master keys stay available for
unwrapping in ``ENCRYPTION_KEYS_PREVIOUS`` (a JSON object ``{"1": "old key"}``) until
``rotate_kek`` has rewrapped every DEK under the current one.

Each master key string is stretched once, at start-up, into a 32-byte KEK:
``scrypt(key as UTF-8, salt=b"keyrotor/local-kek/v1", N=2**14, r=8, p=1)``. A wrapped DEK is
``nonce(12) || AES-256-GCM(kek, nonce, dek, aad=WrapContext.as_aad())``; its ``kek_id`` is
``local:<key check value>`` so a worker configured with the wrong key says so instead of
failing every unwrap with a generic error.
"""

from __future__ import annotations

import hashlib
import hmac
import math
import os
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from functools import lru_cache

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from keyrotor.errors import ConfigurationError, KekError, WeakKeyError
from keyrotor.kek.base import WrapContext, WrappedDek, foreign_kek

MIN_KEY_CHARS = 32
MIN_KEY_ENTROPY_BITS = 128
_KDF_SALT = b"keyrotor/local-kek/v1"
_NONCE_BYTES = 12
_DEK_BYTES = 32
_WRAPPED_BYTES = _NONCE_BYTES + _DEK_BYTES + 16


def check_master_key(key: str | None, *, name: str = "ENCRYPTION_KEY") -> str:
    """Refuse a missing or weak master key.

    Args:
        key: the master key string.
        name: the variable it came from, for the message.

    Returns:
        The key, unchanged.

    Raises:
        WeakKeyError: missing, shorter than 32 characters, or with under 128 bits of estimated
            entropy (e.g. ``"a" * 40``). The message never contains the key.
    """
    if not key:
        raise WeakKeyError(f"{name} is not set: generate one with `openssl rand -base64 32`")
    if len(key) < MIN_KEY_CHARS:
        raise WeakKeyError(f"{name} is too short ({len(key)} characters, need at least {MIN_KEY_CHARS})")
    if _entropy_bits(key) < MIN_KEY_ENTROPY_BITS:
        raise WeakKeyError(f"{name} is too predictable: generate one with `openssl rand -base64 32`")
    return key


def _entropy_bits(key: str) -> float:
    # Shannon entropy of the character distribution times the length: a crude upper bound
    # that still rejects repeated or low-variety strings.
    counts = Counter(key)
    n = len(key)
    per_char = -sum(c / n * math.log2(c / n) for c in counts.values())
    return per_char * n


@lru_cache(maxsize=32)
def _derive(key: str) -> bytes:
    # scrypt costs ~30-80 ms; a process derives each configured key once.
    return hashlib.scrypt(key.encode(), salt=_KDF_SALT, n=2**14, r=8, p=1, dklen=32)


def key_check_value(kek: bytes) -> str:
    """A 64-bit fingerprint of a key that reveals nothing about it (HMAC of a fixed label)."""
    return hmac.new(kek, b"keyrotor key check value", hashlib.sha256).hexdigest()[:16]


@dataclass(frozen=True)
class LocalKeyring:
    """KEK provider backed by master keys from the environment.

    Build it with :meth:`from_keys`. ``rotate()`` cannot invent a key the operator has to keep:
    the local keyring rotates by configuration (a new ``ENCRYPTION_KEY`` with a higher
    ``ENCRYPTION_KEY_VERSION``, the old one moved to ``ENCRYPTION_KEYS_PREVIOUS``), and
    ``rotate_kek`` then rewraps every DEK still on an older version.
    """

    current: int
    _keks: Mapping[int, bytes] = field(repr=False)
    _random: Callable[[int], bytes] = field(default=os.urandom, repr=False)

    @classmethod
    def from_keys(cls, keys: Mapping[int, str], *, current: int) -> LocalKeyring:
        """Build a keyring from master key strings by version.

        Raises:
            WeakKeyError: a key is missing or weak.
            ConfigurationError: ``current`` is not among the versions, or a version is < 1.
        """
        if current not in keys:
            raise ConfigurationError(f"local keyring: current KEK version {current} has no key")
        keks: dict[int, bytes] = {}
        for version, key in keys.items():
            if version < 1:
                raise ConfigurationError(f"local keyring: KEK version must be >= 1, got {version}")
            name = "ENCRYPTION_KEY" if version == current else f"ENCRYPTION_KEYS_PREVIOUS[{version}]"
            keks[version] = _derive(check_master_key(key, name=name))
        return cls(current=current, _keks=keks)

    @property
    def name(self) -> str:
        return "local"

    def kek_id(self, version: int) -> str:
        """``local:<key check value>`` of the given version."""
        return f"local:{key_check_value(self._kek(version))}"

    @property
    def versions(self) -> tuple[int, ...]:
        """Configured KEK versions, ascending."""
        return tuple(sorted(self._keks))

    def _kek(self, version: int) -> bytes:
        try:
            return self._keks[version]
        except KeyError:
            raise KekError(
                f"local KEK version {version} is not configured (add it to ENCRYPTION_KEYS_PREVIOUS)"
            ) from None

    async def current_version(self) -> int:
        return self.current

    async def wrap(self, dek: bytes, context: WrapContext) -> WrappedDek:
        return self.wrap_sync(dek, context)

    def wrap_sync(self, dek: bytes, context: WrapContext) -> WrappedDek:
        """Synchronous :meth:`wrap` (no I/O: microseconds of CPU)."""
        if len(dek) != _DEK_BYTES:
            raise KekError(f"local: refusing to wrap a DEK of {len(dek)} bytes (need {_DEK_BYTES})")
        nonce = self._random(_NONCE_BYTES)
        blob = nonce + AESGCM(self._kek(self.current)).encrypt(nonce, dek, context.as_aad())
        return WrappedDek(kek_id=self.kek_id(self.current), kek_version=self.current, blob=blob)

    async def unwrap(self, wrapped: WrappedDek, context: WrapContext) -> bytes:
        return self.unwrap_sync(wrapped, context)

    def unwrap_sync(self, wrapped: WrappedDek, context: WrapContext) -> bytes:
        """Synchronous :meth:`unwrap`."""
        if not wrapped.kek_id.startswith("local:"):
            foreign = foreign_kek("local", self.kek_id(self.current), wrapped)
            if foreign is not None:
                raise foreign
        kek = self._kek(wrapped.kek_version)
        expected = f"local:{key_check_value(kek)}"
        if wrapped.kek_id != expected:
            raise KekError(
                f"wrong KEK configured for local version {wrapped.kek_version}: "
                f"DEK was wrapped by {wrapped.kek_id}, this process has {expected}"
            )
        if len(wrapped.blob) != _WRAPPED_BYTES:
            raise KekError(f"local: wrapped DEK for {context.scope} v{context.dek_version} is malformed")
        nonce, body = wrapped.blob[:_NONCE_BYTES], wrapped.blob[_NONCE_BYTES:]
        try:
            return AESGCM(kek).decrypt(nonce, body, context.as_aad())
        except InvalidTag as exc:
            raise KekError(
                f"local: wrapped DEK for {context.scope} v{context.dek_version} does not unwrap "
                "(wrapped for another scope or version, or tampered)"
            ) from exc

    async def rewrap(self, items: Sequence[tuple[WrappedDek, WrapContext]]) -> list[WrappedDek]:
        return [self.wrap_sync(self.unwrap_sync(w, ctx), ctx) for w, ctx in items]

    async def rotate(self) -> int:
        raise ConfigurationError(
            "the local keyring rotates by configuration: set a new ENCRYPTION_KEY with "
            f"ENCRYPTION_KEY_VERSION={self.current + 1} and move the old key to ENCRYPTION_KEYS_PREVIOUS"
        )

    async def check(self) -> None:
        probe = self._random(_DEK_BYTES)
        ctx = WrapContext("keyrotor/health", 1)
        if self.unwrap_sync(self.wrap_sync(probe, ctx), ctx) != probe:
            raise KekError("local keyring failed its round trip")

    async def aclose(self) -> None:
        return None
