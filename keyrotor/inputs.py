"""Checks of what callers hand to KeyManager: values, contexts and secret names.

Each refusal is a typed error whose message never echoes the value.
"""

from __future__ import annotations

from keyrotor.errors import InvalidInput, InvalidValue

MAX_CONTEXT_CHARS = 1024
MAX_NAME_CHARS = 200


def value_bytes(plaintext: str, max_bytes: int) -> bytes:
    """``plaintext`` as UTF-8: non-empty text of at most ``max_bytes`` (``KEYROTOR_MAX_VALUE_BYTES``).

    Raises:
        InvalidValue: not text, empty, lone surrogates, or too large.
    """
    if not isinstance(plaintext, str):
        raise InvalidValue("value must be text (str)")
    if not plaintext:
        raise InvalidValue("value is empty")
    try:
        data = plaintext.encode()
    except UnicodeEncodeError:
        raise InvalidValue("value is not valid Unicode (lone surrogates)") from None
    if len(data) > max_bytes:
        raise InvalidValue(
            f"value is too large ({len(data)} bytes; limit {max_bytes}, KEYROTOR_MAX_VALUE_BYTES)"
        )
    return data


def check_context(context: str) -> None:
    """Refuse a context that is not text of at most :data:`MAX_CONTEXT_CHARS` characters."""
    if not isinstance(context, str) or len(context) > MAX_CONTEXT_CHARS:
        raise InvalidInput(f"context must be text of at most {MAX_CONTEXT_CHARS} characters")


def check_name(name: str) -> None:
    """Refuse a secret name that is not 1-200 printable characters without surrounding spaces."""
    if (
        not isinstance(name, str)
        or not name
        or len(name) > MAX_NAME_CHARS
        or not name.isprintable()
        or name != name.strip()
    ):
        raise InvalidInput(
            f"secret names are 1-{MAX_NAME_CHARS} printable characters without surrounding spaces"
        )
