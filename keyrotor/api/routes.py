"""The handlers of ``keyrotor serve``. Every one acts as the caller its token names
(``request[CALLER]``); the grants of that actor decide each scope, through ``KeyManager``."""

from __future__ import annotations

import asyncio
import json
from typing import Any

import structlog
from aiohttp import web

from keyrotor.api import bodies
from keyrotor.api.errors import MAX_MESSAGE_CHARS, ApiError, bad_request, body, from_keyrotor
from keyrotor.api.service import Caller, Service
from keyrotor.errors import AccessDenied, ConfigurationError, KeyrotorError, TransientError
from keyrotor.runs import RunNotFound
from keyrotor.store import db, repo
from keyrotor.store import tokens as token_store

log = structlog.get_logger("keyrotor.api")

SERVICE = web.AppKey("service", Service)
CALLER = web.RequestKey("caller", Caller)

_ENCRYPT = frozenset({"scope", "plaintext", "context"})
_DECRYPT = frozenset({"scope", "ciphertext", "context"})
_BATCH = frozenset({"scope", "items"})
_ENCRYPT_ITEM = frozenset({"plaintext", "context"})
_DECRYPT_ITEM = frozenset({"ciphertext", "context"})
MAX_RUN_ID = 2**63 - 1  # rotations.id is a bigint


def _ctx(request: web.Request) -> tuple[Service, Caller]:
    return request.app[SERVICE], request[CALLER]


async def encrypt(request: web.Request) -> web.Response:
    svc, caller = _ctx(request)
    doc = await bodies.read_object(request, _ENCRYPT)
    scope, plaintext = bodies.text(doc, "scope"), bodies.text(doc, "plaintext")
    context = bodies.text(doc, "context", required=False)
    ciphertext = await svc.km.encrypt(scope, plaintext, context=context, **caller.who())
    return web.json_response({"ciphertext": ciphertext})


async def decrypt(request: web.Request) -> web.Response:
    svc, caller = _ctx(request)
    doc = await bodies.read_object(request, _DECRYPT)
    scope, ciphertext = bodies.text(doc, "scope"), bodies.text(doc, "ciphertext")
    context = bodies.text(doc, "context", required=False)
    plaintext = await svc.km.decrypt(scope, ciphertext, context=context, **caller.who())
    return web.json_response({"plaintext": plaintext})


async def _batch(request: web.Request, *, decrypting: bool) -> web.Response:
    svc, caller = _ctx(request)
    doc = await bodies.read_object(request, _BATCH)
    scope = bodies.text(doc, "scope")
    items = bodies.items(doc, svc.settings.api_max_batch_items)
    svc.spend(caller, len(items) - 1, paid=1)  # the request itself paid for one
    await svc.valid_scope(caller, scope, "failed_decrypt" if decrypting else "encrypt")
    # Refused scopes fail the whole batch with one audited denial, not one per item.
    can_encrypt, can_decrypt = await svc.km.grants.permissions(caller.actor, scope)
    if not (can_decrypt if decrypting else can_encrypt):
        verb = "decrypt" if decrypting else "encrypt"
        raise await svc.refuse(caller, scope, verb, f"{caller.actor!r} may not {verb} in {scope!r}"[:300])
    # A malformed item is answered on its own and never reaches KeyManager.
    results: list[dict[str, Any] | None] = [None] * len(items)
    valid: list[tuple[int, tuple[str, str]]] = []
    allowed, field = (_DECRYPT_ITEM, "ciphertext") if decrypting else (_ENCRYPT_ITEM, "plaintext")
    for i, item in enumerate(items):
        try:
            valid.append((i, _item(item, allowed, field)))
        except ApiError as exc:
            results[i] = {"error": {"code": exc.code, "message": exc.message}}
    if decrypting:
        # One pass, its audit events committed together (KeyManager.decrypt_many).
        done = await svc.km.decrypt_many(scope, [pair for _, pair in valid], **caller.who())
        for (i, _), outcome in zip(valid, done, strict=True):
            results[i] = {"plaintext": outcome} if isinstance(outcome, str) else _item_error(outcome)
    else:
        done_enc = await asyncio.gather(*(_encrypt_one(svc, caller, scope, pair) for _, pair in valid))
        for (i, _), result in zip(valid, done_enc, strict=True):
            results[i] = result
    return web.json_response(
        {"results": results},
    )


async def _encrypt_one(svc: Service, caller: Caller, scope: str, pair: tuple[str, str]) -> dict[str, Any]:
    try:
        return {"ciphertext": await svc.km.encrypt(scope, pair[0], context=pair[1], **caller.who())}
    except (TransientError, AccessDenied):
        raise
    except KeyrotorError as exc:
        return _item_error(exc)


def _item_error(exc: KeyrotorError) -> dict[str, Any]:
    err = from_keyrotor(exc)
    return {"error": {"code": err.code, "message": err.message}}


def _item(item: Any, allowed: frozenset[str], field: str) -> tuple[str, str]:
    if not isinstance(item, dict):
        raise bad_request("each item must be a JSON object")
    bodies.check_keys(item, allowed, "item")
    return bodies.text(item, field), bodies.text(item, "context", required=False)


async def encrypt_batch(request: web.Request) -> web.Response:
    return await _batch(request, decrypting=False)


async def decrypt_batch(request: web.Request) -> web.Response:
    return await _batch(request, decrypting=True)


