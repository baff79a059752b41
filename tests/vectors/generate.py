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
