"""The old Node backend's values: their format (re-exported from :mod:`keyrotor.crypto.legacy_format`,
so ``keyrotor.legacy.decrypt`` keeps working), which scope they belong to, what decrypting them may
cost, and their online migration to ``kr1``.
"""

from keyrotor.crypto.legacy_format import (
    MAX_VALUE_CHARS,
    decrypt,
    decrypt_async,
    decrypt_dek,
    decrypt_many,
    encrypt,
    is_legacy,
)

__all__ = [
    "MAX_VALUE_CHARS",
    "decrypt",
    "decrypt_async",
    "decrypt_dek",
    "decrypt_many",
    "encrypt",
    "is_legacy",
]
