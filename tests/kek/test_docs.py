"""The provider variables the issue names are documented, in the README's configuration table and
in .env.example, and the documented default of VAULT_TRANSIT_KEY is the code's."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from keyrotor.kek.vault_client import VaultConfig

ROOT = Path(__file__).resolve().parents[2]
VARIABLES = (
    "SECRETS_PROVIDER",
    "AWS_SECRETS_REGION",
    "AWS_KMS_KEY_ID",
    "AWS_SECRET_ID",
    "AWS_ENDPOINT_URL",
    "AWS_ACCESS_KEY_ID",
    "AWS_SECRET_ACCESS_KEY",
    "AWS_SECRETS_FAILOVER_REGIONS",
    "VAULT_ADDR",
    "VAULT_NAMESPACE",
    "VAULT_TOKEN",
    "VAULT_ROLE_ID",
    "VAULT_SECRET_ID",
    "VAULT_TRANSIT_KEY",
)


def _readme_rows() -> dict[str, str]:
    """README configuration table: the variable names of each row -> the row."""
    rows: dict[str, str] = {}
    for line in (ROOT / "README.md").read_text().splitlines():
        if line.startswith("| `"):
            first = line.split("|")[1]
            for name in re.findall(r"`([A-Z0-9_]+)`", first):
                rows[name] = line
    return rows


@pytest.mark.parametrize("name", VARIABLES)
def test_variable_is_documented(name: str) -> None:
    assert name in _readme_rows(), f"{name} is missing from the README's configuration table"
    example = (ROOT / ".env.example").read_text()
    assert re.search(rf"^{name}=", example, re.MULTILINE), f"{name} is missing from .env.example"


def test_vault_transit_key_default_and_creation_are_documented() -> None:
    assert VaultConfig.from_env({"VAULT_ADDR": "http://x", "VAULT_TOKEN": "t"}).transit_key == "keyrotor"
    row = _readme_rows()["VAULT_TRANSIT_KEY"]
    assert "`keyrotor`" in row and "created when missing" in row
    assert re.search(r"^VAULT_TRANSIT_KEY=keyrotor$", (ROOT / ".env.example").read_text(), re.MULTILINE)
