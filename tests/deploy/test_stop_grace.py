"""A worker told to stop is gone within ``KEYROTOR_WORKER_STOP_GRACE_SECONDS`` plus
``STOP_MARGIN_S`` (keyrotor/worker/stopping.py): every deploy file must give it that long, and some
seconds more, before its supervisor's SIGKILL (which would cut the audit flush short)."""

from __future__ import annotations

import re

import yaml

from keyrotor.settings import Settings
from keyrotor.worker.stopping import STOP_MARGIN_S
from tests.deploy.test_deploy_variables import BASE, _systemd_environment
from tests.deploy.test_manifests import DEPLOY, K8S, ROOT, _env_file, _unit

GRACE = "KEYROTOR_WORKER_STOP_GRACE_SECONDS"
# What the kill timeout must leave beyond the worker's own bound: a loaded machine's slack.
SLACK_S = 5.0
KUBERNETES_DEFAULT_S = 30.0


def _stop_bound(env: dict[str, str | None]) -> float:
    """How long a worker with ``env`` takes at most to stop."""
    values = {k: v for k, v in env.items() if v is not None}
    return Settings.from_env({**values, **BASE}).worker_stop_grace_s + STOP_MARGIN_S


def test_the_default_stop_fits_kubernetes_default_grace() -> None:
    assert _stop_bound({}) + SLACK_S <= KUBERNETES_DEFAULT_S


def test_compose_gives_the_worker_time_to_stop() -> None:
    worker = yaml.safe_load((ROOT / "docker-compose.yml").read_text())["services"]["worker"]
    period = re.fullmatch(r"(\d+)s", worker["stop_grace_period"])
    assert period is not None, worker["stop_grace_period"]
    env = {k: None if v is None else str(v) for k, v in worker["environment"].items()}
    assert GRACE in env
    assert _stop_bound(env) + SLACK_S <= int(period.group(1))


def test_kubernetes_gives_the_worker_time_to_stop() -> None:
    config = yaml.safe_load((K8S / "configmap.yaml").read_text())["data"]
    spec = yaml.safe_load((K8S / "worker-deployment.yaml").read_text())["spec"]["template"]["spec"]
    assert GRACE in config
    period = spec.get("terminationGracePeriodSeconds", KUBERNETES_DEFAULT_S)
    assert _stop_bound(config) + SLACK_S <= period


def test_systemd_gives_the_worker_time_to_stop() -> None:
    pairs, _ = _systemd_environment(DEPLOY / "systemd" / "keyrotor-worker@.service")
    env: dict[str, str | None] = {**_env_file(DEPLOY / "systemd" / "keyrotor.env.example"), **pairs}
    env.pop("KEYROTOR_METRICS_PORT", None)  # %i: a placeholder
    assert GRACE in env
    timeout = float(_unit("keyrotor-worker@.service")["Service"]["TimeoutStopSec"])
    assert _stop_bound(env) + SLACK_S <= timeout
