"""tests/vectors/kr1.json is what keyrotor's own code writes and reads (docs/format.md)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from keyrotor.crypto import envelope
from keyrotor.errors import DecryptionFailed
from keyrotor.kek.base import WrapContext
from tests.vectors import generate

VECTORS = json.loads((Path(__file__).resolve().parents[1] / "vectors" / "kr1.json").read_text())


def test_the_file_is_current() -> None:
    assert generate.OUT.read_text() == generate.dumps()


@pytest.mark.parametrize("v", VECTORS["values"], ids=lambda v: v["scope"])
def test_values_open(v: dict[str, object]) -> None:
    dek = bytes.fromhex(str(VECTORS["dek_hex"]))
    scope, version, context = str(v["scope"]), int(str(v["version"])), str(v["context"])
    assert envelope.aad(scope, version, context).hex() == v["aad_hex"]
    sealed = envelope.parse(str(v["ciphertext"]))
    assert sealed.dek_version == version and sealed.nonce.hex() == v["nonce_hex"]
    assert (
        envelope.unseal(sealed, cipher=AESGCM(dek), scope=scope, context=context).decode() == v["plaintext"]
    )
    # The text decrypt returns (a leading U+FEFF kept).
    version, raw = envelope.split(str(v["ciphertext"]))
    assert envelope.open_text(raw, AESGCM(dek), scope, version, context) == v["plaintext"]


@pytest.mark.parametrize("v", VECTORS["refused"], ids=lambda v: str(v["why"]))
def test_refused_values_do_not_open(v: dict[str, str]) -> None:
    dek = bytes.fromhex(VECTORS["dek_hex"])
    # The path of a decrypt: strict parsing, then authentication and UTF-8 (bytes that
    # authenticate but are not UTF-8 are refused too).
    with pytest.raises(DecryptionFailed):
        version, raw = envelope.split(v["ciphertext"])
        envelope.open_text(raw, AESGCM(dek), v["scope"], version, v["context"])


@pytest.mark.parametrize("w", VECTORS["wrapped_deks"], ids=lambda w: str(w["scope"]))
def test_wrapped_deks_unwrap(w: dict[str, object]) -> None:
    ctx = WrapContext(str(w["scope"]), int(str(w["version"])))
    assert ctx.as_aad().hex() == w["aad_hex"]
    blob = bytes.fromhex(str(w["blob_hex"]))
    kek = AESGCM(bytes.fromhex(VECTORS["wrap_kek_hex"]))
    assert kek.decrypt(blob[:12], blob[12:], ctx.as_aad()) == bytes.fromhex(VECTORS["dek_hex"])
