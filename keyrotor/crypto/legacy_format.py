"""The old Node backend's first-phase ciphertext ("legacy" values).

keyrotor reads these to migrate them to ``kr1:`` envelope values, and writes them only for
tests. A legacy value is the standard base64 text (RFC 4648 alphabet, ``=`` padding, no line
breaks), as Node's ``Buffer.toString("base64")`` writes it, of these bytes::

    offset  length  field
    0       32      salt   random per value; the scrypt salt
    32      16      iv     random per value; the AES-GCM IV (16 bytes, not GCM's usual 12)
    48      16      tag    the GCM authentication tag
    64      n       data   the ciphertext; n is the length of the UTF-8 plaintext (may be 0)

    key   = scrypt(ENCRYPTION_KEY as UTF-8, salt, N=16384, r=8, p=1, dklen=32)
    data, tag = AES-256-GCM(key, iv, plaintext as UTF-8), no AAD

So 64 bytes (88 characters) is the shortest value: an empty plaintext. A 108-character
Anthropic key gives 232 characters. The old service's second phase wrapped its DEKs the same
way around the base64 text of the 32-byte DEK, which gives 144 characters
(:func:`decrypt_dek`); values its second phase sealed directly with such a DEK open with
:func:`open_second_phase` (no scrypt).

Every value costs one scrypt (~30-60 ms of CPU and 16 MiB of memory), since each has its own
salt. :func:`is_legacy` never runs it; :func:`decrypt_async` runs it off the event loop and
:func:`decrypt_many` is the bulk entry point for a process or thread pool worker.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import concurrent.futures
import os
from collections.abc import Iterable

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.scrypt import Scrypt

from keyrotor.errors import DecryptionFailed, InvalidValue, MalformedCiphertext, WeakKeyError

__all__ = [
    "MAX_VALUE_CHARS",
    "decrypt",
    "decrypt_async",
    "decrypt_dek",
    "decrypt_many",
    "decrypt_parsed",
    "encrypt",
    "is_legacy",
    "parse",
]

SALT_LEN = 32
IV_LEN = 16
TAG_LEN = 16
HEADER_LEN = SALT_LEN + IV_LEN + TAG_LEN  # 64: the decoded length of an empty plaintext's value
DEK_LEN = 32

SCRYPT_N = 16384
SCRYPT_R = 8
SCRYPT_P = 1
KEY_LEN = 32

MAX_VALUE_CHARS = 1 << 20
"""Longest legacy value accepted (1 MiB of base64 text); longer ones are rejected unparsed."""

# The longest plaintext (UTF-8 bytes) whose value still fits in MAX_VALUE_CHARS, so that every
# value encrypt() returns is one decrypt() accepts.
_MAX_PLAINTEXT_BYTES = MAX_VALUE_CHARS // 4 * 3 - HEADER_LEN

_KR1_PREFIX = "kr1:"
_AUTH_FAILED = "legacy value failed authentication: wrong ENCRYPTION_KEY or tampered"

# scrypt releases the GIL (cryptography's Scrypt, used here as it does not depend on how CPython's
# OpenSSL was built, as well as hashlib.scrypt), so a thread pool keeps it off the event loop and
# uses every core; decrypt_many() also works in a process pool, for a migration that wants one.


def decrypt(blob: str, master_key: str) -> str:
    """Decrypt one legacy value.

    Args:
        blob: the stored value: standard base64 of ``salt || iv || tag || data``.
        master_key: the old backend's ``ENCRYPTION_KEY``.

    Returns:
        The plaintext.

    Raises:
        WeakKeyError: ``master_key`` is empty, blank or not a string.
        MalformedCiphertext: ``blob`` is not a legacy value (not canonical base64, shorter
            than 64 bytes, longer than :data:`MAX_VALUE_CHARS`, NUL characters, a ``kr1:``
            value). No scrypt is run for it.
        DecryptionFailed: the value failed authentication (wrong master key, or tampered),
            or it decrypted to bytes that are not valid UTF-8.
    """
    password = _password(master_key)
    return _text(_open(parse(blob), password))


def decrypt_parsed(raw: bytes, master_key: str) -> str:
    """Decrypt the bytes :func:`parse` returned for a legacy value (no second parse).

    Raises:
        WeakKeyError, DecryptionFailed: as :func:`decrypt`.
    """
    return _text(_open(raw, _password(master_key)))


def decrypt_dek(blob: str, master_key: str) -> bytes:
    """Decrypt one legacy wrapped DEK (the 144-character values of the old second phase).

    Args:
        blob: the stored ``encrypted_dek``: a legacy value around the base64 text of the DEK.
        master_key: the old backend's ``ENCRYPTION_KEY``.

    Returns:
        The 32-byte DEK.

    Raises:
        WeakKeyError: ``master_key`` is empty, blank or not a string.
        MalformedCiphertext: ``blob`` is not a legacy value.
        DecryptionFailed: the value failed authentication, or what it holds is not the
            canonical base64 text of exactly 32 bytes.
    """
    text = decrypt(blob, master_key)
    try:
        dek = _strict_b64decode(text)
    except ValueError as exc:  # binascii.Error names the problem, never the data
        raise DecryptionFailed("legacy wrapped DEK decrypted, but it is not base64 text") from exc
    if len(dek) != DEK_LEN:
        raise DecryptionFailed(f"legacy wrapped DEK decrypted to {len(dek)} bytes, expected {DEK_LEN}")
    return dek


def encrypt(plaintext: str, master_key: str) -> str:
    """Encrypt a value the way the old Node backend did (for tests and migration checks).

    Args:
        plaintext: the text to encrypt; may be empty.
        master_key: the ``ENCRYPTION_KEY`` to derive the key from.

    Returns:
        A legacy value, with a fresh random salt and IV.

    Raises:
        WeakKeyError: ``master_key`` is empty, blank or not a string.
        InvalidValue: ``plaintext`` is not a string, is not encodable as UTF-8 (lone
            surrogates), or is too long for a value of :data:`MAX_VALUE_CHARS`.
    """
    return _encrypt_from_parts(plaintext, master_key, os.urandom(SALT_LEN), os.urandom(IV_LEN))


def is_legacy(value: str) -> bool:
    """Tell whether a stored value looks like a legacy value, without decrypting it.

    This is cheap (no scrypt) and strict: it accepts exactly what :func:`decrypt` parses,
    canonical standard base64 that decodes to at least 64 bytes (salt, IV and tag). It says
    nothing about whether the value authenticates.

    Args:
        value: any stored value, e.g. a column that holds legacy and ``kr1:`` values.

    Returns:
        True if ``value`` is shaped like a legacy value; False otherwise, including for
        ``kr1:`` values and anything that is not a string. It never raises.
    """
    try:
        parse(value)
    except MalformedCiphertext:
        return False
    return True


async def decrypt_async(
    blob: str,
    master_key: str,
    *,
    executor: concurrent.futures.Executor | None = None,
) -> str:
    """Decrypt one legacy value without blocking the event loop.

    scrypt takes tens of milliseconds of CPU, so it runs in ``executor`` (the loop's default
    thread pool if None). scrypt releases the GIL, so threads run it in parallel. If the
    awaiting task is cancelled, the derivation still finishes in its thread; the result is
    dropped.

    Args:
        blob: the stored legacy value.
        master_key: the old backend's ``ENCRYPTION_KEY``.
        executor: where to run it; a thread or process pool. None means the loop's default.

    Returns:
        The plaintext, as :func:`decrypt` returns it.

    Raises:
        The errors of :func:`decrypt`.
    """
    loop = asyncio.get_running_loop()
    return await loop.run_in_executor(executor, decrypt, blob, master_key)


def decrypt_many(blobs: Iterable[str], master_key: str) -> list[str | DecryptionFailed]:
    """Decrypt a batch of legacy values, one result a value, for bulk migration.

    A top-level function, so it pickles: submit it to a ``ProcessPoolExecutor`` (or a thread
    pool) with a chunk of values. One bad value does not fail the batch: its place in the
    result holds the error instead (the errors pickle; their chained causes do not travel).

    Args:
        blobs: the stored legacy values.
        master_key: the old backend's ``ENCRYPTION_KEY``.

    Returns:
        For each value in order, its plaintext or the :class:`DecryptionFailed` (or
        :class:`MalformedCiphertext`) that :func:`decrypt` raised for it.

    Raises:
        WeakKeyError: ``master_key`` is empty, blank or not a string; it would fail every
            value, so it fails the batch.
    """
    _password(master_key)
    results: list[str | DecryptionFailed] = []
    for blob in blobs:
        try:
            results.append(decrypt(blob, master_key))
        except DecryptionFailed as exc:
            results.append(exc)
    return results


def parse(blob: str) -> bytes:
    """Check the shape of a legacy value, cheaply (no scrypt), and return its decoded bytes.

    Raises:
        MalformedCiphertext: not a legacy value (see :func:`decrypt`). The message never
            echoes the value.
    """
    if not isinstance(blob, str):
        raise MalformedCiphertext(f"legacy value must be str, not {type(blob).__name__}")
    # Length first, so an oversized value costs nothing more.
    if len(blob) > MAX_VALUE_CHARS:
        raise MalformedCiphertext(
            f"legacy value is too long: {len(blob)} characters, limit {MAX_VALUE_CHARS}"
        )
    if blob.startswith(_KR1_PREFIX):
        raise MalformedCiphertext("value is a kr1 envelope ciphertext, not a legacy value")
    if "\x00" in blob:
        raise MalformedCiphertext("legacy value contains NUL characters")
    try:
        raw = _strict_b64decode(blob)
    except ValueError as exc:  # binascii.Error names the problem, never the data
        raise MalformedCiphertext("legacy value is not canonical standard base64") from exc
    if len(raw) < HEADER_LEN:
        raise MalformedCiphertext(
            f"legacy value is too short: {len(raw)} bytes, need at least {HEADER_LEN} (salt, IV, tag)"
        )
    return raw


# --- private ------------------------------------------------------------------------------


def _encrypt_from_parts(plaintext: str, master_key: str, salt: bytes, iv: bytes) -> str:
    if not isinstance(plaintext, str):
        raise InvalidValue(f"legacy plaintext must be str, not {type(plaintext).__name__}")
    try:
        data = plaintext.encode("utf-8")
    except UnicodeEncodeError:
        # The error holds the plaintext (.object): raised after this block, not in it, so that it
        # is not kept as the new error's __context__ (``from None`` only hides that).
        data = None
    if data is None:
        raise InvalidValue("legacy plaintext is not valid Unicode text (lone surrogates)")
    return _seal(data, master_key, salt, iv)


def _seal(data: bytes, master_key: str, salt: bytes, iv: bytes) -> str:
    password = _password(master_key)
    if len(salt) != SALT_LEN or len(iv) != IV_LEN:
        raise InvalidValue(f"legacy salt and IV must be {SALT_LEN} and {IV_LEN} bytes")
    if len(data) > _MAX_PLAINTEXT_BYTES:
        raise InvalidValue(f"legacy plaintext is too long: {len(data)} bytes, limit {_MAX_PLAINTEXT_BYTES}")
    sealed = AESGCM(_derive_key(password, salt)).encrypt(iv, data, None)  # data || tag
    ciphertext, tag = sealed[:-TAG_LEN], sealed[-TAG_LEN:]
    return base64.b64encode(salt + iv + tag + ciphertext).decode("ascii")


def _text(plaintext: bytes) -> str:
    try:
        return plaintext.decode("utf-8")
    except UnicodeDecodeError:
        # The error holds the whole plaintext (.object) and prints a byte of it: raised after
        # this block, not in it, so that it is not kept as the new error's __context__ (``from
        # None`` only hides that).
        pass
    raise DecryptionFailed("legacy value decrypted, but its plaintext is not valid UTF-8")


def _open(raw: bytes, password: bytes) -> bytes:
    salt = raw[:SALT_LEN]
    iv = raw[SALT_LEN : SALT_LEN + IV_LEN]
    tag = raw[SALT_LEN + IV_LEN : HEADER_LEN]
    ciphertext = raw[HEADER_LEN:]
    try:
        return AESGCM(_derive_key(password, salt)).decrypt(iv, ciphertext + tag, None)
    except InvalidTag as exc:  # carries nothing secret
        raise DecryptionFailed(_AUTH_FAILED) from exc


def _derive_key(password: bytes, salt: bytes) -> bytes:
    return Scrypt(salt=salt, length=KEY_LEN, n=SCRYPT_N, r=SCRYPT_R, p=SCRYPT_P).derive(password)


def _password(master_key: str) -> bytes:
    if not isinstance(master_key, str) or not master_key.strip():
        raise WeakKeyError("legacy master key (ENCRYPTION_KEY) is missing or empty")
    try:
        return master_key.encode("utf-8")  # as Node's scryptSync does with a string
    except UnicodeEncodeError:
        # from None: the UnicodeEncodeError holds the key (.object).
        raise WeakKeyError("legacy master key (ENCRYPTION_KEY) is not valid Unicode text") from None


# The old backend's second phase: values sealed directly with one of its DEKs.
SECOND_PHASE_IV = 16
SECOND_PHASE_TAG = 16


def open_second_phase(blob: str, cipher: AESGCM) -> bytes:
    """The plaintext bytes of a value the old backend's second phase sealed with ``cipher``'s DEK.

    ASSUMPTION (not covered by the shared vectors, which only hold a second-phase *wrapped DEK*):
    the old second phase stored ``base64(iv(16) || tag(16) || data)``, AES-256-GCM under the
    DEK with a 16-byte IV and no AAD -- the first phase's layout without the salt, as its DEKs
    were wrapped. GCM authentication makes a wrong guess fail loudly, never return garbage.

    Raises:
        MalformedCiphertext: not base64 of at least 32 bytes.
        DecryptionFailed: failed authentication under this DEK.
    """
    try:
        raw = _strict_b64decode(blob)
    except ValueError as exc:
        raise MalformedCiphertext("second-phase value is not canonical base64") from exc
    if len(raw) < SECOND_PHASE_IV + SECOND_PHASE_TAG:
        raise MalformedCiphertext("second-phase value is too short")
    iv, tag = raw[:SECOND_PHASE_IV], raw[SECOND_PHASE_IV : SECOND_PHASE_IV + SECOND_PHASE_TAG]
    data = raw[SECOND_PHASE_IV + SECOND_PHASE_TAG :]
    try:
        return cipher.decrypt(iv, data + tag, None)
    except InvalidTag as exc:
        raise DecryptionFailed("second-phase value failed authentication under this DEK") from exc


def sealed_by(blob: str, cipher: AESGCM) -> bool:
    """Whether ``blob`` is a second-phase value of ``cipher``'s DEK (AES only, no scrypt)."""
    try:
        open_second_phase(blob, cipher)
    except (MalformedCiphertext, DecryptionFailed):
        return False
    return True


def _strict_b64decode(text: str) -> bytes:
    """Decode canonical standard base64 only: padded, no whitespace, zero trailing bits.

    Raises ValueError (binascii.Error) for anything else.
    """
    if not text.isascii():
        raise binascii.Error("non-ASCII characters")
    raw = base64.b64decode(text, validate=True)
    # validate=True still accepts non-zero trailing bits ("QR==" and "QQ==" both give b"A");
    # encoding back rejects them, and so any second spelling of the same bytes.
    if base64.b64encode(raw).decode("ascii") != text:
        raise binascii.Error("not canonical base64")
    return raw
