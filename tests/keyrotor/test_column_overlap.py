"""Two registered columns of one scope whose context templates can spell the same context.

Such a pair shares AADs (a value moved from one column to the other still opens there), and the
census counts the one column's location as covered by the other: once the first is unregistered,
a retirement that counts only the second finds nothing on the old version, and the values of the
first are lost with the DEK. ``columns register`` refuses the second template.
"""

from __future__ import annotations

import pytest

from keyrotor import KeyManager
from keyrotor.census import columns
from keyrotor.census.locations import Cover, classify, templates_collide
from keyrotor.crypto import envelope
from keyrotor.errors import InvalidInput
from tests.rotation_helpers import fetch


async def _tables(url: str) -> None:
    await fetch(url, "CREATE TABLE cfg (id bigint PRIMARY KEY, api_key text)")
    await fetch(url, "CREATE TABLE cfg2 (k text PRIMARY KEY, tok text)")
    await fetch(url, "CREATE TABLE cfg3 (id bigint PRIMARY KEY, tok text)")


async def test_a_template_that_spells_another_columns_contexts_is_refused(
    km: KeyManager, env: dict[str, str]
) -> None:
    await _tables(env["DATABASE_URL"])
    await columns.register(km.sessions, "cfg.api_key", pk="id", scope="openai")
    # The attack: row "api_key:42" of cfg2 has the AAD of row 42 of cfg.api_key.
    assert envelope.aad("openai", 1, "cfg.{pk}".replace("{pk}", "api_key:42")) == envelope.aad(
        "openai", 1, "cfg.api_key:42"
    )
    # And the census would call cfg.api_key's location covered by cfg2.tok.
    cover = Cover("cfg.{pk}", "openai", "cfg2.tok")
    assert classify("openai", "cfg.api_key", [cover], []) == ("registered", "cfg2.tok")
    for template in ("cfg.{pk}", "cf{pk}", "cfg.api_key:{pk}", "c{pk}:x"):
        with pytest.raises(InvalidInput, match=r"collides with registered column cfg\.api_key"):
            await columns.register(km.sessions, "cfg2.tok", pk="k", scope="openai", context_template=template)
    # So is one whose scope column may name the scope of the other.
    with pytest.raises(InvalidInput, match="collides"):
        await columns.register(
            km.sessions, "cfg3.tok", pk="id", scope_column="tok", context_template="cfg.api_key:{pk}"
        )
    # What cannot collide is accepted: another scope (the AAD holds it), an integer key that
    # cannot spell the other's letters, and distinct default templates.
    await columns.register(km.sessions, "cfg2.tok", pk="k", scope="anthropic", context_template="cfg.{pk}")
    await columns.register(km.sessions, "cfg3.tok", pk="id", scope="openai", context_template="cfg.{pk}")
    names = [c.name for c in await _list(km)]
    assert names == ["cfg.api_key", "cfg2.tok", "cfg3.tok"]


async def _list(km: KeyManager) -> list[columns.ManagedColumn]:
    async with km.sessions() as session:
        return await columns.list_columns(session)


@pytest.mark.parametrize(
    ("a", "a_int", "b", "b_int", "collide"),
    [
        ("cfg.api_key:{pk}", True, "cfg.api_key:{pk}", True, True),
        ("cfg.api_key:{pk}", True, "cfg.api_key_v2:{pk}", False, False),
        ("cfg.api_key:{pk}", True, "cfg.{pk}", False, True),
        ("cfg.api_key:{pk}", False, "cfg.{pk}", True, False),
        ("a{pk}", True, "a1{pk}", True, True),
        ("a{pk}", True, "a:{pk}", True, False),
        ("a:{pk}:x", True, "a:{pk}:y", True, False),
        ("a:{pk}", False, "a:{pk}:y", True, True),
        ("{pk}@settings", True, "users.api_key:{pk}", True, False),
        ("{pk}@settings", False, "users.api_key:{pk}", True, True),
    ],
)
def test_templates_collide(a: str, a_int: bool, b: str, b_int: bool, collide: bool) -> None:
    assert templates_collide(a, a_int, b, b_int) is collide
    assert templates_collide(b, b_int, a, a_int) is collide
