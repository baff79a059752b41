"""Which locations a context template covers: the pure half of the census proof."""

from __future__ import annotations

import pytest

from keyrotor.census.locations import (
    ACKNOWLEDGED,
    COVERED_BY_COLUMN,
    COVERED_BY_KEYROTOR,
    EVERY_SCOPE,
    UNRECORDED,
    UNREGISTERED,
    Cover,
    classify,
    location_of,
    second_phase_location,
    template_covers,
)
from keyrotor.store.key_ranges import INTEGER_KEY, UUID_KEY


@pytest.mark.parametrize(
    ("context", "location"),
    [
        ("users.api_key:42", "users.api_key"),
        ("settings.api_key:a:b", "settings.api_key:a"),
        ("plain", "plain"),
        ("", ""),
        ("secret:prod", "secret"),
    ],
)
def test_location_is_the_context_up_to_its_last_colon(context: str, location: str) -> None:
    assert location_of(context) == location


@pytest.mark.parametrize(
    ("template", "keys"),
    [
        ("settings.api_key:{pk}", ["1", "a:b", "é:ü:x", "", "550e8400-e29b-41d4-a716-446655440000"]),
        ("tenant:{pk}:apikey", ["7", "x:y"]),
        ("{pk}", ["users.api_key:9", "free"]),
        ("fixed", [""]),
        ("a:{pk}:b:{pk}", ["1", "q:r"]),
    ],
)
def test_a_template_covers_the_location_of_every_context_it_makes(template: str, keys: list[str]) -> None:
    for key in keys:
        context = template.replace("{pk}", key)
        assert template_covers(template, location_of(context)), (template, key)


@pytest.mark.parametrize(
    ("template", "location"),
    [
        ("settings.api_key:{pk}", "settings"),
        ("settings.api_key:{pk}", "users.api_key"),
        ("settings.api_key:{pk}", ""),
        ("tenant:{pk}:apikey", "other:1"),
        ("fixed", "other"),
    ],
)
def test_a_template_covers_nothing_else(template: str, location: str) -> None:
    assert not template_covers(template, location)


def test_classify_orders_keyrotor_column_acknowledged_unregistered() -> None:
    covers = [Cover("users.api_key:{pk}", "anthropic", "users.api_key")]
    assert classify("anthropic", "secret", covers, []) == (COVERED_BY_KEYROTOR, "secrets")
    assert classify("anthropic", "users.api_key", covers, []) == (COVERED_BY_COLUMN, "users.api_key")
    # A fixed-scope column covers only its scope.
    assert classify("openai", "users.api_key", covers, [])[0] == UNREGISTERED
    assert classify("openai", "users.api_key", covers, [("users.api_key", "openai")])[0] == ACKNOWLEDGED
    assert classify("openai", "users.api_key", covers, [("users.api_key", EVERY_SCOPE)])[0] == ACKNOWLEDGED
    # An acknowledgement for another scope covers nothing of this one.
    assert classify("openai", "users.api_key", covers, [("users.api_key", "mistral")])[0] == UNREGISTERED
    assert classify("anthropic", "", covers, [])[0] == UNREGISTERED
    # Values written before locations were recorded are never proven covered by a template.
    assert classify("anthropic", UNRECORDED, [Cover("{pk}", None, "x")], [])[0] == UNREGISTERED
    assert classify("anthropic", UNRECORDED, covers, [(UNRECORDED, EVERY_SCOPE)])[0] == ACKNOWLEDGED
    # Nor are an imported DEK's values (the old backend's, in any table), each DEK on its own.
    second = second_phase_location("anthropic", 2)
    assert second == "(second phase: anthropic v2)"
    assert classify("anthropic", second, [Cover("{pk}", None, "x")], [])[0] == UNREGISTERED
    third = second_phase_location("anthropic", 3)
    assert classify("anthropic", second, covers, [(third, "anthropic")])[0] == UNREGISTERED
    assert classify("anthropic", second, covers, [(second, "anthropic")])[0] == ACKNOWLEDGED


_INT = INTEGER_KEY.text_pattern
_UUID = UUID_KEY.text_pattern


@pytest.mark.parametrize(
    ("template", "key", "location", "covered"),
    [
        ("{pk}@settings", _INT, "42@settings", True),
        ("{pk}@settings", _INT, "-7@settings", True),
        ("{pk}@settings", _INT, "users.api_key", False),
        ("{pk}", _INT, "users.api_key", False),
        ("{pk}", _INT, "42", True),
        ("settings.api_key:{pk}", _INT, "settings.api_key", True),
        ("settings.api_key:{pk}", _INT, "settings.api_key:a", False),
        ("tenant:{pk}:apikey", _INT, "tenant:7", True),
        ("tenant:{pk}:apikey", _INT, "tenant:x:y", False),
        ("u{pk}", _UUID, "users.api_key", False),
        ("u{pk}", _UUID, "u550e8400-e29b-41d4-a716-446655440000", True),
        ("t:{pk}", _UUID, "t", True),
        ("{pk}@settings", None, "users.api_key", True),  # a text key may be any text
    ],
)
def test_a_key_that_holds_no_colon_covers_only_what_it_can_spell(
    template: str, key: str | None, location: str, covered: bool
) -> None:
    assert template_covers(template, location, key) is covered
