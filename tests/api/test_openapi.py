"""docs/openapi.json is the document the server serves, and it names exactly the routes it has."""

from __future__ import annotations

import json
import re
from pathlib import Path

from keyrotor.api import openapi
from keyrotor.api.app import create_app
from keyrotor.settings import Settings
from tests.api.conftest import Api

ROOT = Path(__file__).resolve().parents[2]


def _routes() -> set[tuple[str, str]]:
    app = create_app(Settings())
    found = set()
    for route in app.router.routes():
        if route.method in ("HEAD", "OPTIONS"):
            continue
        path = route.resource.canonical if route.resource is not None else ""
        # aiohttp's {scope:.+} is OpenAPI's {scope}
        found.add((route.method.lower(), re.sub(r"\{(\w+):[^}]*\}", r"{\1}", path)))
    return found


def test_checked_in_document_is_current() -> None:
    assert (ROOT / "docs" / "openapi.json").read_text() == openapi.dumps(), (
        "regenerate it: python -m keyrotor.api.openapi > docs/openapi.json"
    )


def test_document_and_routes_match() -> None:
    doc = openapi.document()
    assert doc["openapi"].startswith("3.1")
    documented = {
        (method, path)
        for path, item in doc["paths"].items()
        for method in item
        if method in ("get", "put", "post", "delete", "patch")
    }
    assert documented == _routes()


def test_every_ref_resolves() -> None:
    text = openapi.dumps()
    schemas = openapi.document()["components"]["schemas"]
    for name in re.findall(r'"#/components/schemas/(\w+)"', text):
        assert name in schemas


async def test_served_document(api: Api) -> None:
    resp = await api.client.get(openapi.PATH)
    assert resp.status == 200 and json.loads(await resp.text()) == openapi.document()
