"""Writes tests/vectors/kr1.json: kr1 conformance vectors (run from the repository root:
``.venv/bin/python -m tests.vectors.generate``). Fixed keys and nonces: the file never changes
unless the format does, and then the format's version must change too (docs/format.md)."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from keyrotor.crypto import envelope
from keyrotor.kek.base import WrapContext

OUT = Path(__file__).with_name("kr1.json")
DEK = bytes(range(32))
KEK = bytes(range(0x40, 0x60))

_VALUES = [
    ("openai", 1, "", "sk-test-0001", 0),
    ("anthropic", 7, "secret:anthropic-prod", "sk-ant-api03-XYZ", 1),
    ("tenant-42/openai", 2147483647, "settings.api_key:42", "clé 🔑 ключ", 2),
    ("a", 12, "users.api_key:9f2c:extra", "x" * 100, 3),
    # A leading U+FEFF is part of the text: a UTF-8 decoder that strips a byte order mark
    # (TextDecoder does by default) returns another value.
    ("openai", 3, "settings.api_key:7", "\ufeffsk-bom", 6),
]
# Bytes that authenticate but are not UTF-8: a reader refuses them rather than return
# replacement characters (index 4: a stray byte; 5: a UTF-8-encoded surrogate, which is not
# UTF-8 either).
_NOT_UTF8 = [
    (b"sk-\xff\xfe", 4, "plaintext is not UTF-8"),
    (b"sk-\xed\xa0\x80", 5, "plaintext is an encoded surrogate"),
]


def _nonce(i: int) -> bytes:
    return bytes([0xA0 + i] * 12)


def values() -> list[dict[str, Any]]:
    out = []
    for scope, version, context, plaintext, i in _VALUES:
        ct = envelope.seal(
            plaintext.encode(),
            cipher=AESGCM(DEK),
            scope=scope,
            dek_version=version,
            context=context,
            nonce=_nonce(i),
        )
        out.append(
            {
                "scope": scope,
                "version": version,
                "context": context,
                "plaintext": plaintext,
                "nonce_hex": _nonce(i).hex(),
                "aad_hex": envelope.aad(scope, version, context).hex(),
                "ciphertext": ct,
            }
        )
    return out


def _non_canonical(body: str) -> str:
    """``body`` with a non-zero unused bit in its last character: the same bytes, another text.

    The lowest bit of the last character is unused whenever the length is 2 or 3 modulo 4.
    """
    assert len(body) % 4 in (2, 3)
    alphabet = "ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789-_"
    return body[:-1] + alphabet[alphabet.index(body[-1]) | 1]


def _sealed_not_utf8(scope: str, version: int, context: str) -> list[dict[str, Any]]:
    return [
        {
            "scope": scope,
            "context": context,
            "why": why,
            "ciphertext": envelope.seal(
                raw, cipher=AESGCM(DEK), scope=scope, dek_version=version, context=context, nonce=_nonce(i)
            ),
        }
        for raw, i, why in _NOT_UTF8
    ]


def refused(good: list[dict[str, Any]]) -> list[dict[str, Any]]:
    v = good[1]
    body = v["ciphertext"].split(":", 2)[2]
    flipped = body[:-2] + ("A" if body[-2] != "A" else "B") + body[-1]
    base = {"scope": v["scope"], "context": v["context"]}
    return [
        {**base, "why": "wrong context", "context": "secret:other", "ciphertext": v["ciphertext"]},
        {**base, "why": "wrong scope", "scope": "openai", "ciphertext": v["ciphertext"]},
        {**base, "why": "wrong version in the text", "ciphertext": f"kr1:8:{body}"},
        {**base, "why": "tampered body", "ciphertext": f"kr1:7:{flipped}"},
        {**base, "why": "leading zero in the version", "ciphertext": f"kr1:07:{body}"},
        {**base, "why": "no version", "ciphertext": f"kr1:{body}"},
        {**base, "why": "padded base64", "ciphertext": f"kr1:7:{body}=="},
        {
            **base,
            "why": "standard base64 alphabet",
            "ciphertext": "kr1:7:" + body.replace("-", "+").replace("_", "/"),
        },
        {**base, "why": "truncated", "ciphertext": "kr1:7:" + body[:30]},
        {**base, "why": "other prefix", "ciphertext": "kr2:7:" + body},
        {**base, "why": "version 0", "ciphertext": f"kr1:0:{body}"},
        {**base, "why": "version above 2^31-1", "ciphertext": f"kr1:2147483648:{body}"},
        # 2^32 + 7: a reader that stores the version in 32 bits without the range check reads 7,
        # and the AAD of version 7 opens it.
        {**base, "why": "version that is 7 modulo 2^32", "ciphertext": f"kr1:4294967303:{body}"},
        {**base, "why": "sign in the version", "ciphertext": f"kr1:+7:{body}"},
        {**base, "why": "space in the version", "ciphertext": f"kr1: 7:{body}"},
        {**base, "why": "non-ASCII digit in the version", "ciphertext": f"kr1:\u0667:{body}"},
        {**base, "why": "non-canonical trailing bits", "ciphertext": f"kr1:7:{_non_canonical(body)}"},
        {**base, "why": "impossible base64 length", "ciphertext": f"kr1:7:{body}AA"},
        {**base, "why": "trailing newline", "ciphertext": f"kr1:7:{body}\n"},
        {**base, "why": "space inside the body", "ciphertext": f"kr1:7:{body[:20]} {body[20:]}"},
        {**base, "why": "a colon and more after the body", "ciphertext": f"kr1:7:{body}:{body}"},
        *_sealed_not_utf8(v["scope"], 7, v["context"]),
    ]


def wrapped_deks() -> list[dict[str, Any]]:
    out = []
    for i, (scope, version) in enumerate((("openai", 1), ("tenant-42/openai", 3))):
        ctx = WrapContext(scope, version)
        nonce = bytes([0xB0 + i] * 12)
        out.append(
            {
                "scope": scope,
                "version": version,
                "aad_hex": ctx.as_aad().hex(),
                "nonce_hex": nonce.hex(),
                "blob_hex": (nonce + AESGCM(KEK).encrypt(nonce, DEK, ctx.as_aad())).hex(),
            }
        )
    return out


def document() -> dict[str, Any]:
    good = values()
    return {
        "format": "kr1",
        "about": "see docs/format.md; AES-256-GCM; hex fields are lower-case",
        "dek_hex": DEK.hex(),
        "values": good,
        "refused": refused(good),
        "wrap_kek_hex": KEK.hex(),
        "wrapped_deks": wrapped_deks(),
    }


def dumps() -> str:
    return json.dumps(document(), indent=2, ensure_ascii=False) + "\n"


if __name__ == "__main__":  # pragma: no cover
    OUT.write_text(dumps())
    sys.stdout.write(f"wrote {OUT}\n")
