"""`keyrotor serve` runs next to the worker in compose, Kubernetes and systemd, on the API's
port, probed on its unauthenticated health route, with several replicas behind one address."""

from __future__ import annotations

from typing import Any

from aiohttp import web

from keyrotor.api.routes import add_routes
from keyrotor.settings import Settings
from tests.deploy.test_manifests import DEPLOY, IMAGE, _by_kind, _compose, _containers, _unit

API_PORT = Settings().api_port
HEALTH = "/v1/health"


def _routes() -> set[str]:
    app = web.Application()
    add_routes(app)
    return {r.resource.canonical for r in app.router.routes() if r.resource is not None}


def test_defaults() -> None:
    assert API_PORT == 8180 and Settings().api_host == "127.0.0.1"
    assert HEALTH in _routes()


def test_compose_api_service() -> None:
    services = _compose()["services"]
    api = services["api"]
    assert api["command"] == ["serve"] and api["image"] == IMAGE
    assert "container_name" not in api and "ports" not in api  # scales behind a balancer
    assert api["expose"] == [str(API_PORT)]
    assert api["environment"]["KEYROTOR_API_PORT"] == str(API_PORT)
    assert api["environment"]["ENCRYPTION_KEY"].startswith("${ENCRYPTION_KEY:?")
    assert f"127.0.0.1:{API_PORT}{HEALTH}" in " ".join(api["healthcheck"]["test"])
    assert api["depends_on"]["migrate"]["condition"] == "service_completed_successfully"


def _api_deployment() -> dict[str, Any]:
    (doc,) = [d for d in _by_kind("Deployment") if d["metadata"]["name"] == "keyrotor-api"]
    return doc


def test_kubernetes_api() -> None:
    doc = _api_deployment()
    assert doc["spec"]["replicas"] >= 2
    (c,) = _containers(doc)
    assert c["args"] == ["serve"] and c["image"] == IMAGE
    assert c["ports"] == [{"name": "api", "containerPort": API_PORT, "protocol": "TCP"}]
    for probe in ("livenessProbe", "readinessProbe"):
        assert c[probe]["httpGet"] == {"path": HEALTH, "port": "api"}
    (svc,) = [d for d in _by_kind("Service") if d["metadata"]["name"] == "keyrotor-api"]
    assert svc["spec"]["selector"] == doc["spec"]["selector"]["matchLabels"]
    assert svc["spec"]["ports"][0]["targetPort"] == "api"
    config = _by_kind("ConfigMap")[0]["data"]
    assert config["KEYROTOR_API_PORT"] == str(API_PORT)


def test_systemd_api_unit() -> None:
    svc = _unit("keyrotor-api@.service")["Service"]
    assert svc["ExecStart"].endswith("/keyrotor serve")
    assert svc["Environment"] == "KEYROTOR_API_PORT=%i"
    assert (DEPLOY / "systemd" / "keyrotor-api@.service").is_file()
