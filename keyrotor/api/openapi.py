"""The OpenAPI 3.1 document of ``keyrotor serve``, served at ``/v1/openapi.json``.

``docs/openapi.json`` is this document as written by ``python -m keyrotor.api.openapi``; a test
keeps the file, this module and the routes in step.
"""

from __future__ import annotations

import json
import sys
from typing import Any

from aiohttp import web

PATH = "/v1/openapi.json"
VERSION = "1.0.0"


def _ref(name: str) -> dict[str, str]:
    return {"$ref": f"#/components/schemas/{name}"}


def _json(schema: dict[str, Any]) -> dict[str, Any]:
    return {"content": {"application/json": {"schema": schema}}}


def _obj(required: list[str], **props: Any) -> dict[str, Any]:
    return {"type": "object", "required": required, "properties": props, "additionalProperties": False}


_STR = {"type": "string"}
_ERRORS = {
    "400": "invalid request, value, scope or ciphertext (wrong context or tampered: decryption_failed)",
    "401": "missing, unknown, expired or revoked token",
    "403": "the token's actor has no grant for this scope (audited as unauthorized)",
    "404": "no such secret, scope or run",
    "409": "conflicts with the current state (e.g. key_exhausted)",
    "413": "body larger than KEYROTOR_API_MAX_BODY_BYTES, or more items than KEYROTOR_API_MAX_BATCH_ITEMS",
    "429": "this token is over its rate limit (Retry-After says when to retry)",
    "503": (
        "code unavailable: a dependency is down, retry later; code misconfigured: the server's "
        "configuration or database schema is wrong, which no retry mends"
    ),
}


def _op(
    summary: str,
    ok: dict[str, Any],
    *,
    body: dict[str, Any] | None = None,
    status: str = "200",
    errors: dict[str, str | None] | None = None,
) -> dict[str, Any]:
    """An operation answering ``_ERRORS``, with ``errors`` replacing (or, as None, removing) some."""
    described = {**_ERRORS, **(errors or {})}
    op: dict[str, Any] = {
        "summary": summary,
        "security": [{"bearer": []}],
        "responses": {status: {"description": "success", **_json(ok)}}
        | {
            code: {"description": text, **_json(_ref("Error"))}
            for code, text in described.items()
            if text is not None
        },
    }
    if body is not None:
        op["requestBody"] = {"required": True, **_json(body)}
    return op


_SCOPE_PARAM = {
    "name": "scope",
    "in": "path",
    "required": True,
    "schema": _STR,
    "description": "a scope; a '/' in it may be sent as is or as %2F",
}
_NAME_PARAM = {
    "name": "name",
    "in": "path",
    "required": True,
    "schema": _STR,
    "description": "a secret name (1-200 printable characters, not '.' or '..'), percent-encoded "
    "as encodeURIComponent does: a '/' in it must be sent as %2F",
}


def _item_result(field: str) -> dict[str, Any]:
    return {"oneOf": [_obj([field], **{field: _STR}), _obj(["error"], error=_ref("ErrorDetail"))]}


def _schemas() -> dict[str, Any]:
    return {
        "ErrorDetail": _obj(
            ["code", "message"],
            code={
                **_STR,
                "description": "stable: e.g. not_found (no such resource), no_route (no such path)",
            },
            message=_STR,
        ),
        "Error": _obj(["error"], error=_ref("ErrorDetail")),
        "EncryptRequest": _obj(["scope", "plaintext"], scope=_STR, plaintext=_STR, context=_STR),
        "DecryptRequest": _obj(["scope", "ciphertext"], scope=_STR, ciphertext=_STR, context=_STR),
        "EncryptBatchRequest": _obj(
            ["scope", "items"],
            scope=_STR,
            items={
                "type": "array",
                "minItems": 1,
                "items": _obj(["plaintext"], plaintext=_STR, context=_STR),
            },
        ),
        "DecryptBatchRequest": _obj(
            ["scope", "items"],
            scope=_STR,
            items={
                "type": "array",
                "minItems": 1,
                "items": _obj(["ciphertext"], ciphertext=_STR, context=_STR),
            },
        ),
        "EncryptBatchResponse": _obj(
            ["results"], results={"type": "array", "items": _item_result("ciphertext")}
        ),
        "DecryptBatchResponse": _obj(
            ["results"], results={"type": "array", "items": _item_result("plaintext")}
        ),
        "Secret": _obj(["scope", "name", "value"], scope=_STR, name=_STR, value=_STR),
        "Run": {
            "type": "object",
            "required": ["id", "kind", "state"],
            "properties": {
                "id": {"type": "integer"},
                "kind": _STR,
                "scope": {"type": ["string", "null"]},
                "state": _STR,
            },
        },
    }


def _paths() -> dict[str, Any]:
    return _value_paths() | _management_paths() | _public_paths()


