"""The README's configuration reference lists every environment variable the code reads, and
only those; and the README has the parts an operator needs (the two commands, the architecture
diagram, operations, the security model).

Variables are found in the code, not in a list kept by hand: every alias of a
:class:`keyrotor.settings.Settings` field, and every string constant handed to the providers'
``env_value``/``env_required`` or to ``os.environ.get``/``os.getenv`` anywhere in ``keyrotor/``,
``worker/`` and ``jobs/``.
"""

from __future__ import annotations

import ast
import re
from pathlib import Path

from pydantic import AliasChoices

from keyrotor.settings import Settings

ROOT = Path(__file__).resolve().parents[2]
README = (ROOT / "README.md").read_text()
SOURCES = [p for d in ("keyrotor", "worker", "jobs") for p in sorted((ROOT / d).rglob("*.py"))]
ENV_NAME = re.compile(r"[A-Z][A-Z0-9_]*[A-Z0-9]")


def _settings_variables() -> set[str]:
    names: set[str] = set()
    for field in Settings.model_fields.values():
        alias = field.validation_alias
        if isinstance(alias, str):
            names.add(alias)
        elif isinstance(alias, AliasChoices):
            names |= {c for c in alias.choices if isinstance(c, str)}
    return names


def _read_calls(tree: ast.AST) -> set[str]:
    """Names in ``env_value(environ, "X")``, ``env_required(environ, "X")``,
    ``os.environ.get("X")``, ``os.environ["X"]`` and ``os.getenv("X")``."""
    found: set[str] = set()
    for node in ast.walk(tree):
        args: list[ast.expr] = []
        if isinstance(node, ast.Call):
            func = node.func
            name = (
                func.id
                if isinstance(func, ast.Name)
                else func.attr
                if isinstance(func, ast.Attribute)
                else ""
            )
            if name in ("env_value", "env_required"):
                args = node.args[1:2]
            elif name == "getenv" or (
                name == "get" and isinstance(func, ast.Attribute) and ast.unparse(func.value) == "os.environ"
            ):
                args = node.args[:1]
        elif isinstance(node, ast.Subscript) and ast.unparse(node.value) == "os.environ":
            args = [node.slice]
        for arg in args:
            if isinstance(arg, ast.Constant) and isinstance(arg.value, str) and ENV_NAME.fullmatch(arg.value):
                found.add(arg.value)
    return found


def code_variables() -> set[str]:
    names = _settings_variables()
    for path in SOURCES:
        names |= _read_calls(ast.parse(path.read_text(), str(path)))
    return names


def _configuration_section() -> str:
    start = README.index("\n## Configuration\n")
    end = README.index("\n## ", start + 1)
    return README[start:end]


def documented_variables() -> set[str]:
    """The first column of the configuration table: every backquoted name (some rows name two)."""
    names: set[str] = set()
    for line in _configuration_section().splitlines():
        if line.startswith("| `"):
            first = line.split("|")[1]
            names |= set(re.findall(r"`([A-Z][A-Z0-9_<>*]*)`", first))
    return names


def test_the_finder_sees_each_kind_of_read() -> None:
    # Guards the test against finding nothing: one variable of each kind of read.
    found = code_variables()
    assert {"DATABASE_URL", "KEYROTOR_METRICS_PORT"} <= found  # Settings aliases
    assert {"AWS_KMS_KEY_ID", "VAULT_ADDR", "AWS_SECRETS_FAILOVER_REGIONS"} <= found  # providers
    assert "KEYROTOR_DEBUG" in found  # os.environ.get in the CLI


def test_every_variable_the_code_reads_is_in_the_configuration_reference() -> None:
    missing = sorted(code_variables() - documented_variables())
    assert not missing, f"read by the code but not in README.md's configuration table: {missing}"


def test_the_configuration_reference_lists_no_variable_the_code_ignores() -> None:
    # The per-region prefix is a pattern (keyrotor/replication/regions.py), not a variable of its own.
    stale = sorted(n for n in documented_variables() - code_variables() if "<" not in n)
    assert not stale, f"in README.md's configuration table but read nowhere: {stale}"


def test_each_documented_row_has_a_default_and_a_meaning() -> None:
    for line in _configuration_section().splitlines():
        if line.startswith("| `"):
            cells = [c.strip() for c in line.strip().strip("|").split("|")]
            assert len(cells) == 3 and cells[2], line


def test_the_readme_has_what_an_operator_needs() -> None:
    for heading in (
        "## Two commands",
        "## Configuration",
        "## Architecture",
        "## Operations",
        "## Security model",
    ):
        assert f"\n{heading}\n" in README, heading
    assert "scripts/demo" in README and "scripts/test" in README
    assert "```mermaid" in README
    for topic in (
        "**Scaling workers.**",
        "**Rotating the KEK.**",
        "**A failed rotation.**",
        "**Restoring a region.**",
    ):
        assert topic in README, topic
    assert "**An attacker with the database alone**" in README
    assert "**An attacker with Redis alone**" in README
