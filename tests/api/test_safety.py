"""Limits, proxies, and what never leaves the server: tokens and plaintexts in logs, errors, metrics."""

from __future__ import annotations

import datetime as dt
import json
import logging
import time
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import asyncpg
import pytest
from aiohttp.test_utils import TestClient, TestServer
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID
from hypothesis import HealthCheck, given
from hypothesis import settings as hsettings
from hypothesis import strategies as st
from multidict import CIMultiDict
from prometheus_client import REGISTRY, generate_latest

from keyrotor import KeyManager, Settings
from keyrotor.api import tokens
from keyrotor.api.app import check_tls, create_app
from keyrotor.api.limits import RateLimiter, client_ip, parse_proxies
from keyrotor.errors import ConfigurationError
from tests.api.conftest import Api

SECRET = "sk-live-SECRET-PLAINTEXT-0123456789"


def test_client_ip_trusts_forwarded_for_only_from_trusted_proxies() -> None:
    proxies = parse_proxies("10.0.0.0/8, 192.0.2.7")
    assert client_ip("198.51.100.1", "203.0.113.9", proxies) == "198.51.100.1"
    assert client_ip("10.1.2.3", "203.0.113.9", proxies) == "203.0.113.9"
    assert client_ip("10.1.2.3", "1.1.1.1, 203.0.113.9, 192.0.2.7", proxies) == "203.0.113.9"
    assert client_ip("10.1.2.3", "203.0.113.9", ()) == "10.1.2.3"
    assert client_ip("10.1.2.3", "garbage", proxies) == "10.1.2.3"
    with pytest.raises(ConfigurationError):
        parse_proxies("not-an-ip")


def test_rate_limiter() -> None:
    now = [0.0]
    limiter = RateLimiter(10, 5, clock=lambda: now[0])
    assert [limiter.take(1) for _ in range(5)] == [0.0] * 5
    assert limiter.take(1) > 0
    assert limiter.take(2) == 0.0  # another token has its own bucket
    now[0] += 0.5
    assert limiter.take(1, 5) == 0.0
    assert RateLimiter(0, 1).take(1, 10**6) == 0.0


def test_a_request_of_more_units_than_the_burst_pays_for_all_of_them() -> None:
    """A batch bigger than the burst cannot wait for a bucket that never holds it: it may start
    from a full bucket and leaves the rest as debt. Charging it only the burst let a token send
    batches of 100 at a rate of 10 values a second with a burst of 5: 200 values a second."""
    now = [0.0]
    limiter = RateLimiter(10, 5, clock=lambda: now[0])
    assert limiter.take(1, 100) == 0.0
    assert limiter.take(1) == pytest.approx((1 + 95) / 10)  # the debt first, then one unit
    sent = 100
    while now[0] < 60:
        now[0] += 0.25
        if limiter.take(1, 100) == 0.0:
            sent += 100
    assert sent <= 10 * 60 + 100, sent  # the rate holds, to within one batch


@pytest.fixture
async def limited(env: dict[str, str]) -> AsyncIterator[Api]:
    settings = Settings.from_env(
        {
            **env,
            "KEYROTOR_API_RATE_PER_SECOND": "1",
            "KEYROTOR_API_RATE_BURST": "3",
            "KEYROTOR_API_TRUSTED_PROXIES": "127.0.0.1",
        }
    )
    async with KeyManager(settings) as km, TestClient(TestServer(create_app(settings, km=km))) as client:
        issued = await tokens.create_token(km.sessions, "app", by="admin")
        yield Api(client, km, issued.token)


async def test_rate_limit_answers_429(limited: Api) -> None:
    statuses = []
    for _ in range(5):
        resp = await limited.client.post(
            "/v1/encrypt", json={"scope": "s", "plaintext": "v"}, headers=limited.auth()
        )
        statuses.append(resp.status)
    assert statuses[:3] == [200, 200, 200] and 429 in statuses[3:]
    resp = await limited.client.post(
        "/v1/encrypt", json={"scope": "s", "plaintext": "v"}, headers=limited.auth()
    )
    assert resp.status == 429 and int(resp.headers["Retry-After"]) >= 1
    assert (await resp.json())["error"]["code"] == "rate_limited"


