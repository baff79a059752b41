"""The ``kr1`` ciphertext format: seal and open one value with a DEK.

Pure and synchronous: microseconds of CPU, no I/O. A sealed value is text that fits any
``TEXT`` column and shows its DEK version to SQL (``split_part(value, ':', 2)``)::

    kr1:<dek_version>:<base64url(nonce || ciphertext || tag)>

- ``dek_version``: decimal, 1 to 2**31-1, no sign or leading zero.
- base64url without padding (RFC 4648 section 5); any other spelling is rejected.
- ``nonce``: 12 random bytes; ``tag``: the 16-byte GCM tag. AES-256-GCM.
- AAD binds the value to where it belongs, each field length-prefixed so that no two
  different triples give the same bytes::

      b"kr1" || u16(len(scope)) || scope || u32(dek_version) || u32(len(context)) || context

  ``context`` names the row (``secret:<name>``, ``settings.api_key:42``): a value copied to
  another scope, row or version does not open.

Parsing is strict: anything malformed raises :class:`MalformedCiphertext`; a well-formed value
that fails authentication raises :class:`DecryptionFailed`. Nothing here ever returns garbage.
"""

from __future__ import annotations

import binascii
import os
import struct
from collections.abc import Sequence
from functools import lru_cache
from typing import NamedTuple

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from keyrotor.errors import DecryptionFailed, InvalidInput, InvalidValue, MalformedCiphertext

PREFIX = "kr1:"
NONCE_BYTES = 12
TAG_BYTES = 16
DEK_BYTES = 32
MAX_VERSION = 2**31 - 1
MAX_SCOPE_BYTES = 255
# A sealed value longer than this is refused before any decoding work (1 MiB of plaintext).
MAX_SEALED_CHARS = 4 * (1_048_576 + NONCE_BYTES + TAG_BYTES) // 3 + 64

# bytes.translate is a C table lookup; str.translate goes through a dict per character and
# costs ~8 us on a 160-character value, more than the AES-GCM decryption itself.
# '-' and '_' become '+' and '/'; the characters base64url never uses ('+', '/', '=') become '!',
# which strict decoding rejects. One pass checks the alphabet and converts it.
_TO_STD = bytes(
    ord("+") if b == ord("-") else ord("/") if b == ord("_") else ord("!") if b in b"+/=" else b
    for b in range(256)
)
_FROM_STD = bytes.maketrans(b"+/", b"-_")
_PAD = (b"", b"", b"==", b"=")
_B64URL = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_"
_B64URL_INDEX = {c: i for i, c in enumerate(_B64URL)}
# By the length of a body modulo 4 (2 or 3), whether a last byte leaves non-zero unused bits:
# the test of _body's canonical check, as a table lookup on the value's bytes.
_NON_CANONICAL: tuple[bytes, ...] = (
    b"",
    b"",
    *(
        bytes(1 if chr(b) in _B64URL_INDEX and _B64URL_INDEX[chr(b)] & mask else 0 for b in range(256))
        for mask in (0x0F, 0x03)
    ),
)
# Version texts seen in practice, parsed once (the strict parser runs for the rest).
_SMALL_VERSIONS = {str(v): v for v in range(1, 10_000)}


class Sealed(NamedTuple):
    """A parsed ``kr1`` value. ``body`` is ``ciphertext || tag``.

    A NamedTuple rather than a frozen dataclass: it is built on every decrypt, and a frozen
    dataclass's ``__init__`` costs more than the AES-GCM call.
    """

    dek_version: int
    nonce: bytes
    body: bytes

    def __repr__(self) -> str:
        return f"Sealed(dek_version={self.dek_version}, body_bytes={len(self.body)})"


def new_dek() -> bytes:
    """Return a fresh random 32-byte DEK."""
    return os.urandom(DEK_BYTES)


_AAD_HEAD = struct.Struct(">3sH").pack
_AAD_MID = struct.Struct(">II").pack


