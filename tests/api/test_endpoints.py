"""The endpoints of ``keyrotor serve``: round trips with Python, errors, grants, audit, limits."""

from __future__ import annotations

import json
from typing import Any

import asyncpg

from keyrotor.api import tokens
from keyrotor.audit.grants import revoke_access
from keyrotor.store import db
from tests.api.conftest import Api


async def _post(api: Api, path: str, doc: Any, token: str | None = None) -> tuple[int, Any]:
    resp = await api.client.post(path, json=doc, headers=api.auth(token))
    return resp.status, await resp.json()


async def test_encrypt_decrypt_round_trip_with_python(api: Api) -> None:
    status, doc = await _post(api, "/v1/encrypt", {"scope": "openai", "plaintext": "sk-1", "context": "s:1"})
    assert status == 200 and doc["ciphertext"].startswith("kr1:")
    assert await api.km.decrypt("openai", doc["ciphertext"], context="s:1") == "sk-1"
    theirs = await api.km.encrypt("openai", "sk-2", context="s:2")
    status, doc = await _post(api, "/v1/decrypt", {"scope": "openai", "ciphertext": theirs, "context": "s:2"})
    assert (status, doc) == (200, {"plaintext": "sk-2"})


async def test_wrong_context_and_tampering_are_refused(api: Api) -> None:
    ct = await api.km.encrypt("openai", "sk-1", context="s:1")
    status, doc = await _post(api, "/v1/decrypt", {"scope": "openai", "ciphertext": ct, "context": "s:2"})
    assert status == 400 and doc["error"]["code"] == "decryption_failed"
    tampered = ct[:-2] + ("AA" if not ct.endswith("AA") else "BB")
    status, doc = await _post(
        api, "/v1/decrypt", {"scope": "openai", "ciphertext": tampered, "context": "s:1"}
    )
    assert status == 400 and doc["error"]["code"] == "decryption_failed"
    status, doc = await _post(api, "/v1/decrypt", {"scope": "other", "ciphertext": ct, "context": "s:1"})
    assert status in (400, 404) and "error" in doc


async def test_batches_report_errors_per_item(api: Api) -> None:
    items = [{"plaintext": "a", "context": "c:1"}, {"plaintext": ""}, {"plaintext": 5}, "x"]
    status, doc = await _post(api, "/v1/encrypt/batch", {"scope": "openai", "items": items})
    assert status == 200
    results = doc["results"]
    assert "ciphertext" in results[0] and all("error" in r for r in results[1:])
    dec = [{"ciphertext": results[0]["ciphertext"], "context": "c:1"}, {"ciphertext": "kr1:nope"}]
    status, doc = await _post(api, "/v1/decrypt/batch", {"scope": "openai", "items": dec})
    assert status == 200 and doc["results"][0] == {"plaintext": "a"} and "error" in doc["results"][1]


async def test_secrets_put_and_get(api: Api) -> None:
    resp = await api.client.put(
        "/v1/secrets/tenant-1/openai/api_key", json={"value": "sk-9"}, headers=api.auth()
    )
    assert resp.status == 200, await resp.text()
    assert await api.km.get_secret("tenant-1/openai", "api_key") == "sk-9"
    resp = await api.client.get("/v1/secrets/tenant-1%2Fopenai/api_key", headers=api.auth())
    assert resp.status == 200 and (await resp.json())["value"] == "sk-9"
    resp = await api.client.get("/v1/secrets/tenant-1/openai/missing", headers=api.auth())
    assert resp.status == 404 and (await resp.json())["error"]["code"] == "not_found"


async def test_authentication(api: Api) -> None:
    for headers in ({}, {"Authorization": "Bearer krt_" + "A" * 43}, {"Authorization": "Basic abc"}):
        resp = await api.client.post("/v1/encrypt", json={"scope": "s", "plaintext": "v"}, headers=headers)
        assert resp.status == 401 and (await resp.json())["error"]["code"] == "unauthenticated"
    resp = await api.client.get("/v1/health")
    assert resp.status == 200 and await resp.json() == {"status": "ok"}
    resp = await api.client.get("/v1/openapi.json")
    assert resp.status == 200
    for path in ("/v1/health", "/v1/openapi.json"):  # a load balancer may probe with HEAD
        resp = await api.client.head(path)
        assert resp.status == 200, path
    resp = await api.client.head("/v1/status")
    assert resp.status == 401


