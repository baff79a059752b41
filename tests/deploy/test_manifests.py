"""Compose file, Dockerfile, Kubernetes manifests, systemd units and the Grafana dashboard agree
with the code: they parse, run commands that exist, use one image and one port, probe paths the
ops server serves, and chart metrics the code registers. No Docker or cluster needed."""

from __future__ import annotations

import configparser
import json
import re
import shlex
import tomllib
from pathlib import Path
from typing import Any

import pytest
import typer.main
import yaml

import keyrotor.audit.writer
import keyrotor.kek.metrics
import keyrotor.metrics
import keyrotor.replication.check
import keyrotor.worker.http
from keyrotor.settings import Settings
from keyrotor.worker.cli import app

ROOT = Path(__file__).resolve().parents[2]
DEPLOY = ROOT / "deploy"
K8S = DEPLOY / "k8s"
VERSION = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["version"]
IMAGE = f"keyrotor:{VERSION}"
PORT = Settings().metrics_port


def _compose() -> dict[str, Any]:
    doc: dict[str, Any] = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
    return doc


def _k8s_docs() -> list[dict[str, Any]]:
    docs = []
    for path in sorted(K8S.glob("*.yaml")):
        docs += [d for d in yaml.safe_load_all(path.read_text()) if d]
    return docs


def _by_kind(kind: str) -> list[dict[str, Any]]:
    return [d for d in _k8s_docs() if d.get("kind") == kind]


def _containers(doc: dict[str, Any]) -> list[dict[str, Any]]:
    spec = doc["spec"]["template"]["spec"]
    containers: list[dict[str, Any]] = spec["containers"]
    return containers


def _unit(name: str) -> configparser.ConfigParser:
    parser = configparser.ConfigParser(strict=False, interpolation=None)
    parser.optionxform = str  # type: ignore[assignment,method-assign]
    parser.read_string((DEPLOY / "systemd" / name).read_text())
    return parser


def _assert_command_exists(args: list[str]) -> None:
    """``keyrotor ARGS`` names a real (sub)command of the CLI (typer's groups carry ``commands``)."""
    command: Any = typer.main.get_command(app)
    words = [a for a in args if not a.startswith("-")]
    assert words, args
    for word in words:
        subcommands = getattr(command, "commands", None)
        if subcommands is None:
            break  # the rest are arguments of a leaf command
        command = subcommands.get(word)
        assert command is not None, f"`keyrotor {' '.join(args)}`: no command {word!r}"
    assert getattr(command, "commands", None) is None, f"`keyrotor {' '.join(args)}` names a group"


def _registered_metric_names() -> set[str]:
    from prometheus_client import REGISTRY

    names: set[str] = set()
    for family in REGISTRY.collect():
        names.add(family.name)
        if family.type == "counter":
            names.add(family.name + "_total")
        if family.type == "histogram":
            names |= {family.name + s for s in ("_bucket", "_sum", "_count")}
    return names


# --- parse ---------------------------------------------------------------------------------


def test_every_file_parses() -> None:
    assert _compose()["services"]
    assert len(_k8s_docs()) >= 7
    for path in (DEPLOY / "systemd").glob("*.service"):
        assert _unit(path.name).has_section("Service"), path
    assert json.loads((DEPLOY / "grafana" / "keyrotor.json").read_text())["panels"]
    kustomize = yaml.safe_load((K8S / "kustomization.yaml").read_text())
    for resource in kustomize["resources"]:
        assert (K8S / resource).is_file(), resource


# --- commands ------------------------------------------------------------------------------


def _all_commands() -> list[list[str]]:
    cmds = []
    for svc in _compose()["services"].values():
        if svc.get("image", "").startswith("keyrotor"):
            cmds.append(svc["command"])
    for doc in _by_kind("Deployment") + _by_kind("Job"):
        for c in _containers(doc):
            cmds.append(c["args"])
    for path in (DEPLOY / "systemd").glob("*.service"):
        exec_start = _unit(path.name)["Service"]["ExecStart"]
        argv = shlex.split(exec_start)
        assert argv[0].endswith("/keyrotor"), exec_start
        cmds.append(argv[1:])
    dockerfile = (DEPLOY / "Dockerfile").read_text()
    cmds.append(json.loads(re.search(r"^CMD (.+)$", dockerfile, re.M).group(1)))  # type: ignore[union-attr]
    return cmds