# Memoised: the same (scope, version, context) recurs on every read of a hot key, and the C
# cache hit costs a third of building the bytes again. Bounded, so varied contexts are cheap too.
@lru_cache(maxsize=4096)
def aad(scope: str, dek_version: int, context: str) -> bytes:
    """The AAD a value is bound to (see the module docstring).

    Raises:
        InvalidInput: ``scope`` or ``context`` is not valid Unicode (lone surrogates). The
            message never echoes it (from None: the encoding error holds the text).
    """
    try:
        s = scope.encode()
        c = context.encode()
    except UnicodeEncodeError:
        raise InvalidInput("scope and context must be valid Unicode text (lone surrogates)") from None
    return _AAD_HEAD(b"kr1", len(s)) + s + _AAD_MID(dek_version, len(c)) + c


def split(value: str) -> tuple[int, bytes]:
    """Parse a ``kr1`` value into ``(dek_version, nonce || ciphertext || tag)``.

    Raises:
        MalformedCiphertext: not a canonical ``kr1`` value. The message never echoes the value.
    """
    parsed = split_kr1(value)
    if parsed is None:
        raise MalformedCiphertext("not a kr1 ciphertext")
    return parsed


def split_kr1(value: str) -> tuple[int, bytes] | None:
    """Like :func:`split`, but None for text without the ``kr1:`` prefix (a legacy value, or nothing).

    The hot path of every decrypt: it builds no objects beyond the two it returns, and a value is
    classified (kr1 or not) and parsed in one pass.

    Raises:
        MalformedCiphertext: not text, or a ``kr1:`` value that is not canonical. The message
            never echoes the value.
    """
    if type(value) is not str:
        raise MalformedCiphertext("ciphertext must be text")
    if not value.startswith(PREFIX):
        return None
    if len(value) > MAX_SEALED_CHARS:
        raise MalformedCiphertext("ciphertext is too long")
    version_text, sep, b64 = value[4:].partition(":")
    if not sep:
        raise MalformedCiphertext("kr1 ciphertext has no version field")
    version = _SMALL_VERSIONS.get(version_text) or parse_version(version_text)
    return version, _body(b64)


def _body(b64: str) -> bytes:
    """The bytes of a ``kr1`` value's base64url field, decoded strictly.

    Raises:
        MalformedCiphertext: not canonical base64url, or too short to hold a nonce and a tag.
    """
    rem = len(b64) % 4
    try:
        raw = binascii.a2b_base64(b64.encode("ascii").translate(_TO_STD) + _PAD[rem], strict_mode=True)
    except (UnicodeEncodeError, binascii.Error, ValueError):
        raise MalformedCiphertext("kr1 ciphertext body is not base64url") from None
    if len(raw) < NONCE_BYTES + TAG_BYTES:
        raise MalformedCiphertext("kr1 ciphertext is truncated")
    if rem and _B64URL_INDEX[b64[-1]] & (0x0F if rem == 2 else 0x03):
        # Non-zero unused trailing bits: a second spelling of the same bytes. Refused so that
        # one value has exactly one text.
        raise MalformedCiphertext("kr1 ciphertext body is not canonical base64url")
    return raw


def parse(value: str) -> Sealed:
    """Parse a ``kr1`` value without decrypting it.

    Raises:
        MalformedCiphertext: not a canonical ``kr1`` value. The message never echoes the value.
    """
    version, raw = split(value)
    return Sealed(version, raw[:NONCE_BYTES], raw[NONCE_BYTES:])


def parse_version(text: str) -> int:
    """Parse the decimal DEK version field of a ``kr1`` value strictly."""
    if not (0 < len(text) <= 10 and text.isascii() and text.isdigit() and text[0] != "0"):
        raise MalformedCiphertext("kr1 ciphertext has an invalid version field")
    version = int(text)
    if version > MAX_VERSION:
        raise MalformedCiphertext("kr1 ciphertext has an invalid version field")
    return version