async def test_revoked_and_expired_tokens(api: Api, database_url: str) -> None:
    token = await api.token_for("svc", days=1)
    issued_id = (await tokens.list_tokens(api.km.sessions))[-1].id
    assert (await _post(api, "/v1/encrypt", {"scope": "s", "plaintext": "v"}, token))[0] == 200
    conn = await asyncpg.connect(database_url)
    try:
        await conn.execute(
            "UPDATE api_tokens SET expires_at = now() - interval '1 second' WHERE id = $1", issued_id
        )
        assert (await _post(api, "/v1/encrypt", {"scope": "s", "plaintext": "v"}, token))[0] == 401
        await conn.execute("UPDATE api_tokens SET expires_at = NULL WHERE id = $1", issued_id)
        assert (await _post(api, "/v1/encrypt", {"scope": "s", "plaintext": "v"}, token))[0] == 200
    finally:
        await conn.close()
    await tokens.revoke_token(api.km.sessions, issued_id, by="admin")
    assert (await _post(api, "/v1/encrypt", {"scope": "s", "plaintext": "v"}, token))[0] == 401


async def test_grants_decide_and_denials_are_audited(api: Api, database_url: str) -> None:
    async with db.transaction(api.km.sessions) as session:
        await revoke_access(session, "*", "*", encrypt=True, decrypt=True, by="admin")
    await api.km.grant("bob", "public", encrypt=True, decrypt=True, by="admin")
    api.km.grants.invalidate()
    bob = await api.token_for("bob")
    assert (await _post(api, "/v1/encrypt", {"scope": "public", "plaintext": "v"}, bob))[0] == 200
    headers = {**api.auth(bob), "User-Agent": "probe/1", "X-Forwarded-For": "203.0.113.9"}
    calls = [
        ("/v1/encrypt", {"scope": "tenant-a", "plaintext": "v", "context": "x:1"}),
        ("/v1/decrypt", {"scope": "tenant-a", "ciphertext": "kr1:1:AAAA"}),
        ("/v1/encrypt/batch", {"scope": "tenant-a", "items": [{"plaintext": "v"}]}),
        ("/v1/rotate/tenant-a", None),
    ]
    for path, doc in calls:
        resp = await api.client.post(path, json=doc, headers=headers)
        assert resp.status == 403, (path, await resp.text())
        assert (await resp.json())["error"]["code"] == "forbidden"
    await api.km.flush_audit()
    conn = await asyncpg.connect(database_url)
    try:
        rows = await conn.fetch(
            "SELECT actor, ip_address, user_agent FROM encryption_audit_log WHERE event_type = 'unauthorized'"
        )
        written = await conn.fetchval("SELECT count(*) FROM key_scopes WHERE name = 'tenant-a'")
    finally:
        await conn.close()
    assert len(rows) == len(calls)
    # the actor is the token's; X-Forwarded-For is ignored without a trusted proxy
    assert {(r["actor"], r["ip_address"], r["user_agent"]) for r in rows} == {("bob", "127.0.0.1", "probe/1")}
    assert written == 0


async def test_text_that_is_not_a_scope_is_refused_before_the_grants(api: Api, database_url: str) -> None:
    """Batch and rotate routes check grants themselves; an invalid scope name (here with a key
    pasted into it) is a 400 like a single call's, and never reaches a denial or its event."""
    async with db.transaction(api.km.sessions) as session:
        await revoke_access(session, "*", "*", encrypt=True, decrypt=True, by="admin")
    api.km.grants.invalidate()
    bob = await api.token_for("bob")
    pasted = "sk-live-PASTED-KEY-0123456789abcdef"
    scope = pasted
    calls = [
        ("/v1/encrypt/batch", {"scope": scope, "items": [{"plaintext": "v"}]}),
        ("/v1/decrypt/batch", {"scope": scope, "items": [{"ciphertext": "kr1:1:AAAA"}]}),
        ("/v1/encrypt", {"scope": scope, "plaintext": "v"}),
        (f"/v1/rotate/{scope.replace(' ', '%20')}", None),
    ]
    answers = []
    for path, doc in calls:
        resp = await api.client.post(path, json=doc, headers=api.auth(bob))
        answers.append(await resp.text())
        assert resp.status == 400, (path, answers[-1])
        assert (await resp.json())["error"]["code"] == "invalid_input"
    await api.km.flush_audit()
    conn = await asyncpg.connect(database_url)
    try:
        rows = await conn.fetch("SELECT * FROM encryption_audit_log WHERE actor = 'bob'")
    finally:
        await conn.close()
    assert sorted(r["event_type"] for r in rows) == ["encrypt", "encrypt", "failed_decrypt", "rotate"]
    assert all(not r["success"] and r["scope"] is None for r in rows)
    assert all(r["error_message"].startswith("InvalidScope") for r in rows)
    # Not the key, nor any piece of it: the refusal says what is wrong and where, not the text.
    pieces = ["PASTED", "KEY-0", "sk-live", "89abcdef"]
    assert all(p not in text for p in pieces for text in [*answers, *map(repr, rows)])


