"""envelope.Resealer.reseal_all: a batch resealed is each value resealed, and it fails as they do."""

from __future__ import annotations

import pytest
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from keyrotor.crypto import envelope
from keyrotor.errors import DecryptionFailed, MalformedCiphertext

OLD = AESGCM(bytes(range(32)))
NEW = AESGCM(bytes(range(1, 33)))
SCOPE = "anthropic"


def resealer() -> envelope.Resealer:
    return envelope.Resealer(scope=SCOPE, old=OLD, old_version=3, new=NEW, new_version=4)


def batch(n: int) -> tuple[list[str], list[str], list[bytes]]:
    plaintexts = [f"sk-ant-{i:04d}-".encode() + b"x" * (i % 40) for i in range(n)]
    contexts = [f"secret:k{i}" for i in range(n)]
    values = [
        envelope.seal(p, cipher=OLD, scope=SCOPE, dek_version=3, context=c)
        for p, c in zip(plaintexts, contexts, strict=True)
    ]
    return values, contexts, plaintexts


def test_reseal_all_opens_under_the_new_version_only() -> None:
    values, contexts, plaintexts = batch(300)  # more than one nonce pool of the single-value path
    out = resealer().reseal_all(values, contexts)
    assert len(out) == len(values) and len(set(out)) == len(out)
    for new, context, plaintext in zip(out, contexts, plaintexts, strict=True):
        assert envelope.peek_version(new) == 4
        assert envelope.unseal(envelope.parse(new), cipher=NEW, scope=SCOPE, context=context) == plaintext
        with pytest.raises(DecryptionFailed):
            envelope.unseal(envelope.parse(new), cipher=NEW, scope=SCOPE, context=context + "x")


def test_reseal_all_of_nothing() -> None:
    assert resealer().reseal_all([], []) == []


def _fails_as_reseal_does(n: int, at: int, bad: str, error: type[Exception]) -> None:
    """A batch of ``n`` with ``bad`` at index ``at`` fails with ``error`` naming that index, with
    the message :meth:`Resealer.reseal` gives for ``bad`` alone."""
    values, contexts, _ = batch(n)
    values[at] = bad
    r = resealer()
    with pytest.raises(error) as batch_error:
        r.reseal_all(values, contexts)
    assert r.failed_at == at
    with pytest.raises(error) as single_error:
        r.reseal(bad, contexts[at])
    assert str(batch_error.value) == str(single_error.value)


@pytest.mark.parametrize(
    ("bad", "error"),
    [
        ("kr1:3:" + "A" * 40, DecryptionFailed),  # well formed, fails authentication
        ("kr1:03:" + "A" * 40, MalformedCiphertext),
        ("kr1:3:" + "A" * 37, MalformedCiphertext),
        ("kr1:3:" + "A" * 38 + "+/", MalformedCiphertext),
        ("kr1:3:" + "A" * (envelope.MAX_SEALED_CHARS + 1), MalformedCiphertext),
        ("not a value", MalformedCiphertext),
        ("", MalformedCiphertext),
    ],
)
def test_reseal_all_fails_as_reseal_does_naming_the_index(bad: str, error: type[Exception]) -> None:
    _fails_as_reseal_does(5, 2, bad, error)


def test_reseal_all_refuses_a_value_of_another_version() -> None:
    values, contexts, _ = batch(3)
    values[1] = envelope.seal(b"v2", cipher=OLD, scope=SCOPE, dek_version=2, context=contexts[1])
    r = resealer()
    with pytest.raises(DecryptionFailed, match="v3 but its value says v2"):
        r.reseal_all(values, contexts)
    assert r.failed_at == 1


def test_reseal_all_refuses_a_wrong_context() -> None:
    values, contexts, _ = batch(3)
    r = resealer()
    with pytest.raises(DecryptionFailed):
        r.reseal_all(values, [contexts[0], contexts[2], contexts[1]])
    assert r.failed_at == 1
    assert r.reseal_all(values, contexts)  # a later batch starts clean
    assert r.failed_at is None


@pytest.mark.parametrize(
    "bad",
    [
        "kr1:3:" + "A" * 39 + "B",  # length 0 modulo 4: no unused bits; parses, fails authentication
        "kr1:3:" + "A" * 41 + "B",  # length 2 modulo 4: four unused bits
        "kr1:3:" + "A" * 42 + "B",  # length 3 modulo 4: two unused bits
        "kr1:3:" + "A" * 38 + "é",  # not ASCII
        "kr1:3:" + "A" * 38 + "==",  # padding is not base64url
        "kr1:3:" + "A" * 20,  # shorter than a nonce and a tag
        "kr1:3:",
    ],
)
def test_reseal_all_reads_a_value_as_strictly_as_a_decrypt(bad: str) -> None:
    try:
        envelope.split(bad)
    except MalformedCiphertext as exc:
        expected: type[Exception] = type(exc)
    else:
        expected = DecryptionFailed  # parses, and fails authentication
    _fails_as_reseal_does(4, 3, bad, expected)