async def test_a_batch_is_charged_every_item_over_http(limited: Api) -> None:
    """1 value a second, a burst of 3: a batch of 40 passes from a full bucket, then the token
    waits out the 40 values it sent, not the 3 of the burst."""
    items = [{"plaintext": "v"}] * 40
    resp = await limited.client.post(
        "/v1/encrypt/batch", json={"scope": "s", "items": items}, headers=limited.auth()
    )
    assert resp.status == 200
    resp = await limited.client.post(
        "/v1/encrypt", json={"scope": "s", "plaintext": "v"}, headers=limited.auth()
    )
    assert resp.status == 429 and int(resp.headers["Retry-After"]) >= 35, resp.headers.get("Retry-After")


async def _failed_auth(api: Api, forwarded_for: str) -> int:
    resp = await api.client.post(
        "/v1/encrypt",
        json={"scope": "s", "plaintext": "v"},
        headers={"Authorization": "Bearer krt_" + "A" * 43, "X-Forwarded-For": forwarded_for},
    )
    return resp.status


async def test_failed_authentications_are_counted_per_ipv6_64_not_per_address(limited: Api) -> None:
    """One IPv6 host holds a whole /64 (2**64 addresses): counted per address, it could make a
    fresh start at every failure and never meet the limit of 20. A /64 is one client; an IPv4
    address, or one mapped into IPv6, is one client as it always was."""
    started = time.monotonic()
    statuses = [await _failed_auth(limited, f"2001:db8:1:2::{i:x}") for i in range(1, 31)]
    refilled = int(time.monotonic() - started) + 1  # one failure a second comes back
    assert statuses[-1] == 429 and statuses.count(401) <= 20 + refilled, statuses
    assert await _failed_auth(limited, "2001:db8:1:3::1") == 401  # the next /64: another client
    v4 = [await _failed_auth(limited, "192.0.2.10") for _ in range(30)]
    assert v4[-1] == 429, v4
    assert await _failed_auth(limited, "::ffff:192.0.2.10") == 429  # the same address, mapped
    assert await _failed_auth(limited, "192.0.2.11") == 401


async def _audited_ip(api: Api, database_url: str, headers: Any) -> str | None:
    """The ``ip_address`` audited for one encrypt sent with ``headers``."""
    resp = await api.client.post("/v1/encrypt", json={"scope": "s", "plaintext": "v"}, headers=headers)
    assert resp.status == 200
    await api.km.flush_audit()
    conn = await asyncpg.connect(database_url)
    try:
        ip: str | None = await conn.fetchval(
            "SELECT ip_address FROM encryption_audit_log WHERE event_type = 'encrypt'"
        )
    finally:
        await conn.close()
    return ip


async def test_trusted_proxy_sets_the_audited_ip(limited: Api, database_url: str) -> None:
    headers = {**limited.auth(), "X-Forwarded-For": "203.0.113.9"}
    assert await _audited_ip(limited, database_url, headers) == "203.0.113.9"


async def test_forwarded_for_split_over_header_lines_is_read_as_one_list(
    limited: Api, database_url: str
) -> None:
    """A proxy that adds its own ``X-Forwarded-For`` line (HAProxy's ``option forwardfor``) after
    the one the client sent: the lines are one list (RFC 9110, 5.3), read right to left, so the
    client's own line cannot name the address it is audited under."""
    headers = CIMultiDict(limited.auth())
    headers.add("X-Forwarded-For", "198.51.100.66")  # written by the client: forged
    headers.add("X-Forwarded-For", "203.0.113.7")  # added by the trusted proxy: the real peer
    assert await _audited_ip(limited, database_url, headers) == "203.0.113.7"