def test_every_command_exists_in_the_cli() -> None:
    cmds = _all_commands()
    assert ["db", "upgrade"] in cmds and ["worker"] in cmds and ["scheduler"] in cmds
    for args in cmds:
        _assert_command_exists(args)


def test_command_check_rejects_unknown_commands() -> None:
    with pytest.raises(AssertionError):
        _assert_command_exists(["rotate-everything"])
    with pytest.raises(AssertionError):
        _assert_command_exists(["db"])


# --- compose -------------------------------------------------------------------------------


def test_compose_services_dependencies_and_scaling() -> None:
    services = _compose()["services"]
    assert set(services) >= {"postgres", "redis", "migrate", "worker", "scheduler"}
    assert services["migrate"]["command"] == ["db", "upgrade"]
    for name in ("postgres", "redis", "worker", "scheduler"):
        assert services[name]["healthcheck"]["test"], name
    for name in ("worker", "scheduler"):
        deps = services[name]["depends_on"]
        assert deps["migrate"]["condition"] == "service_completed_successfully"
        assert deps["postgres"]["condition"] == "service_healthy"
        assert deps["redis"]["condition"] == "service_healthy"
    assert services["migrate"]["depends_on"]["postgres"]["condition"] == "service_healthy"
    worker_svc = services["worker"]
    assert "container_name" not in worker_svc and "ports" not in worker_svc  # scalable


def test_compose_secrets_come_from_the_environment_not_the_file() -> None:
    text = (ROOT / "docker-compose.yml").read_text()
    env = _compose()["services"]["worker"]["environment"]
    assert env["ENCRYPTION_KEY"].startswith("${ENCRYPTION_KEY:?")
    assert "${POSTGRES_PASSWORD:?" in env["DATABASE_URL"]
    instructions = [
        line for line in (DEPLOY / "Dockerfile").read_text().splitlines() if not line.lstrip().startswith("#")
    ]
    assert not [line for line in instructions if "ENCRYPTION_KEY" in line or "PASSWORD" in line]
    assert not re.search(r"ENCRYPTION_KEY:\s*['\"]?[A-Za-z0-9+/]{16,}", text)


# --- image and port ------------------------------------------------------------------------


def test_one_image_and_one_port_everywhere() -> None:
    dockerfile = (DEPLOY / "Dockerfile").read_text()
    assert re.search(rf"^EXPOSE {PORT}$", dockerfile, re.M)
    assert re.search(rf"KEYROTOR_METRICS_PORT={PORT}\b", dockerfile)
    assert re.search(r'^ENTRYPOINT \["keyrotor"\]$', dockerfile, re.M)
    assert re.search(r"^USER \d+", dockerfile, re.M)
    stages = re.findall(r"^FROM (\S+)", dockerfile, re.M)
    assert stages == ["python:3.11-slim", "python:3.11-slim"]
    final = dockerfile.split("\nFROM ")[-1]
    assert "apt-get" not in final and "build-essential" not in final and "gcc" not in final

    services = _compose()["services"]
    for name in ("migrate", "worker", "scheduler"):
        assert services[name]["image"] == IMAGE
        assert services[name]["build"]["dockerfile"] == "deploy/Dockerfile"
    for name in ("worker", "scheduler"):
        assert services[name]["environment"]["KEYROTOR_METRICS_PORT"] == str(PORT)
        assert services[name]["expose"] == [str(PORT)]
        assert f"127.0.0.1:{PORT}/readyz" in " ".join(services[name]["healthcheck"]["test"])

    config = _by_kind("ConfigMap")[0]["data"]
    assert config["KEYROTOR_METRICS_PORT"] == str(PORT)
    for doc in _by_kind("Deployment") + _by_kind("Job"):
        for c in _containers(doc):
            assert c["image"] == IMAGE, doc["metadata"]["name"]
    for doc in _ops_deployments():
        annotations = doc["spec"]["template"]["metadata"]["annotations"]
        assert annotations["prometheus.io/port"] == str(PORT)
        for c in _containers(doc):
            assert c["ports"] == [{"name": "metrics", "containerPort": PORT, "protocol": "TCP"}]