def peek_version(value: str) -> int:
    """Return the DEK version of a ``kr1`` value, checking only the prefix and version.

    Raises:
        MalformedCiphertext: not a ``kr1`` value.
    """
    if not isinstance(value, str) or not value.startswith(PREFIX):
        raise MalformedCiphertext("not a kr1 ciphertext")
    end = value.find(":", 4)  # no copy of the body: a failure event peeks at forged megabytes too
    if end < 0:
        raise MalformedCiphertext("kr1 ciphertext has no version field")
    return parse_version(value[4:end])


def version_or_none(value: object) -> int | None:
    """The DEK version ``value`` names if it reads as a ``kr1`` value (prefix and version), else None."""
    if not isinstance(value, str):
        return None
    try:
        return peek_version(value)
    except MalformedCiphertext:
        return None


def _b64url(raw: bytes) -> str:
    return binascii.b2a_base64(raw, newline=False).translate(_FROM_STD).rstrip(b"=").decode("ascii")


def seal(
    plaintext: bytes,
    *,
    cipher: AESGCM,
    scope: str,
    dek_version: int,
    context: str = "",
    nonce: bytes | None = None,
) -> str:
    """Encrypt one value.

    Args:
        plaintext: the bytes to protect.
        cipher: ``AESGCM(dek)``. Callers keep one per DEK: building it costs more than the
            encryption of a short value.
        scope: the scope the value belongs to (bound as AAD).
        dek_version: the version of the DEK in ``cipher`` (written into the value, bound as AAD).
        context: where the value lives (bound as AAD), e.g. ``secret:openai-prod``.
        nonce: 12 bytes; only tests pass one (a repeated nonce under one key breaks GCM).

    Returns:
        The ``kr1`` text.

    Raises:
        InvalidValue: ``dek_version`` out of range or nonce of the wrong size.
    """
    if not 0 < dek_version <= MAX_VERSION:
        raise InvalidValue(f"DEK version out of range: {dek_version}")
    if nonce is None:
        nonce = os.urandom(NONCE_BYTES)
    elif len(nonce) != NONCE_BYTES:
        raise InvalidValue("nonce must be 12 bytes")
    body = cipher.encrypt(nonce, plaintext, aad(scope, dek_version, context))
    return f"{PREFIX}{dek_version}:{_b64url(nonce + body)}"


def open_raw(raw: bytes, *, cipher: AESGCM, scope: str, dek_version: int, context: str = "") -> bytes:
    """Decrypt the body :func:`split` returned. The decrypt hot path.

    Raises:
        DecryptionFailed: wrong DEK, wrong scope or context, or tampered.
    """
    try:
        return cipher.decrypt(raw[:NONCE_BYTES], raw[NONCE_BYTES:], aad(scope, dek_version, context))
    except InvalidTag:
        raise authentication_failed(dek_version) from None


def open_text(raw: bytes, cipher: AESGCM, scope: str, dek_version: int, context: str) -> str:
    """Decrypt the body :func:`split` returned to text. The decrypt hot path: positional arguments.

    Raises:
        DecryptionFailed: wrong DEK, wrong scope or context, tampered, or not UTF-8.
    """
    try:
        data = cipher.decrypt(raw[:NONCE_BYTES], raw[NONCE_BYTES:], aad(scope, dek_version, context))
    except InvalidTag:
        raise authentication_failed(dek_version) from None
    try:
        return data.decode()
    except UnicodeDecodeError:
        # The error holds the plaintext bytes (.object): raised after this block, not in it, so
        # that it is not kept as the new error's __context__ (``from None`` only hides that).
        pass
    raise DecryptionFailed("decrypted value is not valid UTF-8")


def authentication_failed(dek_version: int) -> DecryptionFailed:
    """The error for a value that fails AES-GCM authentication (it names the version only)."""
    return DecryptionFailed(
        f"kr1 value (DEK v{dek_version}) failed authentication: wrong scope or context, or tampered"
    )