async def test_bad_requests_are_json(api: Api) -> None:
    resp = await api.client.post("/v1/encrypt", data=b"{not json", headers=api.auth())
    assert resp.status == 400 and (await resp.json())["error"]["code"] == "invalid_request"
    status, doc = await _post(api, "/v1/encrypt", {"scope": "s", "plaintext": "v", "actor": "root"})
    assert status == 400 and "actor" in doc["error"]["message"]
    resp = await api.client.get("/v1/nothing", headers=api.auth())
    assert resp.status == 404 and (await resp.json())["error"]["code"] == "no_route"
    resp = await api.client.post("/v1/encrypt", data=b"x" * (2 * 1024 * 1024), headers=api.auth())
    assert resp.status == 413 and (await resp.json())["error"]["code"] == "too_large"
    items = [{"plaintext": "v"}] * 1001
    status, doc = await _post(api, "/v1/encrypt/batch", {"scope": "s", "items": items})
    assert status == 413 and doc["error"]["code"] == "too_many_items"


async def test_status_and_runs(api: Api) -> None:
    await _post(api, "/v1/encrypt", {"scope": "openai", "plaintext": "v"})
    resp = await api.client.get("/v1/status", headers=api.auth())
    doc = await resp.json()
    assert resp.status == 200 and doc["actor"] == "app" and [s["scope"] for s in doc["scopes"]] == ["openai"]
    resp = await api.client.get("/v1/runs/999999", headers=api.auth())
    assert resp.status == 404


async def test_a_run_out_of_reach_is_answered_as_a_missing_one(api: Api, database_url: str) -> None:
    """``GET /v1/runs/{id}`` without a grant on the run's scope: the same 404 as for an id that
    does not exist, so run ids cannot be probed for their existence or their (tenant) scope; the
    denial of an existing run is still audited, a miss is not."""
    await api.km.encrypt("tenant-secret-42", "sk-1")
    status, opened = await _post(api, "/v1/rotate/tenant-secret-42", None)
    assert status == 202, opened
    run_id = opened["run_id"]
    async with db.transaction(api.km.sessions) as session:
        await revoke_access(session, "*", "*", encrypt=True, decrypt=True, by="admin")
    await api.km.grant("bob", "public", encrypt=True, decrypt=True, by="admin")
    api.km.grants.invalidate()
    bob = await api.token_for("bob")
    missing = run_id + 1000
    answers = {}
    for rid in (run_id, missing):
        resp = await api.client.get(f"/v1/runs/{rid}", headers=api.auth(bob))
        answers[rid] = (resp.status, dict(resp.headers).get("Content-Type"), await resp.json())
    assert answers[run_id][0] == 404, answers[run_id]
    assert answers[run_id] == (
        answers[missing][0],
        answers[missing][1],
        {"error": {"code": "not_found", "message": f"no run {run_id}"}},
    )
    assert answers[missing][2] == {"error": {"code": "not_found", "message": f"no run {missing}"}}
    assert "tenant-secret-42" not in repr(answers)
    conn = await asyncpg.connect(database_url)
    try:
        rows = await conn.fetch(
            "SELECT scope, metadata FROM encryption_audit_log "
            "WHERE event_type = 'unauthorized' AND actor = 'bob'"
        )
    finally:
        await conn.close()
    assert len(rows) == 1 and rows[0]["scope"] == "tenant-secret-42"
    assert json.loads(rows[0]["metadata"])["run_id"] == run_id
    await api.km.grant("bob", "tenant-secret-42", encrypt=True, by="admin")
    resp = await api.client.get(f"/v1/runs/{run_id}", headers=api.auth(bob))
    assert resp.status == 404  # encrypt alone is not enough
    await api.km.grant("bob", "tenant-secret-42", decrypt=True, by="admin")
    resp = await api.client.get(f"/v1/runs/{run_id}", headers=api.auth(bob))
    assert resp.status == 200 and (await resp.json())["scope"] == "tenant-secret-42"


async def test_a_run_id_is_a_positive_bigint_read_strictly(api: Api) -> None:
    """An id past bigint is a run that cannot exist (404, no statement sent, not the database's
    refusal by its type name); text that is not ASCII digits is a 400, not read as a number
    (int() takes '+5', ' 5', '1_0' and other scripts' digits)."""
    for rid in ("9223372036854775808", "99999999999999999999"):
        resp = await api.client.get(f"/v1/runs/{rid}", headers=api.auth())
        assert resp.status == 404, await resp.text()
        assert await resp.json() == {"error": {"code": "not_found", "message": f"no run {rid}"}}
    for rid in ("%2B5", "%205", "1_0", "%D9%A3", "-1", "0x1", "abc"):
        resp = await api.client.get(f"/v1/runs/{rid}", headers=api.auth())
        assert resp.status == 400, (rid, await resp.text())
        assert (await resp.json())["error"]["code"] == "invalid_request"