# --- kubernetes ----------------------------------------------------------------------------


def _ops_deployments() -> list[dict[str, Any]]:
    """The worker and scheduler Deployments (the API has a port and probes of its own)."""
    return [d for d in _by_kind("Deployment") if d["metadata"]["name"] != "keyrotor-api"]


def test_probes_point_at_paths_the_server_serves() -> None:
    for doc in _ops_deployments():
        for c in _containers(doc):
            assert c["livenessProbe"]["httpGet"]["path"] == keyrotor.worker.http.HEALTHZ_PATH
            assert c["readinessProbe"]["httpGet"]["path"] == keyrotor.worker.http.READYZ_PATH
            for probe in ("livenessProbe", "readinessProbe"):
                assert c[probe]["httpGet"]["path"] in keyrotor.worker.http.PATHS
                assert c[probe]["httpGet"]["port"] == "metrics"


def test_deployments_are_hardened_and_hpa_ready() -> None:
    deployments = {d["metadata"]["name"]: d for d in _by_kind("Deployment")}
    assert "replicas" not in deployments["keyrotor-worker"]["spec"]  # the HPA owns it
    assert deployments["keyrotor-scheduler"]["spec"]["replicas"] == 2
    hpa = _by_kind("HorizontalPodAutoscaler")[0]
    assert hpa["spec"]["scaleTargetRef"]["name"] == "keyrotor-worker"
    pdbs = {
        d["spec"]["selector"]["matchLabels"]["app.kubernetes.io/component"]
        for d in _by_kind("PodDisruptionBudget")
    }
    assert pdbs == {"worker", "scheduler", "api"}
    for doc in [*deployments.values(), *_by_kind("Job")]:
        pod = doc["spec"]["template"]["spec"]
        assert pod["securityContext"]["runAsNonRoot"] is True
        for c in _containers(doc):
            assert c["securityContext"]["readOnlyRootFilesystem"] is True
            assert c["securityContext"]["allowPrivilegeEscalation"] is False
            assert c["resources"]["requests"]["cpu"] and c["resources"]["requests"]["memory"]
    assert _by_kind("Job")[0]["spec"]["template"]["spec"]["containers"][0]["args"] == ["db", "upgrade"]


def test_secrets_are_referenced_never_included() -> None:
    assert not _by_kind("Secret")
    refs = set()
    for doc in _by_kind("Deployment") + _by_kind("Job"):
        for c in _containers(doc):
            for var in c.get("env", []):
                assert "value" not in var, var["name"]  # secrets only through secretKeyRef
                refs.add(var["valueFrom"]["secretKeyRef"]["name"])
    assert refs == {"keyrotor-secrets"}


# --- systemd -------------------------------------------------------------------------------


def test_systemd_units() -> None:
    names = {p.name for p in (DEPLOY / "systemd").glob("*.service")}
    assert names == {
        "keyrotor-worker@.service",
        "keyrotor-scheduler.service",
        "keyrotor-migrate.service",
        "keyrotor-api@.service",
    }
    for name in names:
        svc = _unit(name)["Service"]
        assert svc["EnvironmentFile"] == "/etc/keyrotor/keyrotor.env"
        assert svc["User"] == "keyrotor"
    assert _unit("keyrotor-migrate.service")["Service"]["Type"] == "oneshot"
    for name in ("keyrotor-worker@.service", "keyrotor-scheduler.service", "keyrotor-api@.service"):
        assert "keyrotor-migrate.service" in _unit(name)["Unit"]["Requires"]
    worker_unit = (DEPLOY / "systemd" / "keyrotor-worker@.service").read_text().splitlines()
    assert "Environment=KEYROTOR_METRICS_PORT=%i" in worker_unit