async def test_no_token_or_plaintext_in_logs_errors_or_metrics(
    api: Api, caplog: pytest.LogCaptureFixture, capsys: pytest.CaptureFixture[str]
) -> None:
    caplog.set_level(logging.DEBUG)
    bodies = []
    ok = await api.client.post("/v1/encrypt", json={"scope": "s", "plaintext": SECRET}, headers=api.auth())
    ct = (await ok.json())["ciphertext"]
    calls = [
        ("/v1/decrypt", {"scope": "s", "ciphertext": ct, "context": "wrong"}),
        ("/v1/encrypt", {"scope": "bad scope!", "plaintext": SECRET}),
        ("/v1/encrypt", {"scope": "s", "plaintext": SECRET, "extra": SECRET}),
        ("/v1/encrypt/batch", {"scope": "s", "items": [{"plaintext": SECRET, "context": "\x00"}]}),
    ]
    for path, doc in calls:
        resp = await api.client.post(path, json=doc, headers=api.auth())
        bodies.append(await resp.text())
    bad = await api.client.post(
        "/v1/encrypt",
        json={"scope": "s", "plaintext": SECRET},
        headers={"Authorization": f"Bearer {api.token}x"},
    )
    bodies.append(await bad.text())
    await api.km.flush_audit()
    out = capsys.readouterr()
    seen = "\n".join([*bodies, caplog.text, out.out, out.err, generate_latest(REGISTRY).decode()])
    assert SECRET not in seen
    assert api.token not in seen and api.token[4:] not in seen


@given(
    body=st.recursive(
        st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=30),
        lambda kids: (
            st.lists(kids, max_size=4)
            | st.dictionaries(
                st.sampled_from(["scope", "plaintext", "ciphertext", "context", "items", "value", "x"]),
                kids,
                max_size=5,
            )
        ),
        max_leaves=12,
    ),
    path=st.sampled_from(["/v1/encrypt", "/v1/decrypt", "/v1/encrypt/batch", "/v1/decrypt/batch"]),
)
@hsettings(max_examples=150, deadline=None, suppress_health_check=list(HealthCheck))
async def test_any_body_gets_json_never_500(api: Api, body: object, path: str) -> None:
    resp = await api.client.post(path, data=json.dumps(body), headers=api.auth())
    text = await resp.text()
    assert resp.status < 500, text
    doc = json.loads(text)
    if resp.status >= 400:
        assert set(doc) == {"error"} and set(doc["error"]) == {"code", "message"}
    assert "Traceback" not in text


@given(raw=st.binary(max_size=200))
@hsettings(max_examples=60, deadline=None, suppress_health_check=list(HealthCheck))
async def test_any_bytes_get_json_never_500(api: Api, raw: bytes) -> None:
    resp = await api.client.post("/v1/decrypt", data=raw, headers=api.auth())
    assert resp.status in (200, 400), await resp.text()
    assert "error" in await resp.json() or resp.status == 200


def test_tls_needs_both_files_and_loads_them(settings: Settings, tmp_path: Path) -> None:
    assert check_tls(settings) is None
    with pytest.raises(ConfigurationError):
        check_tls(settings.model_copy(update={"api_tls_cert": "/nonexistent.pem"}))
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "localhost")])
    now = dt.datetime.now(dt.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(1)
        .not_valid_before(now)
        .not_valid_after(now + dt.timedelta(days=1))
        .sign(key, hashes.SHA256())
    )
    (tmp_path / "c.pem").write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    (tmp_path / "k.pem").write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )
    )
    files = {"api_tls_cert": str(tmp_path / "c.pem"), "api_tls_key": str(tmp_path / "k.pem")}
    assert check_tls(settings.model_copy(update=files)) is not None
    with pytest.raises(ConfigurationError):
        check_tls(settings.model_copy(update={**files, "api_tls_key": str(tmp_path / "c.pem")}))


async def test_token_guessing_is_throttled_per_address(api: Api) -> None:
    wrong = {"Authorization": "Bearer krt_" + "B" * 43}
    statuses = []
    for _ in range(25):
        resp = await api.client.post("/v1/encrypt", json={"scope": "s", "plaintext": "v"}, headers=wrong)
        statuses.append(resp.status)
    assert statuses[:20] == [401] * 20 and statuses[-1] == 429
    # a valid token from the same address is refused too until the bucket refills: no oracle
    resp = await api.client.post("/v1/encrypt", json={"scope": "s", "plaintext": "v"}, headers=api.auth())
    assert resp.status == 429
