"""An error about a value never holds the value: not in its message, its repr, nor anywhere in
its ``__cause__`` / ``__context__`` chain (``raise ... from None`` only hides the context from
a printed traceback; the object is still there for any reporter that walks the chain)."""

from __future__ import annotations

import base64
import os
from collections.abc import Callable

import pytest
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from keyrotor.crypto import envelope, legacy_format
from keyrotor.errors import DecryptionFailed, InvalidValue, KeyrotorError
from keyrotor.inputs import value_bytes
from keyrotor.legacy import second_phase

KEY = "sk-ant-api03-" + "Zq9xY8wV7uT6sR5q" * 3
DEK = os.urandom(32)
CIPHER = AESGCM(DEK)
NOT_UTF8 = KEY.encode() + b"\xff"  # a value that authenticates but is not text


def _chain(exc: BaseException) -> list[BaseException]:
    seen: list[BaseException] = []
    todo: list[BaseException | None] = [exc]
    while todo:
        e = todo.pop()
        if e is None or any(e is s for s in seen):
            continue
        seen.append(e)
        todo += [e.__cause__, e.__context__]
    return seen


def _kr1_not_text() -> None:
    value = envelope.seal(NOT_UTF8, cipher=CIPHER, scope="anthropic", dek_version=1, context="user:1")
    version, raw = envelope.split(value)
    envelope.open_text(raw, CIPHER, "anthropic", version, "user:1")


def _second_phase_not_text() -> None:
    iv = os.urandom(second_phase.SECOND_PHASE_IV)
    sealed = CIPHER.encrypt(iv, NOT_UTF8, None)
    tag = sealed[-second_phase.SECOND_PHASE_TAG :]
    blob = base64.b64encode(iv + tag + sealed[: -second_phase.SECOND_PHASE_TAG]).decode()
    second_phase.decrypt_second_phase(blob, CIPHER)


@pytest.mark.parametrize(
    ("call", "error"),
    [
        (lambda: value_bytes(KEY + "\ud800", 4096), InvalidValue),
        (_kr1_not_text, DecryptionFailed),
        (_second_phase_not_text, DecryptionFailed),
        (lambda: legacy_format._text(NOT_UTF8), DecryptionFailed),
        (lambda: legacy_format.encrypt(KEY + "\ud800", "legacy-master-key-0123456789"), InvalidValue),
    ],
    ids=[
        "encrypt-lone-surrogate",
        "kr1-not-utf8",
        "second-phase-not-utf8",
        "legacy-not-utf8",
        "legacy-encrypt-lone-surrogate",
    ],
)
def test_the_chain_of_a_refused_value_does_not_hold_it(
    call: Callable[[], object], error: type[KeyrotorError]
) -> None:
    with pytest.raises(error) as caught:
        call()
    for e in _chain(caught.value):
        held = [repr(e), str(e), *(repr(a) for a in e.args), repr(getattr(e, "object", None))]
        assert not any(KEY in text or repr(KEY.encode())[2:-1] in text for text in held), type(e).__name__
