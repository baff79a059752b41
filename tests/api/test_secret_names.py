"""Secret names and the URL that carries them: every name the library stores has a path
``/v1/secrets/{scope}/{name}`` that reaches it, sent as the Node client encodes it."""

from __future__ import annotations

import asyncio
import json
from urllib.parse import quote

import pytest
from yarl import URL

from keyrotor.crypto import envelope
from keyrotor.errors import InvalidInput
from keyrotor.secrets import secret_context
from keyrotor.store import db, repo
from tests.api.conftest import Api


def _path(scope: str, name: str) -> URL:
    # JavaScript's encodeURIComponent, which the Node client uses: everything but
    # A-Z a-z 0-9 - _ . ! ~ * ' ( ) is percent-encoded, '/' included.
    enc = lambda s: quote(s, safe="-_.!~*'()")  # noqa: E731
    return URL(f"/v1/secrets/{enc(scope)}/{enc(name)}", encoded=True)


async def _raw_put(api: Api, target: str, body: bytes) -> tuple[int, bytes]:
    """One request written by hand, its target sent exactly as given."""
    server = api.client.server
    reader, writer = await asyncio.open_connection(server.host, server.port)
    try:
        head = (
            f"PUT {target} HTTP/1.1\r\nHost: {server.host}\r\nAuthorization: Bearer {api.token}\r\n"
            f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\nConnection: close\r\n\r\n"
        )
        writer.write(head.encode() + body)
        async with asyncio.timeout(10):
            answer = await reader.read()
    finally:
        writer.close()
    status_line, _, rest = answer.partition(b"\r\n")
    return int(status_line.split()[1]), rest.partition(b"\r\n\r\n")[2]


@pytest.mark.parametrize("name", [".", ".."])
async def test_dot_segment_names_are_refused_when_stored(api: Api, name: str) -> None:
    """A URL path cannot carry ``.`` or ``..`` as a segment: clients (a browser's URL, Node's
    fetch, yarl, curl) and proxies remove it, so such a secret could be written in Python but
    never read over HTTP. Storing one is refused, by the library and so over HTTP."""
    with pytest.raises(InvalidInput) as refused:
        await api.km.put_secret("openai", name, "sk-1")
    assert "'.' and '..'" in str(refused.value)
    with pytest.raises(InvalidInput):
        await api.km.put_secrets("openai", [("ok", "sk-1"), (name, "sk-2")])
    # A client that sends the segment as is (aiohttp's own client would remove it) is refused too.
    status, answer = await _raw_put(api, f"/v1/secrets/openai/{name}", b'{"value": "sk-1"}')
    assert status == 400 and json.loads(answer)["error"]["code"] == "invalid_input", answer
    async with db.transaction(api.km.sessions) as session:
        assert await repo.get_secret(session, "openai", name) is None
        assert await repo.get_secret(session, "openai", "ok") is None  # nothing of the batch


async def test_a_dot_segment_name_stored_before_stays_readable_in_the_library(api: Api) -> None:
    """Names were not refused before: a value stored under ``..`` then still opens with
    ``get_secret`` (so it can be read and stored again under another name), nothing is lost."""
    await api.km.encrypt("openai", "warm-up")
    scope_id, version, cipher = await api.km.ring.encryption_key("openai")
    sealed = envelope.seal(
        b"sk-old", cipher=cipher, scope="openai", dek_version=version, context=secret_context("..")
    )
    async with db.transaction(api.km.sessions) as session:
        await repo.put_secrets(session, scope_id, [("..", sealed)], version)
    assert await api.km.get_secret("openai", "..") == "sk-old"


@pytest.mark.parametrize(
    "name",
    ["a/b", "a/..", "/", "%2F", "%", "100%", "a?b#c", "x y", "...", ".env", "ключ", "a;b=c", "a\\b", "a+b"],
)
async def test_every_other_name_round_trips_over_http(api: Api, name: str) -> None:
    """What the library accepts the route reaches: a '/' in a name travels as %2F (the route
    matches the raw path, then decodes), '%' as %25, and so on."""
    for scope in ("openai", "tenant-1/openai"):
        resp = await api.client.put(_path(scope, name), json={"value": f"sk-{name}"}, headers=api.auth())
        assert resp.status == 200, (scope, name, await resp.text())
        assert await resp.json() == {"scope": scope, "name": name}
        assert await api.km.get_secret(scope, name) == f"sk-{name}"
        resp = await api.client.get(_path(scope, name), headers=api.auth())
        assert resp.status == 200, (scope, name, await resp.text())
        assert await resp.json() == {"scope": scope, "name": name, "value": f"sk-{name}"}
