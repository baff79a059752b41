"""Reading request bodies: one JSON object with known fields of known types, or a 400."""

from __future__ import annotations

import json
from typing import Any

from aiohttp import web

from keyrotor.api.errors import ApiError, bad_request


async def read_object(request: web.Request, allowed: frozenset[str]) -> dict[str, Any]:
    """The body as a JSON object whose keys are all in ``allowed``.

    Raises:
        ApiError: 413 over the size limit (aiohttp's ``client_max_size``), 400 otherwise.
    """
    try:
        raw = await request.read()
    except web.HTTPRequestEntityTooLarge:
        raise ApiError(
            413, "too_large", "the request body is larger than KEYROTOR_API_MAX_BODY_BYTES"
        ) from None
    doc = parse_json(raw)
    if not isinstance(doc, dict):
        raise bad_request("the body must be a JSON object")
    return check_keys(doc, allowed, "body")


def parse_json(raw: bytes) -> Any:
    """``raw`` as a JSON document in UTF-8.

    Raises:
        ApiError: 400, with neither cause nor context: the decoder's error holds the body
            (``.object``, ``.doc``), plaintext values included, and a context is kept even
            under ``from None`` for anything that walks the chain.
    """
    try:
        return json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, ValueError, RecursionError):
        pass
    raise bad_request("the body is not a JSON document in UTF-8")


def check_keys(doc: dict[str, Any], allowed: frozenset[str], where: str) -> dict[str, Any]:
    if allowed.issuperset(doc):  # the common case, without building a set (once per batch item)
        return doc
    unknown = set(doc) - allowed
    if unknown:
        raise bad_request(f"unknown field(s) in the {where}: {', '.join(sorted(unknown))[:100]!r}")
    return doc


def text(doc: dict[str, Any], name: str, *, required: bool = True) -> str:
    """A string field (``""`` when optional and absent). Lone surrogates are refused: they are not
    text and cannot be encoded."""
    if name not in doc:
        if required:
            raise bad_request(f"{name!r} is required")
        return ""
    value = doc[name]
    if not isinstance(value, str):
        raise bad_request(f"{name!r} must be a string")
    if not _encodes(value):  # refused outside the except block: its error holds the value
        raise bad_request(f"{name!r} is not valid Unicode text")
    if "\x00" in value:
        raise bad_request(f"{name!r} must not contain NUL characters")
    return value


def _encodes(value: str) -> bool:
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def path_text(request: web.Request, name: str) -> str:
    """A path parameter, checked like a body string."""
    return text(dict(request.match_info), name)


def items(doc: dict[str, Any], limit: int) -> list[Any]:
    """The ``items`` list of a batch, at most ``limit`` long."""
    value = doc.get("items")
    if not isinstance(value, list):
        raise bad_request("'items' must be a list")
    if not value:
        raise bad_request("'items' must not be empty")
    if len(value) > limit:
        raise ApiError(
            413, "too_many_items", f"a batch holds at most {limit} items (KEYROTOR_API_MAX_BATCH_ITEMS)"
        )
    return value
