"""The kr1 format: round trips, strict parsing, tamper detection, AAD binding."""

from __future__ import annotations

import base64
import contextlib

import pytest
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from hypothesis import given, settings
from hypothesis import strategies as st

from keyrotor.crypto import envelope
from keyrotor.errors import DecryptionFailed, InvalidValue, MalformedCiphertext

DEK = bytes(range(32))
CIPHER = AESGCM(DEK)


def seal(pt: bytes, scope: str = "anthropic", version: int = 1, context: str = "user:1", **kw: object) -> str:
    return envelope.seal(pt, cipher=CIPHER, scope=scope, dek_version=version, context=context, **kw)  # type: ignore[arg-type]


def unseal(value: str, scope: str = "anthropic", context: str = "user:1") -> bytes:
    return envelope.unseal(envelope.parse(value), cipher=CIPHER, scope=scope, context=context)


def test_known_answer_layout() -> None:
    nonce = bytes(12)
    value = seal(b"sk-ant-test", nonce=nonce)
    prefix, version, body = value.split(":")
    assert (prefix, version) == ("kr1", "1")
    raw = base64.urlsafe_b64decode(body + "=" * (-len(body) % 4))
    assert raw[:12] == nonce
    assert len(raw) == 12 + len(b"sk-ant-test") + 16
    expected = CIPHER.encrypt(nonce, b"sk-ant-test", envelope.aad("anthropic", 1, "user:1"))
    assert raw[12:] == expected
    assert "=" not in body


@settings(max_examples=200)
@given(
    pt=st.binary(max_size=4096),
    scope=st.sampled_from(["a", "tenant-42/openai"]),
    version=st.integers(1, 2**31 - 1),
    context=st.text(max_size=64),
)
def test_round_trip(pt: bytes, scope: str, version: int, context: str) -> None:
    value = seal(pt, scope, version, context)
    assert envelope.peek_version(value) == version
    assert unseal(value, scope, context) == pt


def test_large_value_round_trip() -> None:
    pt = b"x" * 1_000_000
    assert unseal(seal(pt)) == pt


def test_every_single_byte_flip_fails() -> None:
    value = seal(b"sk-proj-0123456789abcdef")
    body = value.split(":")[2]
    raw = bytearray(base64.urlsafe_b64decode(body + "=" * (-len(body) % 4)))
    for i in range(len(raw)):
        for bit in (0x01, 0x80):
            tampered = bytearray(raw)
            tampered[i] ^= bit
            text = "kr1:1:" + base64.urlsafe_b64encode(bytes(tampered)).decode().rstrip("=")
            with pytest.raises(DecryptionFailed):
                unseal(text)


def test_every_character_substitution_fails() -> None:
    value = seal(b"sk-ant-abc")
    alphabet = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_:+/=. \x00"
    for i in range(len(value)):
        for c in alphabet[::7] + "\x00":
            if c == value[i]:
                continue
            tampered = value[:i] + c + value[i + 1 :]
            with pytest.raises(DecryptionFailed):  # MalformedCiphertext is a DecryptionFailed
                unseal(tampered)


def test_truncation_at_every_length_fails() -> None:
    value = seal(b"sk-ant-abc")
    for n in range(len(value)):
        with pytest.raises(DecryptionFailed):
            unseal(value[:n])


@pytest.mark.parametrize(
    ("scope", "context", "version_shift"),
    [("openai", "user:1", 0), ("anthropic", "user:2", 0), ("anthropic", "", 0), ("anthropic", "user:1", 1)],
)
def test_aad_binding(scope: str, context: str, version_shift: int) -> None:
    value = seal(b"sk-ant-abc", version=3)
    if version_shift:
        value = value.replace("kr1:3:", f"kr1:{3 + version_shift}:")
    with pytest.raises(DecryptionFailed):
        unseal(value, scope, context)


def test_aad_fields_are_unambiguous() -> None:
    # Moving characters between scope and context must change the AAD.
    assert envelope.aad("ab", 1, "c") != envelope.aad("a", 1, "bc")
    assert envelope.aad("a", 12, "") != envelope.aad("a", 1, "2")


@pytest.mark.parametrize(
    "bad",
    [
        "",
        "kr1",
        "kr1:",
        "kr1:1",
        "kr1:1:",
        "kr1:0:AAAA",
        "kr1:01:AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA",
        "kr1:-1:AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA",
        "kr1:2147483648:AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA",
        "kr1:\uff11:AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA",  # a full-width digit one
        "kr1:1:AAAA",  # too short for nonce + tag
        "kr1:1:" + "A" * 39 + "=",
        "kr1:1:" + "A" * 38 + "+/",
        "kr1:1:" + "A" * 37,  # length % 4 == 1
        "kr1:1:" + "A" * 38 + "\x00\x00",
        "kr2:1:" + "A" * 40,
        "KR1:1:" + "A" * 40,
        "kr1:1:" + "A" * (envelope.MAX_SEALED_CHARS + 1),
    ],
)
def test_malformed_values_raise_typed_error(bad: str) -> None:
    with pytest.raises(MalformedCiphertext):
        envelope.parse(bad)


def test_non_canonical_trailing_bits_rejected() -> None:
    value = seal(b"abc")  # 12 + 3 + 16 = 31 bytes -> 42 chars: the last one carries 4 unused bits
    body = value.split(":")[2]
    assert len(body) % 4 == 2
    alphabet = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_"
    idx = alphabet.index(body[-1])
    twin = "kr1:1:" + body[:-1] + alphabet[idx | 1]
    assert twin != value
    with pytest.raises(MalformedCiphertext):
        envelope.parse(twin)


@given(st.text(max_size=200))
def test_parse_never_raises_untyped(text: str) -> None:
    with contextlib.suppress(MalformedCiphertext):
        envelope.parse(text)


@given(st.binary(min_size=28, max_size=100), st.integers(1, 1000))
def test_parse_random_bodies_then_fail_auth(raw: bytes, version: int) -> None:
    text = f"kr1:{version}:" + base64.urlsafe_b64encode(raw).decode().rstrip("=")
    with pytest.raises(DecryptionFailed):
        unseal(text)


def test_seal_rejects_bad_arguments() -> None:
    with pytest.raises(InvalidValue):
        seal(b"x", version=0)
    with pytest.raises(InvalidValue):
        seal(b"x", nonce=b"short")


def test_nonces_are_random() -> None:
    values = {seal(b"same") for _ in range(200)}
    assert len(values) == 200


def test_errors_do_not_echo_input() -> None:
    secret_like = "kr1:1:" + "S" * 38 + "!!"
    with pytest.raises(MalformedCiphertext) as info:
        envelope.parse(secret_like)
    assert "SSSS" not in str(info.value) and "SSSS" not in repr(info.value)
