"""arq payloads are JSON: no pickle from Redis into a process that holds the KEK."""

from __future__ import annotations

import pickle
from datetime import UTC, datetime

import pytest
from arq.jobs import DeserializationError, deserialize_job_raw, serialize_job

from keyrotor.errors import DecryptionFailed, KekMismatch, KeyrotorError
from keyrotor.queue.serialization import RemoteJobError, deserialize, serialize


def test_job_payload_round_trip() -> None:
    raw = serialize_job("rotate_dek", ("anthropic",), {"trigger": "api"}, 1, 1000, serializer=serialize)
    assert raw is not None and raw.startswith(b"{")
    name, args, kwargs, job_try, _ = deserialize_job_raw(raw, deserializer=deserialize)
    assert (name, list(args), kwargs, job_try) == ("rotate_dek", ["anthropic"], {"trigger": "api"}, 1)


def test_keyrotor_errors_travel_by_name_and_message() -> None:
    for exc in (DecryptionFailed("row 7 failed"), KekMismatch("cannot unwrap DEK v1 of scope 'a'")):
        back = deserialize(serialize({"r": exc}))["r"]
        assert type(back) is type(exc)
        assert str(back) == str(exc)


def test_foreign_errors_lose_their_text() -> None:
    back = deserialize(serialize({"r": ValueError("sk-ant-secret-looking-text")}))["r"]
    assert isinstance(back, RemoteJobError) and isinstance(back, KeyrotorError)
    assert "sk-ant" not in str(back) and "ValueError" in str(back)


def test_unknown_error_names_do_not_import_anything() -> None:
    back = deserialize(b'{"r": {"__keyrotor_error__": "os.system", "message": "x"}}')["r"]
    assert type(back) is RemoteJobError


def test_pickle_payloads_are_refused() -> None:
    evil = pickle.dumps({"f": "rotate_dek", "a": (), "k": {}, "t": 1, "et": 0})
    with pytest.raises(DeserializationError):
        deserialize_job_raw(evil, deserializer=deserialize)


def test_datetimes_and_dataclasses() -> None:
    now = datetime(2026, 11, 28, tzinfo=UTC)
    assert deserialize(serialize({"t": now})) == {"t": now.isoformat()}
    with pytest.raises(TypeError):
        serialize({"x": object()})
