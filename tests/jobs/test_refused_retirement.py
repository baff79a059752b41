"""A retirement refused at request time (a location the census cannot count) is audited once, by
whoever fails its run: the request that opened the run, or the attempt of a run the request only
joined, whose proof refuses in its own transaction."""

from __future__ import annotations

import json
from typing import Any

import pytest

from keyrotor import KeyManager, Settings, runs
from keyrotor.queue.client import KeyrotorClient
from keyrotor.rotation import dek as rotation
from keyrotor.rotation import retire
from keyrotor.rotation.context import RotationContext
from keyrotor.rotation.retire import LocationNotCovered
from keyrotor.store import db
from tests.jobs.conftest import settings_of
from tests.rotation_helpers import fetch, seed

SCOPE = "openai"
APP_CONTEXT = "users.api_key:42"  # a value in an application table nobody registered


async def _v1_with_an_uncovered_value(s: Settings) -> None:
    """v1 holds a value of ``users.api_key`` (not registered), and the scope is rotated to v2."""
    await seed(s, SCOPE, 3)
    async with KeyManager(s) as km:
        await km.encrypt(SCOPE, "sk-app-value-0123456789", context=APP_CONTEXT)
        await rotation.rotate_dek(RotationContext(km.sessions, km.kek, s), SCOPE)


async def _failed_retire_events(s: Settings) -> list[dict[str, Any]]:
    rows = await fetch(
        s.database_url,
        "SELECT scope, key_version, success, error_message, metadata FROM encryption_audit_log "
        "WHERE event_type = 'retire' ORDER BY id",
    )
    return [{**dict(r), "metadata": json.loads(r["metadata"])} for r in rows]


async def _run(s: Settings, run_id: int) -> runs.RunInfo:
    async with KeyManager(s) as km, db.transaction(km.sessions) as session:
        return await runs.require_run(session, run_id)


async def test_a_refused_request_fails_its_new_run_and_audits_the_refusal_once(wenv: dict[str, str]) -> None:
    s = settings_of(wenv, KEYROTOR_LISTEN_KEY_CHANGES="false")
    await _v1_with_an_uncovered_value(s)
    async with KeyManager(s), KeyrotorClient(s) as client:  # the KeyManager loads the audit key
        with pytest.raises(LocationNotCovered) as refused:
            await client.retire(SCOPE, 1, force_now=True, request_id="req-refused-1")
        (run,) = [r for r in await client.runs(scope=SCOPE) if r.kind == "retire"]
    message = f"LocationNotCovered: {refused.value}"
    assert run.state == "failed" and run.error == message
    (event,) = await _failed_retire_events(s)
    assert (event["scope"], event["key_version"], event["success"]) == (SCOPE, 1, False)
    assert event["error_message"] == message
    assert event["metadata"]["run_id"] == run.id and event["metadata"]["request_id"] == "req-refused-1"
    # A worker's attempt at the failed run (its job, had one been enqueued) records nothing more.
    async with KeyManager(s) as km:
        rc = RotationContext(km.sessions, km.kek, s)
        result = await retire.retire_dek(rc, SCOPE, 1, force_now=True, run_id=run.id)
    assert result.run.state == "failed"
    assert len(await _failed_retire_events(s)) == 1


async def test_a_refused_request_leaves_an_open_run_to_its_attempt_whose_proof_fails_and_audits_it(
    wenv: dict[str, str],
) -> None:
    """The scheduler opened the retirement; a client asks for it too. The client is refused, but
    the run is not failed under the attempt working on it: that attempt's proof refuses the same
    location, fails the run and audits it, once."""
    s = settings_of(wenv, KEYROTOR_LISTEN_KEY_CHANGES="false")
    await _v1_with_an_uncovered_value(s)
    async with KeyManager(s) as km:
        async with db.transaction(km.sessions) as session:
            sid = (await fetch(s.database_url, "SELECT id FROM key_scopes WHERE name = $1", SCOPE))[0][0]
            opened, created = await runs.open_run(
                session, "retire", sid, trigger="scheduler", from_version=1, detail={"force_now": True}
            )
        assert created
        async with KeyrotorClient(s) as client:
            with pytest.raises(LocationNotCovered, match=r"users\.api_key"):
                await client.retire(SCOPE, 1, force_now=True, request_id="req-joined-1")
        joined = await _run(s, opened.id)
        assert joined.state == "pending" and joined.error is None
        assert joined.request_ids == ["req-joined-1"]  # the requester can find the run it joined
        assert await _failed_retire_events(s) == []
        # The run's own attempt (the job the scheduler enqueued).
        rc = RotationContext(km.sessions, km.kek, s)
        with pytest.raises(LocationNotCovered) as refused:
            await retire.retire_dek(rc, SCOPE, 1, force_now=True, trigger="scheduler", run_id=opened.id)
    failed = await _run(s, opened.id)
    assert failed.state == "failed" and failed.error == f"LocationNotCovered: {refused.value}"
    (event,) = await _failed_retire_events(s)
    assert event["success"] is False and event["error_message"] == failed.error
    assert event["metadata"]["run_id"] == opened.id and event["metadata"]["request_id"] == "req-joined-1"
    assert await fetch(s.database_url, "SELECT state FROM data_keys WHERE version = 1") == [("grace",)]
