"""Every variable a deploy file sets is one keyrotor reads, and every literal value it sets is
one ``Settings`` accepts: a typo in a name would be ignored in silence, a bad value would stop
the service only once deployed. Placeholders (compose's ``${...}``, systemd's ``%i``, a secret
reference, an empty value to fill in) are not values and are skipped."""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import pytest
import yaml

from keyrotor.errors import ConfigurationError
from keyrotor.settings import Settings
from tests.conftest import MASTER_KEY
from tests.deploy.test_manifests import DEPLOY, K8S, ROOT, _env_file
from tests.deploy.test_readme import code_variables

# Interpolated into docker-compose.yml (the postgres service), not read by keyrotor.
COMPOSE_ONLY = {"POSTGRES_PASSWORD"}
# What a deployment adds to the files' values before Settings reads them: a usable key and
# database (the files leave both to the operator).
BASE = {
    "DATABASE_URL": "postgresql://keyrotor@127.0.0.1:5432/keyrotor",
    "REDIS_URL": "redis://127.0.0.1:6379/0",
    "ENCRYPTION_KEY": MASTER_KEY,
}
ENV_FILE = "/etc/keyrotor/keyrotor.env"


def _is_placeholder(value: str) -> bool:
    return value == "" or "${" in value or re.search(r"%[a-zA-Z]", value) is not None


def _systemd_environment(path: Path) -> tuple[dict[str, str], list[str]]:
    """The unit's ``Environment=`` pairs (every line, every word) and ``EnvironmentFile=`` paths."""
    pairs: dict[str, str] = {}
    files: list[str] = []
    for line in path.read_text().splitlines():
        key, _, rest = line.partition("=")
        if key.strip() == "Environment":
            for word in rest.split():
                name, _, value = word.strip('"').partition("=")
                pairs[name] = value
        elif key.strip() == "EnvironmentFile":
            files.append(rest.strip().lstrip("-"))
    return pairs, files


def _k8s_env(doc: dict[str, Any]) -> dict[str, str | None]:
    """A workload's ``env`` entries: the literal value, or None for a reference."""
    env: dict[str, str | None] = {}
    for c in doc["spec"]["template"]["spec"]["containers"]:
        for var in c.get("env", []):
            env[var["name"]] = var.get("value")
            ref = var.get("valueFrom", {}).get("secretKeyRef")
            if ref is not None:
                # The Secret's key is documented as the variable of the same name.
                assert ref["key"] == var["name"], (doc["metadata"]["name"], var)
    return env


def deploy_environments() -> dict[str, dict[str, str | None]]:
    """Each place a deploy file sets variables, by name, with what it sets (None: a reference)."""
    out: dict[str, dict[str, str | None]] = {}
    services = yaml.safe_load((ROOT / "docker-compose.yml").read_text())["services"]
    for name, svc in services.items():
        if str(svc.get("image", "")).startswith("keyrotor"):
            out[f"compose {name}"] = {k: None if v is None else str(v) for k, v in svc["environment"].items()}
    out["compose.env.example"] = {
        k: v for k, v in _env_file(DEPLOY / "compose.env.example").items() if k not in COMPOSE_ONLY
    }
    env_file: dict[str, str | None] = dict(_env_file(DEPLOY / "systemd" / "keyrotor.env.example"))
    out["keyrotor.env.example"] = env_file
    for unit in sorted((DEPLOY / "systemd").glob("*.service")):
        pairs, files = _systemd_environment(unit)
        assert files == [ENV_FILE], f"{unit.name} reads {files}, not the env file the example is of"
        out[unit.name] = {**env_file, **pairs}
    for path in sorted(K8S.glob("*.yaml")):
        for doc in yaml.safe_load_all(path.read_text()):
            if not doc:
                continue
            if doc.get("kind") == "ConfigMap":
                out[f"ConfigMap {doc['metadata']['name']}"] = {k: str(v) for k, v in doc["data"].items()}
            if doc.get("kind") in ("Deployment", "Job", "StatefulSet", "DaemonSet"):
                out[f"{doc['kind']} {doc['metadata']['name']}"] = dict(_k8s_env(doc))
    return out


def test_the_sources_cover_every_service() -> None:
    where = set(deploy_environments())
    for name in ("compose api", "compose worker", "compose scheduler", "compose migrate"):
        assert name in where
    assert {p.name for p in (DEPLOY / "systemd").glob("*.service")} <= where
    assert {"Deployment keyrotor-api", "Deployment keyrotor-worker", "Deployment keyrotor-scheduler"} <= where


def test_every_variable_any_deploy_file_sets_is_one_keyrotor_reads() -> None:
    read = code_variables()
    for where, env in deploy_environments().items():
        assert env, where
        unknown = sorted(set(env) - read)
        assert not unknown, f"{where} sets variables keyrotor never reads: {unknown}"


def _literals(env: dict[str, str | None]) -> dict[str, str]:
    return {k: v for k, v in env.items() if v is not None and not _is_placeholder(v)}


@pytest.mark.parametrize("where", sorted(deploy_environments()))
def test_every_literal_value_is_accepted_by_settings(where: str) -> None:
    literals = _literals(deploy_environments()[where])
    for name, value in literals.items():  # one at a time, so a failure names its variable
        try:
            Settings.from_env({**BASE, name: value})
        except (ConfigurationError, ValueError) as exc:
            pytest.fail(f"{where}: {name}={value!r} is refused: {exc}")
    Settings.from_env({**BASE, **literals})  # and all together (cross-field checks)


def test_a_bad_value_would_be_caught() -> None:
    # Guards the check above against accepting anything.
    with pytest.raises((ConfigurationError, ValueError)):
        Settings.from_env({**BASE, "KEYROTOR_METRICS_PORT": "nine"})
    assert _is_placeholder("${ENCRYPTION_KEY:?x}") and _is_placeholder("%i") and not _is_placeholder("9108")


def test_compose_interpolates_only_what_its_example_env_file_sets() -> None:
    interpolated = set(re.findall(r"\$\{([A-Z_][A-Z0-9_]*)", (ROOT / "docker-compose.yml").read_text()))
    assert interpolated <= set(_env_file(DEPLOY / "compose.env.example")), interpolated


def test_example_env_files_say_to_make_the_master_key_with_keygen() -> None:
    # The compose file's own error says `keyrotor keygen` (a krk1_ key: the fast HKDF path);
    # an example that says otherwise makes a passphrase, stretched with scrypt in every process.
    for path in (DEPLOY / "compose.env.example", DEPLOY / "systemd" / "keyrotor.env.example"):
        lines = path.read_text().splitlines()
        at = next(i for i, line in enumerate(lines) if line.startswith("ENCRYPTION_KEY="))
        assert "keyrotor keygen" in lines[at - 1], (path.name, lines[at - 1])
    reference = (K8S / "secret-reference.md").read_text()
    assert 'ENCRYPTION_KEY="$(keyrotor keygen)"' in reference
