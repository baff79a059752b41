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
        InvalidScope: anything else. The message says what is wrong and where, never the text:
            what arrives in a scope field may be a key pasted into the wrong one, and the
            message reaches HTTP answers, logs and the audit log.
    """
    if not isinstance(scope, str) or len(scope) > MAX_SCOPE_CHARS or not _SCOPE_RE.fullmatch(scope):
        raise InvalidScope(
            f"invalid scope name ({scope_fault(scope)}): use lower-case letters, digits, '.', '_', '-' "
            "and up to 4 '/'-separated segments, like 'anthropic' or 'tenant-42/openai'"
        )
    return scope


_SCOPE_CHARS = frozenset("abcdefghijklmnopqrstuvwxyz0123456789._-/")
_SEGMENT_EDGE = frozenset("abcdefghijklmnopqrstuvwxyz0123456789")
_SEGMENT_CHARS = 64


def _char_kind(c: str) -> str:
    """A character named by its kind, not by itself (a letter or digit of a key is never shown)."""
    if c.isupper():
        return "an upper-case letter"
    if c.isspace():
        return "a space" if c == " " else "a whitespace character"
    if not c.isascii():
        return "a non-ASCII character"
    if not c.isprintable():
        return "a control character"
    if c.isalnum():
        return "a letter or digit"
    return f"{c!r}"  # ASCII punctuation: one such character says nothing about a key


def scope_fault(scope: object) -> str:
    """What makes ``scope`` not a scope name, with positions (1-based) but none of its text."""
    if not isinstance(scope, str):
        return "not text"
    if not scope:
        return "empty"
    if len(scope) > MAX_SCOPE_CHARS:
        return f"{len(scope)} characters; at most {MAX_SCOPE_CHARS}"
    for i, c in enumerate(scope, 1):
        if c not in _SCOPE_CHARS:
            return f"{_char_kind(c)} at position {i} of {len(scope)}"
    segments = scope.split("/")
    if len(segments) > 4:
        return f"{len(segments)} segments; at most 4"
    for n, seg in enumerate(segments, 1):
        if not seg:
            return f"segment {n} of {len(segments)} is empty"
        if len(seg) > _SEGMENT_CHARS:
            return f"segment {n} has {len(seg)} characters; at most {_SEGMENT_CHARS}"
        if seg[0] not in _SEGMENT_EDGE or seg[-1] not in _SEGMENT_EDGE:
            return f"segment {n} starts or ends with '.', '_' or '-'"
    return "not a scope name"


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
        # The error holds the whole value (.object): raised after this block, not in it, so that
        # it is not kept as the new error's __context__ (``from None`` only hides that).
        data = None
    if data is None:
        raise InvalidValue("value is not valid Unicode (lone surrogates)")
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
    """Refuse a secret name that is not 1-200 printable characters without surrounding spaces.

    This is the check of a name read; a name stored must also pass :func:`check_new_name`.
    """
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


# A path segment of "." or ".." (or its %2E form) is removed by URL parsers and proxies before
# a request arrives, so a secret of such a name could never be reached over HTTP.
_DOT_SEGMENTS = frozenset({".", ".."})


def check_new_name(name: str) -> None:
    """Refuse a name to store a secret under: :func:`check_name`, and not ``.`` or ``..``.

    Names stored before this rule still read (``check_name`` alone), so no value is stranded.
    """
    check_name(name)
    if name in _DOT_SEGMENTS:
        raise InvalidInput("secret names '.' and '..' are refused: a URL path cannot carry them")