def unseal(sealed: Sealed, *, cipher: AESGCM, scope: str, context: str = "") -> bytes:
    """Decrypt a parsed value with the DEK of its version.

    Raises:
        DecryptionFailed: wrong DEK, wrong scope or context, or tampered. The message names
            the version only.
    """
    try:
        return cipher.decrypt(sealed.nonce, sealed.body, aad(scope, sealed.dek_version, context))
    except InvalidTag:
        raise authentication_failed(sealed.dek_version) from None


_U32 = struct.Struct(">I").pack
# Nonces drawn from the OS at once: one getrandom call for this many values instead of one each.
_NONCE_POOL = 256


class Resealer:
    """Seals values of one (scope, DEK version) again under another version, many in a row.

    What :func:`split`, :func:`open_raw`, :func:`seal` and a verifying :func:`open_raw` of the
    new text do for one value, with the per-value work of a batch taken out of the loop: the
    AAD's scope-and-version head is built once per version (only the context part is per value,
    the same bytes :func:`aad` gives, not memoised: a batch's contexts never repeat), and nonces
    are drawn from the OS a pool at a time. The new text is parsed again as a decrypt would and
    opened with the new DEK before it is returned: a value that does not verify is never
    returned.
    """

    __slots__ = (
        "_new",
        "_new_head",
        "_nonces",
        "_old",
        "_old_head",
        "_old_prefix",
        "_prefix",
        "failed_at",
        "old_version",
        "scope",
    )

    def __init__(self, *, scope: str, old: AESGCM, old_version: int, new: AESGCM, new_version: int) -> None:
        for version in (old_version, new_version):
            if not 0 < version <= MAX_VERSION:
                raise InvalidValue(f"DEK version out of range: {version}")
        s = scope.encode()
        head = _AAD_HEAD(b"kr1", len(s)) + s
        self.scope = scope
        self.old_version = old_version
        self._old, self._old_head = old, head + _U32(old_version)
        self._new, self._new_head = new, head + _U32(new_version)
        self._prefix = f"{PREFIX}{new_version}:"
        self._old_prefix = f"{PREFIX}{old_version}:"
        self._nonces: list[bytes] = []
        # The index in its batch of the value the last reseal_all failed on, or None.
        self.failed_at: int | None = None

    def _nonce(self) -> bytes:
        if not self._nonces:
            pool = os.urandom(NONCE_BYTES * _NONCE_POOL)
            self._nonces = [pool[i : i + NONCE_BYTES] for i in range(0, len(pool), NONCE_BYTES)]
        return self._nonces.pop()

    def reseal(self, value: str, context: str) -> str:
        """``value`` (sealed under the old version for ``context``) sealed under the new one.

        Raises:
            MalformedCiphertext: ``value`` is not a canonical ``kr1`` value.
            DecryptionFailed: ``value`` names another version or fails authentication, or the
                new value did not open to the same bytes.
        """
        found, raw = split(value)
        if found != self.old_version:
            raise DecryptionFailed(f"the row says DEK v{self.old_version} but its value says v{found}")
        c = context.encode()
        tail = _U32(len(c)) + c
        try:
            plaintext = self._old.decrypt(raw[:NONCE_BYTES], raw[NONCE_BYTES:], self._old_head + tail)
        except InvalidTag:
            raise authentication_failed(self.old_version) from None
        nonce = self._nonce()
        new_aad = self._new_head + tail
        sealed = self._prefix + _b64url(nonce + self._new.encrypt(nonce, plaintext, new_aad))
        _, new_raw = split(sealed)
        try:
            reopened = self._new.decrypt(new_raw[:NONCE_BYTES], new_raw[NONCE_BYTES:], new_aad)
        except InvalidTag:
            raise DecryptionFailed("the re-encrypted value did not verify") from None
        if reopened != plaintext:
            raise DecryptionFailed("the re-encrypted value did not verify")
        return sealed

    def reseal_all(self, values: Sequence[str], contexts: Sequence[str]) -> list[str]:
        """Every one of ``values`` (each sealed under the old version for the matching context)
        sealed under the new one, in order: :meth:`reseal` of each pair, for a whole batch.

        The version field is checked as part of one prefix string (a canonical value of the old
        version starts with exactly ``kr1:<old>:``), the nonces come from one draw of the OS for
        the batch, and one loop does the per-value work, the strict reading of :func:`split`
        written out in it. Each new value's base64url bytes (the text after the prefix the
        resealer writes) are read back as a decrypt reads them and opened with the new DEK.

        Raises:
            MalformedCiphertext, DecryptionFailed: as :meth:`reseal` raises for the first value
                that fails (its index in ``failed_at``); nothing is returned then.
        """
        self.failed_at = None
        old_prefix, skip, max_chars = self._old_prefix, len(self._old_prefix), MAX_SEALED_CHARS
        prefix, max_body = self._prefix, MAX_SEALED_CHARS - len(self._prefix)
        old_head, new_head = self._old_head, self._new_head
        old_decrypt, new_encrypt, new_decrypt = self._old.decrypt, self._new.encrypt, self._new.decrypt
        a2b, b2a, u32 = binascii.a2b_base64, binascii.b2a_base64, _U32
        to_std, from_std, pad, non_canonical = _TO_STD, _FROM_STD, _PAD, _NON_CANONICAL
        pool = os.urandom(NONCE_BYTES * len(values))
        out: list[str] = []
        append = out.append
        for i, (value, context) in enumerate(zip(values, contexts, strict=True)):
            c = context.encode()
            tail = u32(len(c)) + c
            try:
                if type(value) is not str or not value.startswith(old_prefix) or len(value) > max_chars:
                    raise MalformedCiphertext
                # What _body does: strict base64url, long enough, canonical trailing bits.
                b64 = value[skip:].encode("ascii")
                rem = len(b64) & 3
                raw = a2b(b64.translate(to_std) + pad[rem], strict_mode=True)
                if len(raw) < NONCE_BYTES + TAG_BYTES or (rem and non_canonical[rem][b64[-1]]):
                    raise MalformedCiphertext
                plaintext = old_decrypt(raw[:NONCE_BYTES], raw[NONCE_BYTES:], old_head + tail)
            except (MalformedCiphertext, InvalidTag, UnicodeEncodeError, binascii.Error, ValueError):
                append(self._reseal_failed(i, value, context))
                continue
            nonce = pool[i * NONCE_BYTES : (i + 1) * NONCE_BYTES]
            new_aad = new_head + tail
            # The new text is the prefix and exactly these ASCII bytes: reading them back is
            # reading back the value written.
            sealed = nonce + new_encrypt(nonce, plaintext, new_aad)
            body = b2a(sealed, newline=False).translate(from_std).rstrip(b"=")
            try:
                rem = len(body) & 3
                if len(body) > max_body or (rem and non_canonical[rem][body[-1]]):
                    raise MalformedCiphertext
                new_raw = a2b(body.translate(to_std) + pad[rem], strict_mode=True)
                reopened = new_decrypt(new_raw[:NONCE_BYTES], new_raw[NONCE_BYTES:], new_aad)
            except (MalformedCiphertext, InvalidTag, binascii.Error, ValueError):
                raise self._unverified(i) from None
            if reopened != plaintext:
                raise self._unverified(i)
            append(prefix + body.decode("ascii"))
        return out

    def _reseal_failed(self, i: int, value: str, context: str) -> str:
        """The value at index ``i`` of a batch through the single-value path, whose error names
        what is wrong with it (malformed, another version, tampered)."""
        self.failed_at = i
        sealed = self.reseal(value, context)
        self.failed_at = None
        return sealed

    def _unverified(self, i: int) -> DecryptionFailed:
        self.failed_at = i
        return DecryptionFailed("the re-encrypted value did not verify")
