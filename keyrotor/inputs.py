"""Checks of what callers hand to keyrotor: scope names, values, contexts and secret names.

Each refusal is a typed error whose message never echoes the value.
"""

from __future__ import annotations

import re

from keyrotor.errors import InvalidInput, InvalidScope, InvalidValue

MAX_CONTEXT_CHARS = 1024
MAX_NAME_CHARS = 200
_SCOPE_RE = re.compile(
    r"[a-z0-9](?:[a-z0-9._-]{0,62}[a-z0-9])?(?:/[a-z0-9](?:[a-z0-9._-]{0,62}[a-z0-9])?){0,3}"
)
MAX_SCOPE_CHARS = 200


def check_scope(scope: str) -> str:
    """Validate a scope name and return it.

    A scope is 1-4 segments separated by ``/``; each segment is lower-case letters, digits,
    ``.``, ``_`` and ``-``, starting and ending with a letter or digit.

    Raises:
        InvalidScope: anything else (the message quotes a sanitised version only).
    """
    if not isinstance(scope, str) or len(scope) > MAX_SCOPE_CHARS or not _SCOPE_RE.fullmatch(scope):
        shown = scope[:40].encode("ascii", "backslashreplace").decode() if isinstance(scope, str) else "?"
        raise InvalidScope(
            f"invalid scope name {shown!r}: use lower-case letters, digits, '.', '_', '-' "
            "and up to 4 '/'-separated segments, like 'anthropic' or 'tenant-42/openai'"
        )
    return scope


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