async def get_secret(request: web.Request) -> web.Response:
    svc, caller = _ctx(request)
    scope, name = bodies.path_text(request, "scope"), bodies.path_text(request, "name")
    value = await svc.km.get_secret(scope, name, **caller.who())
    return web.json_response({"scope": scope, "name": name, "value": value})


async def put_secret(request: web.Request) -> web.Response:
    svc, caller = _ctx(request)
    scope, name = bodies.path_text(request, "scope"), bodies.path_text(request, "name")
    doc = await bodies.read_object(request, frozenset({"value"}))
    await svc.km.put_secret(scope, name, bodies.text(doc, "value"), **caller.who())
    return web.json_response({"scope": scope, "name": name})


async def _may_manage(svc: Service, caller: Caller, scope: str | None) -> bool:
    """Rotating a scope or reading its runs needs both permissions on it; a run of no scope
    (a KEK rotation) is nobody's over HTTP."""
    if scope is None:
        return False
    can_encrypt, can_decrypt = await svc.km.grants.permissions(caller.actor, scope)
    return can_encrypt and can_decrypt


def _denial(caller: Caller, scope: str | None, operation: str) -> str:
    return f"{caller.actor!r} may not {operation} scope {scope!r}: it needs encrypt and decrypt"[:300]


async def _require(svc: Service, caller: Caller, scope: str | None, operation: str) -> None:
    if not await _may_manage(svc, caller, scope):
        raise await svc.refuse(caller, scope, operation, _denial(caller, scope, operation))


async def rotate(request: web.Request) -> web.Response:
    svc, caller = _ctx(request)
    scope = await svc.valid_scope(caller, bodies.path_text(request, "scope"), "rotate")
    await _require(svc, caller, scope, "rotate")
    client = await svc.rotation_client()
    handle = await client.rotate(scope, trigger=f"api:{caller.actor}"[:200])
    run = await handle.status()
    return web.json_response(
        {"run_id": handle.run_id, "created": handle.created, "state": run.state}, status=202
    )


async def get_run(request: web.Request) -> web.Response:
    svc, caller = _ctx(request)
    raw = request.match_info["id"]
    # ASCII digits only: int() would also take a sign, spaces, '_' and other scripts' digits.
    if not (raw.isascii() and raw.isdigit()):
        raise bad_request("a run id is a whole number written in the digits 0-9")
    missing = ApiError(404, "not_found", f"no run {raw}"[:MAX_MESSAGE_CHARS])
    if len(raw) > len(str(MAX_RUN_ID)) or int(raw) > MAX_RUN_ID:
        raise missing  # past the bigint of rotations.id: no such run can exist
    run_id = int(raw)
    client = await svc.rotation_client()
    try:
        run = await client.status(run_id)
    except RunNotFound:
        raise missing from None
    if not await _may_manage(svc, caller, run.scope):
        # The answer a missing run gets: a 403 would tell the caller that the id exists and
        # which (tenant) scope it belongs to. The audit log keeps the refusal.
        reason = _denial(caller, run.scope, "read runs of")
        await svc.audit_denial(caller, run.scope, "read runs of", reason, run_id=run_id)
        raise missing
    return web.json_response(run.as_dict())


async def status(request: web.Request) -> web.Response:
    """The scopes the caller may use (encrypt or decrypt), with their keys and open runs."""
    svc, caller = _ctx(request)
    async with db.transaction(svc.km.sessions) as session:
        scopes = await repo.status(session)
    visible = []
    for s in scopes:
        if any(await svc.km.grants.permissions(caller.actor, s["scope"])):
            visible.append(s)
    return web.json_response({"actor": caller.actor, "scopes": visible}, dumps=_dumps)


def _dumps(doc: Any) -> str:
    return json.dumps(doc, default=str)


async def health(request: web.Request) -> web.Response:
    """Unauthenticated: ``ok`` when the database answers with keyrotor's schema; else 503, the
    error's code ``misconfigured`` for a database without the schema (no retry mends it) and
    ``unavailable`` for one that does not answer. Nothing else is said."""
    svc = request.app[SERVICE]
    try:
        async with asyncio.timeout(3.0):
            async with db.transaction(svc.km.sessions) as session:
                await token_store.reachable(session)
    except ConfigurationError as exc:
        # The database answers but is not usable as configured (no keyrotor schema: `keyrotor db
        # upgrade`): a probe still fails, but the code tells a client not to wait for it to pass.
        log.warning("health_misconfigured", error=f"{type(exc).__name__}: {exc}")
        err = from_keyrotor(exc)
        return web.json_response({"status": "unavailable", **body(err.code, err.message)}, status=503)
    except (TimeoutError, KeyrotorError, OSError):
        # The error envelope every other answer uses, next to the status a probe reads.
        doc = {"status": "unavailable", **body("unavailable", "the database does not answer")}
        return web.json_response(doc, status=503)
    return web.json_response({"status": "ok"})


def add_routes(app: web.Application) -> None:
    r = app.router
    r.add_post("/v1/encrypt", encrypt)
    r.add_post("/v1/decrypt", decrypt)
    r.add_post("/v1/encrypt/batch", encrypt_batch)
    r.add_post("/v1/decrypt/batch", decrypt_batch)
    r.add_get("/v1/secrets/{scope:.+}/{name:[^/]+}", get_secret)
    r.add_put("/v1/secrets/{scope:.+}/{name:[^/]+}", put_secret)
    r.add_post("/v1/rotate/{scope:.+}", rotate)
    r.add_get("/v1/runs/{id}", get_run)
    r.add_get("/v1/status", status)
    r.add_get("/v1/health", health)
