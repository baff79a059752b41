"""``keyrotor_rows_per_dek_version``: counted from the real table, its cardinality bounded."""

from __future__ import annotations

from prometheus_client import REGISTRY

from keyrotor import KeyManager, metrics


def _series() -> dict[tuple[str, str], float]:
    out: dict[tuple[str, str], float] = {}
    for family in REGISTRY.collect():
        if family.name == "keyrotor_rows_per_dek_version":
            for s in family.samples:
                out[(s.labels["scope"], s.labels["version"])] = s.value
    return out


async def test_the_busiest_scopes_get_a_series_and_the_rest_are_summed(km: KeyManager) -> None:
    sizes = {"tenant-a/openai": 9, "tenant-b/openai": 7, "tenant-c/openai": 3, "tenant-d/openai": 2, "x": 1}
    for scope, n in sizes.items():
        await km.put_secrets(scope, [(f"k{i}", f"sk-proj-rows-{scope}-{i}") for i in range(n)])

    assert await metrics.refresh_rows_per_version(km.sessions, max_scopes=2) == 3
    assert _series() == {
        ("tenant-a/openai", "1"): 9,
        ("tenant-b/openai", "1"): 7,
        (metrics.OTHER_SCOPES, "1"): 6,  # the three smallest scopes, summed
    }

    # Unbounded: a series per scope; a recount replaces the previous series.
    assert await metrics.refresh_rows_per_version(km.sessions, max_scopes=100) == 5
    assert _series() == {(scope, "1"): n for scope, n in sizes.items()}

    # No series per scope at all: only the per-version totals.
    assert await metrics.refresh_rows_per_version(km.sessions, max_scopes=0) == 1
    assert _series() == {(metrics.OTHER_SCOPES, "1"): 22}
