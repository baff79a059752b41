"""A batch's contexts and locations computed per batch are what the per-row path gives."""

from __future__ import annotations

import uuid
from collections import Counter
from typing import Any

import pytest

from keyrotor.census.columns import ManagedColumn
from keyrotor.census.locations import context_prefix, count_locations, location_of
from keyrotor.store.key_ranges import INTEGER_KEY, TEXT_KEY, UUID_KEY
from keyrotor.store.targets import SECRETS, SEPARATOR, _joined

KEYS: list[list[Any]] = [
    [1, 2, 3],
    ["a", "b:c", "d"],  # a key holding ':' moves the location
    ["x:", ":", ""],
    [uuid.UUID(int=7), uuid.UUID(int=8)],
    ["é", "ü"],
    [],
]


@pytest.mark.parametrize(
    ("template", "prefix"),
    [
        ("settings.api_key:{pk}", "settings.api_key:"),
        ("{pk}", ""),
        ("tenant:{pk}:apikey", None),
        ("a:{pk}:{pk}", None),
        ("fixed:{pk}x", None),
        ("no key", None),
    ],
)
def test_context_prefix_only_for_text_then_key(template: str, prefix: str | None) -> None:
    assert context_prefix(template) == prefix


@pytest.mark.parametrize("template", ["settings.api_key:{pk}", "{pk}", "app:{pk}", "nocolon{pk}", "t:{pk}:x"])
@pytest.mark.parametrize("keys", KEYS)
def test_a_managed_targets_batch_contexts_and_locations_match_each_rows(
    template: str, keys: list[Any]
) -> None:
    key_type = (
        UUID_KEY
        if keys and isinstance(keys[0], uuid.UUID)
        else INTEGER_KEY
        if keys and isinstance(keys[0], int)
        else TEXT_KEY
    )
    target = ManagedColumn("app", "api_key", "id", None, "openai", template, key_type=key_type).target()
    rows = [(k, "kr1:1:AAAA") for k in keys]
    per_row = [target.context(k, ()) for k in keys]
    assert target.contexts(rows) == per_row
    assert count_locations(per_row, prefix=target.context_prefix) == Counter(map(location_of, per_row))


@pytest.mark.parametrize("names", [["prod", "dev"], ["a:b", "c"], [":", ""], []])
def test_secrets_batch_contexts_and_locations_match_each_rows(names: list[str]) -> None:
    rows = [(i, "kr1:1:AAAA", name) for i, name in enumerate(names)]
    per_row = [SECRETS.context(row[0], row[2:]) for row in rows]
    assert SECRETS.contexts(rows) == per_row == [f"secret:{n}" for n in names]
    counts = count_locations(per_row, prefix=SECRETS.context_prefix)
    assert counts == Counter(map(location_of, per_row))


def test_count_locations_without_a_prefix_counts_each_context() -> None:
    contexts = ["a:1", "a:2", "b", "", "c:d:e"]
    assert count_locations(contexts) == {"a": 2, "b": 1, "": 1, "c:d": 1}


@pytest.mark.parametrize(
    ("values", "joined"),
    [
        (["kr1:1:AB", "kr1:1:CD"], "kr1:1:AB,kr1:1:CD"),
        (["kr1:1:AB"], "kr1:1:AB"),
        (["kr1:1:A,B", "x"], None),  # a value holding the separator
        (["kr1:1:AB", ""], None),  # string_to_array would drop an empty value
        ([""], None),
    ],
)
def test_values_are_joined_only_when_they_split_back_exactly(values: list[str], joined: str | None) -> None:
    assert _joined(values) == joined
    if joined is not None:
        assert joined.split(SEPARATOR) == values
