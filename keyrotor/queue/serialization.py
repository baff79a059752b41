"""JSON for arq job payloads and results, instead of arq's default pickle.

With pickle, anyone who can write to Redis can make a worker (which holds the KEK) run code
of their choosing. Jobs here take and return only names, versions, ids, counts and small
reports, so JSON carries all of it. Failed jobs' exceptions travel as their class name and
message (keyrotor's messages never contain secrets; other exceptions travel by class name
only) and come back as :class:`keyrotor.errors.KeyrotorError` subclasses found by name
among keyrotor's own error classes, never by importing anything the payload names.
"""

from __future__ import annotations

import dataclasses
import json
from datetime import date, datetime
from typing import Any

from keyrotor.errors import KeyrotorError

_ERROR = "__keyrotor_error__"


class RemoteJobError(KeyrotorError):
    """A job failed with an error that is not one of keyrotor's own."""


def _error_classes() -> dict[str, type[KeyrotorError]]:
    found: dict[str, type[KeyrotorError]] = {}
    stack: list[type[KeyrotorError]] = [KeyrotorError]
    while stack:
        cls = stack.pop()
        found.setdefault(cls.__name__, cls)
        stack.extend(cls.__subclasses__())
    return found


def _encode(obj: object) -> Any:
    if isinstance(obj, KeyrotorError):
        return {_ERROR: type(obj).__name__, "message": obj.message}
    if isinstance(obj, BaseException):
        # A foreign exception's text may quote data; its class name is enough to act on.
        return {_ERROR: "RemoteJobError", "message": f"job failed with {type(obj).__name__}"}
    if isinstance(obj, datetime | date):
        return obj.isoformat()
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return dataclasses.asdict(obj)
    if isinstance(obj, set | frozenset):
        return sorted(obj)
    raise TypeError(f"{type(obj).__name__} is not JSON-serialisable for a job payload")


def _decode(obj: dict[str, Any]) -> Any:
    name = obj.get(_ERROR)
    if not isinstance(name, str):
        return obj
    cls = _error_classes().get(name, RemoteJobError)
    err = cls.__new__(cls)
    # Bypass subclasses' own __init__ signatures: the class and message are what travel.
    KeyrotorError.__init__(err, str(obj.get("message") or ""))
    return err


def serialize(obj: Any) -> bytes:
    """arq ``job_serializer``."""
    return json.dumps(obj, default=_encode, separators=(",", ":")).encode()


def deserialize(data: bytes) -> Any:
    """arq ``job_deserializer``."""
    return json.loads(data, object_hook=_decode)


# Keyword arguments for arq's create_pool / Worker.
ARQ_SERIALIZERS: dict[str, Any] = {"job_serializer": serialize, "job_deserializer": deserialize}
