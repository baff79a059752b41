"""SQL identifiers from configuration (registered tables and columns): validated, then quoted.

Statements name application tables and columns that an operator registered; those names are
checked against a plain-identifier pattern before they reach any statement, so no registration
can inject SQL.
"""

from __future__ import annotations

import re

from keyrotor.errors import ConfigurationError

_IDENT = re.compile(r"[A-Za-z_][A-Za-z0-9_]{0,62}")


def quote_ident(name: str) -> str:
    """``name`` (``column``, ``table`` or ``schema.table``) as a quoted SQL identifier.

    Raises:
        ConfigurationError: not one or two plain identifiers joined by a dot.
    """
    parts = name.split(".")
    if not 1 <= len(parts) <= 2 or not all(_IDENT.fullmatch(p) for p in parts):
        raise ConfigurationError(f"not a plain SQL identifier: {name[:80]!r}")
    return ".".join(f'"{p}"' for p in parts)