def _value_paths() -> dict[str, Any]:
    secret = {
        "parameters": [_SCOPE_PARAM, _NAME_PARAM],
        "get": _op("Read and decrypt one of keyrotor's own secrets", _ref("Secret")),
        "put": _op(
            "Store (or replace) a secret",
            _obj(["scope", "name"], scope=_STR, name=_STR),
            body=_obj(["value"], value=_STR),
        ),
    }
    return {
        "/v1/encrypt": {
            "post": _op("Encrypt a value", _obj(["ciphertext"], ciphertext=_STR), body=_ref("EncryptRequest"))
        },
        "/v1/decrypt": {
            "post": _op("Decrypt a value", _obj(["plaintext"], plaintext=_STR), body=_ref("DecryptRequest"))
        },
        "/v1/encrypt/batch": {
            "post": _op(
                "Encrypt many values of one scope; errors are per item",
                _ref("EncryptBatchResponse"),
                body=_ref("EncryptBatchRequest"),
            )
        },
        "/v1/decrypt/batch": {
            "post": _op(
                "Decrypt many values of one scope; errors are per item",
                _ref("DecryptBatchResponse"),
                body=_ref("DecryptBatchRequest"),
            )
        },
        "/v1/secrets/{scope}/{name}": secret,
    }


def _management_paths() -> dict[str, Any]:
    return {
        "/v1/rotate/{scope}": {
            "parameters": [_SCOPE_PARAM],
            "post": _op(
                "Open (or join) a DEK rotation of the scope; needs encrypt and decrypt grants",
                _obj(
                    ["run_id", "created", "state"],
                    run_id={"type": "integer"},
                    created={"type": "boolean"},
                    state=_STR,
                ),
                status="202",
            ),
        },
        "/v1/runs/{id}": {
            "parameters": [
                {
                    "name": "id",
                    "in": "path",
                    "required": True,
                    "schema": {"type": "integer", "minimum": 0},
                    "description": "the digits 0-9 only (no sign, spaces or separators)",
                }
            ],
            "get": _op(
                "One run (rotation, retirement); needs encrypt and decrypt grants on its scope",
                _ref("Run"),
                errors={
                    "403": None,
                    "404": "no such run, or a run the token's actor may not read (one of a scope "
                    "it cannot both encrypt and decrypt in, or of no scope): the same answer, so "
                    "an id says nothing about a run out of reach; the refusal of an existing run "
                    "is audited as unauthorized",
                },
            ),
        },
        "/v1/status": {
            "get": _op(
                "The scopes the caller may use, with their keys and open runs",
                {
                    "type": "object",
                    "required": ["actor", "scopes"],
                    "properties": {"actor": _STR, "scopes": {"type": "array", "items": {"type": "object"}}},
                },
            )
        },
    }


def _public_paths() -> dict[str, Any]:
    """The routes without authentication: a load balancer's probe and this document."""
    return {
        "/v1/health": {
            "get": {
                "summary": "Liveness and database reachability; unauthenticated, says nothing secret",
                "security": [],
                "responses": {
                    "200": {"description": "ok", **_json(_obj(["status"], status={"const": "ok"}))},
                    "503": {
                        "description": (
                            "unavailable (the error envelope, with the status a probe reads; its code "
                            "is misconfigured for a database without keyrotor's schema)"
                        ),
                        **_json(
                            _obj(
                                ["status", "error"],
                                status={"const": "unavailable"},
                                error=_ref("ErrorDetail"),
                            )
                        ),
                    },
                },
            }
        },
        PATH: {
            "get": {
                "summary": "This document",
                "security": [],
                "responses": {"200": {"description": "OpenAPI 3.1", **_json({"type": "object"})}},
            }
        },
    }


def document() -> dict[str, Any]:
    """The OpenAPI document."""
    return {
        "openapi": "3.1.0",
        "info": {
            "title": "keyrotor",
            "version": VERSION,
            "description": "Envelope encryption over HTTP: the actor of every call is the one its "
            "bearer token names (`keyrotor tokens create ACTOR`).",
        },
        "servers": [{"url": "http://127.0.0.1:8180"}],
        "components": {
            "schemas": _schemas(),
            "securitySchemes": {"bearer": {"type": "http", "scheme": "bearer"}},
        },
        "security": [{"bearer": []}],
        "paths": _paths(),
    }


def dumps() -> str:
    """The document as ``docs/openapi.json`` holds it."""
    return json.dumps(document(), indent=2, sort_keys=True) + "\n"


def add_route(app: web.Application) -> None:
    text = dumps()

    async def handler(request: web.Request) -> web.Response:
        return web.Response(text=text, content_type="application/json")

    app.router.add_get(PATH, handler)


if __name__ == "__main__":  # pragma: no cover
    sys.stdout.write(dumps())