# --- grafana -------------------------------------------------------------------------------


def test_dashboard_queries_name_registered_metrics() -> None:
    dash = json.loads((DEPLOY / "grafana" / "keyrotor.json").read_text())
    registered = _registered_metric_names()
    used = set()
    for panel in dash["panels"]:
        for target in panel["targets"]:
            used |= set(re.findall(r"\bkeyrotor_[a-z0-9_]+", target["expr"]))
    assert used, "the dashboard charts nothing"
    assert used <= registered, sorted(used - registered)
    # The metrics are all on it.
    for name in (
        "keyrotor_rotations_started_total",
        "keyrotor_rotations_completed_total",
        "keyrotor_rotations_failed_total",
        "keyrotor_rotation_duration_seconds_bucket",
        "keyrotor_rows_reencrypted_total",
        "keyrotor_rows_per_dek_version",
        "keyrotor_dek_cache_hits_total",
        "keyrotor_dek_cache_misses_total",
        "keyrotor_decrypt_failures_total",
        "keyrotor_kek_calls_total",
        "keyrotor_kek_call_duration_seconds_bucket",
        "keyrotor_replica_status",
        "keyrotor_audit_queue_depth",
        "keyrotor_arq_queue_depth",
        "keyrotor_arq_jobs_total",
        "keyrotor_replica_keys",
        "keyrotor_failover_active",
    ):
        assert name in used, name
    ids = [panel["id"] for panel in dash["panels"]]
    assert len(ids) == len(set(ids)), ids
    cells = [(p["gridPos"]["x"], p["gridPos"]["y"]) for p in dash["panels"]]
    assert len(cells) == len(set(cells)), "two panels in one place"


def test_the_modules_defining_metrics_are_imported() -> None:
    # Keeps the imports above meaningful (they register the metrics this file checks).
    assert keyrotor.metrics.ROTATIONS_STARTED and keyrotor.kek.metrics.KEK_CALLS
    assert keyrotor.audit.writer.QUEUE_DEPTH and keyrotor.worker.http.ARQ_JOBS
    assert keyrotor.replication.check.REPLICA_KEYS and keyrotor.replication.check.FAILOVER_ACTIVE


# --- every file, and the variables they set ------------------------------------------------

CHECKED = {
    "docker-compose.yml",
    "deploy/Dockerfile",
    "deploy/Dockerfile.dockerignore",
    "deploy/compose.env.example",
    "deploy/grafana/keyrotor.json",
    "deploy/k8s/api-deployment.yaml",
    "deploy/k8s/api-pdb.yaml",
    "deploy/k8s/api-service.yaml",
    "deploy/k8s/configmap.yaml",
    "deploy/k8s/kustomization.yaml",
    "deploy/k8s/migrate-job.yaml",
    "deploy/k8s/scheduler-deployment.yaml",
    "deploy/k8s/scheduler-pdb.yaml",
    "deploy/k8s/secret-reference.md",
    "deploy/k8s/worker-deployment.yaml",
    "deploy/k8s/worker-hpa.yaml",
    "deploy/k8s/worker-pdb.yaml",
    "deploy/postgres/roles.sql",  # applied and checked by tests/reliability/test_privileges.py
    "deploy/systemd/keyrotor-api@.service",
    "deploy/systemd/keyrotor-migrate.service",
    "deploy/systemd/keyrotor-scheduler.service",
    "deploy/systemd/keyrotor-worker@.service",
    "deploy/systemd/keyrotor.env.example",
}


