"""The local KEK provider: a versioned keyring derived from ``ENCRYPTION_KEY``.

``ENCRYPTION_KEY`` (the name the old Node backend used) is the current master key, with
version ``ENCRYPTION_KEY_VERSION`` (default 1). Older master keys stay available for
unwrapping in ``ENCRYPTION_KEYS_PREVIOUS`` (a JSON object ``{"1": "old key"}``) until
``rotate_kek`` has rewrapped every DEK under the current one.

A wrapped DEK is ``nonce(12) || AES-256-GCM(kek, nonce, dek, aad=WrapContext.as_aad())``. Its
``kek_id`` carries a key check value, so a worker configured with the wrong key says so
instead of failing every unwrap with a generic error.

How a master key becomes a KEK, and why
---------------------------------------

The threat is a copy of the database (a dump, a backup, a replica) in the hands of someone who
wants the KEK. Everything such a copy holds about the key is the wrapped DEKs and their
``kek_id``. Two things must then hold: a guess at the master key costs at least one full KDF
call to test, and a guess tested against one install says nothing about another.

* **Generated keys (the documented way).** ``keyrotor keygen`` prints ``krk1_`` followed by
  32 random bytes in unpadded base64url (:func:`generate_key`). 256 random bits cannot be
  guessed, so no stretching is needed: ``KEK = HKDF-SHA256(key bytes, salt=install salt,
  info="keyrotor/local-kek/v2")``. The prefix makes the format self-describing: a value that
  starts with ``krk1_`` but is not exactly 32 bytes is refused rather than taken as a
  passphrase.
* **Passphrases (anything else).** They are stretched with scrypt (N=2**14, r=8, p=1, ~50 ms,
  16 MiB) salted with ``keyrotor/local-kek/v2:`` and the **install salt**, and must pass
  :func:`check_master_key`: at least 32 characters and an estimated 128 bits once sequences
  (``0123…``, ``abcd…``), repeats, dictionary-like words, years and a small alphabet are
  discounted (:func:`estimate_bits`). ``0123456789abcdef0123456789abcdef`` and
  ``my-company-production-encryption-key-2024`` are refused.
* **The install salt** is 32 random bytes written once, by ``keyrotor db upgrade`` (migration
  ``0010_install_salt``), in the ``install_salt`` table, and read by
  :func:`keyrotor.kek.install_salt.read_install_salt` wherever the provider is opened
  (``KeyManager``, workers, the scheduler, the CLI). Keeping it in the database makes it stable
  for every process of an install without a second secret to distribute, and unique per
  install without trusting operators to pick one; it is not secret (it only has to differ).
  Two installs with the same passphrase therefore have different KEKs and different kek_ids,
  and a table of precomputed guesses is useless.
* **The key check value** is ``HMAC-SHA256(KEK, label)``, computed from the KDF *output*. A
  guess is tested against it only by running the KDF, so the kek_id is no cheaper an oracle
  than the wrapped DEKs themselves. v2 ids are ``local:v2:<16 hex>``.

Existing deployments
--------------------

Before this scheme, every install used ``scrypt(key, salt="keyrotor/local-kek/v1")`` and ids
``local:<16 hex>`` (no ``v2:``). Those DEKs still unwrap: an id of that form selects the old
derivation (run once, lazily, on the first such DEK). New DEKs are wrapped the new way. To move
the old ones, rotate the KEK (``docs/providers.md``): set a new ``ENCRYPTION_KEY`` (from
``keyrotor keygen``) with a higher ``ENCRYPTION_KEY_VERSION``, keep the old key in
``ENCRYPTION_KEYS_PREVIOUS``, and run ``keyrotor rotate-kek``. A passphrase that the old check
accepted but the new rule refuses still opens old DEKs when it is a *previous* key (it is only
read), but cannot be the current key.

A keyring built without the install salt (a database not yet upgraded, or a regional keyring,
which has no database of its own to hold one) keeps wrapping passphrase-derived DEKs the old
way and says so with a warning; generated keys need no salt to be safe and use HKDF with an
empty salt there.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import logging
import math
import os
import re
from collections import Counter
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from functools import lru_cache

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

from keyrotor.errors import ConfigurationError, KekError, WeakKeyError
from keyrotor.kek.base import WrapContext, WrappedDek, foreign_kek

log = logging.getLogger(__name__)

MIN_KEY_CHARS = 32
MIN_KEY_ENTROPY_BITS = 128
KEY_PREFIX = "krk1_"
"""Prefix of a generated master key (``keyrotor keygen``): 32 random bytes follow, base64url."""
KEY_BYTES = 32
_V1_SALT = b"keyrotor/local-kek/v1"
_V2_SALT = b"keyrotor/local-kek/v2:"
_V2_INFO = b"keyrotor/local-kek/v2"
_V2_ID = "local:v2:"
_NONCE_BYTES = 12
_DEK_BYTES = 32
_WRAPPED_BYTES = _NONCE_BYTES + _DEK_BYTES + 16
_GENERATE = "generate one with `keyrotor keygen`"
# A run of letters that reads as a word (lower case, Capitalised or UPPER): ~17 bits, the size
# of a large dictionary, whatever its length.
_WORD = re.compile(r"[a-z]{3,}|[A-Z][a-z]{2,}|[A-Z]{3,}")
_YEAR = re.compile(r"(?:19|20)\d\d(?!\d)")
_WORD_BITS = 17.0
_YEAR_BITS = 7.0
_SEPARATOR_BITS = 2.0


def generate_key() -> str:
    """A new master key: ``krk1_`` and 32 random bytes (os.urandom) in unpadded base64url."""
    return KEY_PREFIX + base64.urlsafe_b64encode(os.urandom(KEY_BYTES)).decode("ascii").rstrip("=")


def parse_generated_key(key: str) -> bytes | None:
    """The 32 bytes of a generated key, or None if ``key`` is a passphrase.

    Raises:
        WeakKeyError: it starts with ``krk1_`` but is not 32 bytes of canonical base64url.
    """
    if not key.startswith(KEY_PREFIX):
        return None
    body = key[len(KEY_PREFIX) :]
    try:
        raw = base64.urlsafe_b64decode(body + "=" * (-len(body) % 4))
    except (binascii.Error, ValueError):
        raw = b""
    if len(raw) != KEY_BYTES or base64.urlsafe_b64encode(raw).decode().rstrip("=") != body:
        raise WeakKeyError(
            f"a {KEY_PREFIX} key must hold exactly {KEY_BYTES} bytes of base64url: {_GENERATE}"
        )
    return raw


def check_master_key(key: str | None, *, name: str = "ENCRYPTION_KEY", strict: bool = True) -> str:
    """Refuse a missing or weak master key.

    Args:
        key: the master key string.
        name: the variable it came from, for the message.
        strict: apply the strength rule of :func:`estimate_bits` (a key that only opens old
            DEKs, a previous key, is held to the older length-and-variety rule).

    Returns:
        The key, unchanged.

    Raises:
        WeakKeyError: missing, malformed generated key, shorter than 32 characters, or with
            under 128 estimated bits. The message never contains the key.
    """
    if not key:
        raise WeakKeyError(f"{name} is not set: {_GENERATE}")
    if parse_generated_key(key) is not None:
        return key
    if len(key) < MIN_KEY_CHARS:
        raise WeakKeyError(
            f"{name} is too short ({len(key)} characters, need at least {MIN_KEY_CHARS}): {_GENERATE}"
        )
    bits = estimate_bits(key) if strict else _shannon_bits(key)
    if bits < MIN_KEY_ENTROPY_BITS:
        raise WeakKeyError(
            f"{name} is too predictable (about {bits:.0f} bits, need {MIN_KEY_ENTROPY_BITS}): {_GENERATE}"
        )
    return key


def estimate_bits(key: str) -> float:
    """A conservative estimate of a passphrase's entropy in bits (an attacker's view).

    Walks the text left to right, charging each piece what guessing it would cost: a repeat of
    earlier text (3+ characters) the bits to point at it; a character one step from the one
    before (``0123``, ``abcd``, ``aaaa``) 1 bit; a word-like run of letters 17 bits; a year
    7 bits; a punctuation character seen before 2 bits; any other character log2 of the
    alphabet the key draws from (4 bits if it is all hex, up to ~6.5 for all four character
    classes). Random keys of 32 bytes score 160-260 bits; the threshold is 128.
    """
    n = len(key)
    per_char = _alphabet_bits(key)
    bits, i = 0.0, 0
    while i < n:
        repeat = _longest_repeat(key, i)
        if repeat >= 3:
            bits += math.log2(i + 1)
            i += repeat
            continue
        if i and abs(ord(key[i]) - ord(key[i - 1])) <= 1:
            bits += 1.0
            i += 1
            continue
        word = _WORD.match(key, i)
        if word is not None:
            bits += min(_WORD_BITS, per_char * len(word.group()))
            i = word.end()
            continue
        year = _YEAR.match(key, i)
        if year is not None:
            bits += _YEAR_BITS
            i = year.end()
            continue
        # A separator used before ("-" between words) is a guess among a handful.
        bits += _SEPARATOR_BITS if not key[i].isalnum() and key[i] in key[:i] else per_char
        i += 1
    return bits


def _alphabet_bits(key: str) -> float:
    if all(c in "0123456789abcdef" for c in key) or all(c in "0123456789ABCDEF" for c in key):
        return 4.0
    size = 0
    size += 10 if any(c.isdigit() for c in key) else 0
    size += 26 if any(c.islower() for c in key) else 0
    size += 26 if any(c.isupper() for c in key) else 0
    size += 33 if any(not c.isalnum() for c in key) else 0
    return math.log2(max(size, 2))


def _longest_repeat(key: str, i: int) -> int:
    # Longest prefix of key[i:] that occurs in key[:i+len-1] (overlap allowed: "abcabcabc").
    # Quadratic, on strings of a few hundred characters at most, once at start-up.
    length = 0
    while i + length < len(key) and key[i : i + length + 1] in key[: i + length]:
        length += 1
    return length


def _shannon_bits(key: str) -> float:
    # The older rule: entropy of the character distribution times the length.
    counts = Counter(key)
    n = len(key)
    return -sum(c / n * math.log2(c / n) for c in counts.values()) * n


@lru_cache(maxsize=32)
def _derive_v1(key: str) -> bytes:
    # The derivation of every install before the install salt: read path only.
    return hashlib.scrypt(key.encode(), salt=_V1_SALT, n=2**14, r=8, p=1, dklen=32)


@lru_cache(maxsize=32)
def _derive_v2(key: str, install_salt: bytes) -> bytes:
    raw = parse_generated_key(key)
    if raw is not None:  # 256 random bits: no stretching needed
        return HKDF(algorithm=hashes.SHA256(), length=32, salt=install_salt or None, info=_V2_INFO).derive(
            raw
        )
    return hashlib.scrypt(key.encode(), salt=_V2_SALT + install_salt, n=2**14, r=8, p=1, dklen=32)


def key_check_value(kek: bytes) -> str:
    """A 64-bit fingerprint of a KEK (HMAC of a fixed label with the KDF's output as key).

    Testing a guessed master key against it costs the full KDF, like testing it against a
    wrapped DEK.
    """
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
    _keys: Mapping[int, str] = field(repr=False)
    _keks: Mapping[int, bytes] = field(repr=False)
    install_salt: bytes | None = field(default=None, repr=False)
    _random: Callable[[int], bytes] = field(default=os.urandom, repr=False)

    @classmethod
    def from_keys(
        cls, keys: Mapping[int, str], *, current: int, install_salt: bytes | None = None
    ) -> LocalKeyring:
        """Build a keyring from master key strings by version.

        Args:
            keys: master keys by KEK version.
            current: the version new DEKs are wrapped with.
            install_salt: this install's salt (``keyrotor.kek.install_salt``); None keeps
                passphrase keys on the pre-salt derivation (see the module docstring).

        Raises:
            WeakKeyError: a key is missing or weak (the current one by the strength rule).
            ConfigurationError: ``current`` is not among the versions, or a version is < 1.
        """
        if current not in keys:
            raise ConfigurationError(f"local keyring: current KEK version {current} has no key")
        keks: dict[int, bytes] = {}
        for version, key in keys.items():
            if version < 1:
                raise ConfigurationError(f"local keyring: KEK version must be >= 1, got {version}")
            name = "ENCRYPTION_KEY" if version == current else f"ENCRYPTION_KEYS_PREVIOUS[{version}]"
            check_master_key(key, name=name, strict=version == current)
            keks[version] = _wrapping_kek(key, install_salt)
        if install_salt is None and parse_generated_key(keys[current]) is None:
            log.warning(
                "local keyring without an install salt: new DEKs are wrapped the pre-salt way "
                "(run `keyrotor db upgrade`; regional keyrings: use a key from `keyrotor keygen`)"
            )
        return cls(current=current, _keys=dict(keys), _keks=keks, install_salt=install_salt)

    @property
    def name(self) -> str:
        return "local"

    def kek_id(self, version: int) -> str:
        """The id new DEKs of ``version`` get: ``local:v2:<check value>`` (``local:<...>`` pre-salt)."""
        return self._id_of(self._key(version), self._kek(version))

    @property
    def versions(self) -> tuple[int, ...]:
        """Configured KEK versions, ascending."""
        return tuple(sorted(self._keks))

    def _key(self, version: int) -> str:
        try:
            return self._keys[version]
        except KeyError:
            raise KekError(
                f"local KEK version {version} is not configured (add it to ENCRYPTION_KEYS_PREVIOUS)"
            ) from None

    def _kek(self, version: int) -> bytes:
        self._key(version)
        return self._keks[version]

    def _id_of(self, key: str, kek: bytes) -> str:
        v2 = self.install_salt is not None or parse_generated_key(key) is not None
        return (_V2_ID if v2 else "local:") + key_check_value(kek)

    def _unwrapping_kek(self, wrapped: WrappedDek) -> bytes:
        """The KEK whose id ``wrapped`` names, among this version's derivations."""
        key, kek = self._key(wrapped.kek_version), self._kek(wrapped.kek_version)
        candidates: list[Callable[[], bytes]] = [lambda: kek]
        if wrapped.kek_id.startswith(_V2_ID):
            if parse_generated_key(key) is not None and self.install_salt:
                candidates.append(lambda: _derive_v2(key, b""))  # wrapped before the salt existed
        else:
            candidates = [lambda: _derive_v1(key)]
        for derive in candidates:
            candidate = derive()
            if hmac.compare_digest(wrapped.kek_id[-16:], key_check_value(candidate)):
                return candidate
        raise KekError(
            f"wrong KEK configured for local version {wrapped.kek_version}: DEK was wrapped by "
            f"{wrapped.kek_id}, this process has {self.kek_id(wrapped.kek_version)}"
            + ("" if self.install_salt is not None else " (no install salt loaded)")
        )

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
        """Synchronous :meth:`unwrap` (a pre-salt DEK's first unwrap runs the old scrypt once)."""
        if not wrapped.kek_id.startswith("local:"):
            foreign = foreign_kek("local", self.kek_id(self.current), wrapped)
            if foreign is not None:
                raise foreign
        kek = self._unwrapping_kek(wrapped)
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


def _wrapping_kek(key: str, install_salt: bytes | None) -> bytes:
    """The KEK new DEKs are wrapped with: v2, except a passphrase without an install salt."""
    if install_salt is None and parse_generated_key(key) is None:
        return _derive_v1(key)
    return _derive_v2(key, install_salt or b"")
