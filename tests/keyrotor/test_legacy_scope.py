"""Pure parts of the legacy binding and of lock-down: the key a context names, ``--grant`` parsing."""

from __future__ import annotations

import pytest

from keyrotor.audit.lockdown import NamedGrant, parse_grant
from keyrotor.errors import InvalidInput
from keyrotor.legacy.scope import key_in_context


@pytest.mark.parametrize(
    ("template", "context", "key"),
    [
        ("settings.api_key:{pk}", "settings.api_key:42", "42"),
        ("settings.api_key:{pk}", "settings.api_key:cus:é1", "cus:é1"),  # a text key with ':'
        ("t.c:{pk}:v2", "t.c:a:b:v2", "a:b"),
        ("row/{pk}/x:{pk}", "row/7/x:7", "7"),  # every placeholder names the same key
        ("row/{pk}/x:{pk}", "row/7/x:8", None),
        ("settings.api_key:{pk}", "other.api_key:42", None),
        ("settings.api_key:{pk}", "", None),
        ("fixed", "fixed", None),  # no key in the template: no row to look up
    ],
)
def test_key_in_context(template: str, context: str, key: str | None) -> None:
    assert key_in_context(template, context) == key


def test_parse_grant() -> None:
    assert parse_grant("api:tenant-42/*:decrypt,encrypt") == NamedGrant("api", "tenant-42/*", True, True)
    assert parse_grant("user:42:*:decrypt") == NamedGrant("user:42", "*", False, True)
    assert parse_grant("w:openai:encrypt") == NamedGrant("w", "openai", True, False)
    for bad in (
        "api",
        "api:openai",
        "*:*:decrypt",
        "api:openai:read",
        "api:Bad Scope:decrypt",
        ":openai:decrypt",
    ):
        with pytest.raises(InvalidInput):
            parse_grant(bad)