def test_every_deploy_file_is_one_these_tests_check() -> None:
    present = {str(p.relative_to(ROOT)) for p in DEPLOY.rglob("*") if p.is_file()} | {"docker-compose.yml"}
    assert present == CHECKED, "a deploy file without a check, or a checked file gone: " + str(
        sorted(present ^ CHECKED)
    )
    kustomize = yaml.safe_load((K8S / "kustomization.yaml").read_text())
    assert set(kustomize["resources"]) == {p.name for p in K8S.glob("*.yaml")} - {"kustomization.yaml"}


def _env_file(path: Path) -> dict[str, str]:
    pairs = {}
    for line in path.read_text().splitlines():
        if line.strip() and not line.lstrip().startswith("#"):
            name, _, value = line.partition("=")
            pairs[name.strip()] = value.strip()
    return pairs


def test_variables_set_by_deploy_files_are_ones_keyrotor_reads() -> None:
    from tests.deploy.test_readme import code_variables

    read = code_variables()
    compose_only = {"POSTGRES_PASSWORD"}  # interpolated into the compose file, not read by keyrotor
    sources: dict[str, set[str]] = {
        "compose worker": set(_compose()["services"]["worker"]["environment"]),
        "compose.env.example": set(_env_file(DEPLOY / "compose.env.example")) - compose_only,
        "keyrotor.env.example": set(_env_file(DEPLOY / "systemd" / "keyrotor.env.example")),
        "ConfigMap": set(_by_kind("ConfigMap")[0]["data"]),
    }
    for doc in _by_kind("Deployment") + _by_kind("Job"):
        for c in _containers(doc):
            sources[doc["metadata"]["name"]] = {v["valueFrom"]["secretKeyRef"]["key"] for v in c["env"]}
    for where, names in sources.items():
        assert names, where
        assert names <= read, f"{where} sets variables keyrotor never reads: {sorted(names - read)}"


def test_example_env_files_hold_no_secret() -> None:
    for path in (DEPLOY / "compose.env.example", DEPLOY / "systemd" / "keyrotor.env.example"):
        env = _env_file(path)
        assert env["ENCRYPTION_KEY"] == "", path  # to be generated, never shipped
        for name, value in env.items():
            assert not re.fullmatch(r"[A-Za-z0-9+/=_\-]{24,}", value), (path, name)


def test_dockerignore_lets_in_exactly_what_the_image_copies() -> None:
    dockerfile = (DEPLOY / "Dockerfile").read_text()
    copied = set()
    for line in dockerfile.splitlines():
        if line.startswith("COPY ") and "--from=" not in line:
            copied |= set(line.split()[1:-1])
    allowed = {
        line[1:].rstrip("/")
        for line in (DEPLOY / "Dockerfile.dockerignore").read_text().splitlines()
        if line.startswith("!")
    }
    assert copied == allowed, (sorted(copied), sorted(allowed))
    for path in copied:
        assert (ROOT / path).exists(), path


def test_metrics_bind_every_interface_only_where_a_scraper_needs_it() -> None:
    """The default bind is loopback (#19 finding 9); the examples that are scraped and probed
    over a network bind 0.0.0.0 explicitly, and say why next to it."""
    assert Settings.model_fields["metrics_host"].default == "127.0.0.1"
    assert _compose()["x-keyrotor"]["environment"]["KEYROTOR_METRICS_HOST"] == "0.0.0.0"  # noqa: S104
    (configmap,) = [d for d in _by_kind("ConfigMap") if d["metadata"]["name"] == "keyrotor-config"]
    assert configmap["data"]["KEYROTOR_METRICS_HOST"] == "0.0.0.0"  # noqa: S104
    for path in (ROOT / "docker-compose.yml", K8S / "configmap.yaml"):
        lines = path.read_text().splitlines()
        at = next(i for i, line in enumerate(lines) if "KEYROTOR_METRICS_HOST" in line)
        assert "unauthenticated" in " ".join(lines[max(0, at - 4) : at]), path
    # The Dockerfile and systemd leave the default alone: one host, loopback.
    assert "KEYROTOR_METRICS_HOST=0" not in (DEPLOY / "Dockerfile").read_text()
