"""Tests for keyrotor.crypto.legacy_format: the old Node backend's first-phase ciphertext.

No mocks: every test runs the real scrypt and AES-GCM. One scrypt costs ~30-60 ms, so the
tests that decrypt are counted carefully and hypothesis runs few examples there.
"""

from __future__ import annotations

import asyncio
import base64
import json
import multiprocessing
import os
import pickle
import time
from concurrent.futures import ProcessPoolExecutor, ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

from keyrotor.crypto import legacy_format as legacy
from keyrotor.errors import DecryptionFailed, InvalidValue, MalformedCiphertext, WeakKeyError

# tests/keyrotor/test_legacy.py -> parents[2] is the project root; shared/ sits beside it.
VECTORS_FILE = Path(__file__).resolve().parents[2] / ".." / "shared" / "vectors" / "legacy-node.jsonl"
MASTER_KEY = "shared-master-key-2025-10-27"
AUTH_FAILED = "legacy value failed authentication: wrong ENCRYPTION_KEY or tampered"
MISSING = f"Node legacy vectors not found at {VECTORS_FILE}: clone shared/ beside the project root"

# Made by Node v20's own crypto, with fixed parts:
#   salt = Buffer.from([0..31]); iv = Buffer.from([0xa0..0xaf])
#   key = scryptSync("kat-master-key-✓", salt, 32); aes-256-gcm; value = base64(salt||iv||tag||ct)
KAT_MASTER_KEY = "kat-master-key-✓"
KAT_PLAINTEXT = "sk-known-answer-ключ-🔑"
KAT_SALT = bytes(range(32))
KAT_IV = bytes(range(0xA0, 0xB0))
KAT_VALUE = (
    "AAECAwQFBgcICQoLDA0ODxAREhMUFRYXGBkaGxwdHh+goaKjpKWmp6ipqqusra6vtbZpU5GvJq1LfdWQuWtQ3G3AQS0b"
    "Ie2u/0XKiaofLurqmbTaa5ACEToVlCIv"
)


def _load_vectors() -> list[dict[str, Any]]:
    if not VECTORS_FILE.exists():
        return []
    text = VECTORS_FILE.read_text(encoding="utf-8")
    return [json.loads(line) for line in text.splitlines() if line.strip()]


VECTORS = _load_vectors()
VALUE_VECTORS = [v for v in VECTORS if v.get("kind") != "encrypted_dek"]
DEK_VECTORS = [v for v in VECTORS if v.get("kind") == "encrypted_dek"]


def _params(vectors: list[dict[str, Any]]) -> list[Any]:
    # A missing file still yields one test, which skips loudly and names the path.
    if not VECTORS_FILE.exists():
        return [pytest.param(None, id="vectors-missing")]
    return [pytest.param(v, id=f"{v['provider']}-{v['length']}") for v in vectors]


def _need(vector: dict[str, Any] | None) -> dict[str, Any]:
    if vector is None:
        pytest.skip(MISSING)
    return vector


@pytest.fixture
def node_value() -> dict[str, Any]:
    """A short Node vector (39-byte plaintext, 103 bytes decoded) for tamper tests."""
    if not VECTORS_FILE.exists():
        pytest.skip(MISSING)
    return next(v for v in VALUE_VECTORS if v["provider"] == "google")


def _b64(raw: bytes) -> str:
    return base64.b64encode(raw).decode("ascii")


def _assert_hygienic(exc: BaseException, *secrets: str) -> None:
    for text in (str(exc), repr(exc)):
        for secret in secrets:
            if secret:
                assert secret not in text


# --- the Node vectors --------------------------------------------------------------------


def test_vector_file_covers_the_cases() -> None:
    if not VECTORS_FILE.exists():
        pytest.skip(MISSING)
    assert all(len(v["ciphertext"]) == v["length"] for v in VECTORS)
    plaintexts = [v["plaintext"] for v in VALUE_VECTORS]
    assert "" in plaintexts
    assert any(not p.isascii() for p in plaintexts)
    assert any(v["length"] > 5000 for v in VALUE_VECTORS)
    assert any(v["length"] == 232 and len(v["plaintext"]) == 108 for v in VALUE_VECTORS)
    assert [v["length"] for v in DEK_VECTORS] == [144]


@pytest.mark.parametrize("vector", _params(VALUE_VECTORS))
def test_node_vector_decrypts(vector: dict[str, Any] | None) -> None:
    v = _need(vector)
    assert legacy.is_legacy(v["ciphertext"])
    assert legacy.decrypt(v["ciphertext"], MASTER_KEY) == v["plaintext"]


@pytest.mark.parametrize("vector", _params(DEK_VECTORS))
def test_node_wrapped_dek_decrypts(vector: dict[str, Any] | None) -> None:
    v = _need(vector)
    assert legacy.is_legacy(v["ciphertext"])
    dek = legacy.decrypt_dek(v["ciphertext"], MASTER_KEY)
    assert dek == base64.b64decode(v["dek_base64"])
    assert len(dek) == 32


@pytest.mark.parametrize("vector", _params(VECTORS))
def test_encrypt_from_parts_reproduces_node_vector(vector: dict[str, Any] | None) -> None:
    # Known answers from Node itself: reuse its salt and IV and we must produce its bytes.
    v = _need(vector)
    raw = base64.b64decode(v["ciphertext"])
    plaintext = v["dek_base64"] if v.get("kind") == "encrypted_dek" else v["plaintext"]
    assert legacy._encrypt_from_parts(plaintext, MASTER_KEY, raw[:32], raw[32:48]) == v["ciphertext"]


def test_known_answer_from_fixed_parts() -> None:
    value = legacy._encrypt_from_parts(KAT_PLAINTEXT, KAT_MASTER_KEY, KAT_SALT, KAT_IV)
    assert value == KAT_VALUE
    assert legacy.decrypt(KAT_VALUE, KAT_MASTER_KEY) == KAT_PLAINTEXT


# --- round trips -------------------------------------------------------------------------

_large_text = st.builds(lambda chunk, n: chunk * n, st.text(min_size=1, max_size=40), st.integers(50, 3000))


@settings(max_examples=15, deadline=None)
@given(
    plaintext=st.one_of(st.text(), _large_text),
    master_key=st.text(min_size=1, max_size=40).filter(str.strip),
)
@example(plaintext="", master_key=MASTER_KEY)
@example(
    plaintext="ключ-🔑-\x00-\u200d-\U0001d518\U0001d52b-漢字-\u0645\u0641\u062a\u0627\u062d",
    master_key="ключ-🔑",
)
def test_round_trip(plaintext: str, master_key: str) -> None:
    value = legacy.encrypt(plaintext, master_key)
    assert legacy.is_legacy(value)
    assert len(base64.b64decode(value)) == 64 + len(plaintext.encode("utf-8"))
    assert legacy.decrypt(value, master_key) == plaintext


def test_round_trip_at_the_size_limit() -> None:
    # The longest plaintext whose value is exactly MAX_VALUE_CHARS; one byte more is refused,
    # so encrypt() never returns a value decrypt() would reject.
    longest = legacy.MAX_VALUE_CHARS // 4 * 3 - 64
    value = legacy.encrypt("é" * (longest // 2), MASTER_KEY)
    assert len(value) == legacy.MAX_VALUE_CHARS
    assert legacy.decrypt(value, MASTER_KEY) == "é" * (longest // 2)
    with pytest.raises(InvalidValue, match="too long"):
        legacy.encrypt("x" * (longest + 1), MASTER_KEY)


def test_encrypt_lengths_match_the_old_service() -> None:
    assert len(legacy.encrypt("k" * 108, MASTER_KEY)) == 232
    wrapped = legacy.encrypt(_b64(os.urandom(32)), MASTER_KEY)
    assert len(wrapped) == 144


def test_encrypt_uses_fresh_salt_and_iv() -> None:
    a = base64.b64decode(legacy.encrypt("same", MASTER_KEY))
    b = base64.b64decode(legacy.encrypt("same", MASTER_KEY))
    assert a[:32] != b[:32]
    assert a[32:48] != b[32:48]


def test_encrypt_rejects_bad_plaintext() -> None:
    with pytest.raises(InvalidValue) as info:
        legacy.encrypt("secret-\ud800", MASTER_KEY)
    assert info.value.__cause__ is None
    assert info.value.__context__ is None  # the UnicodeEncodeError holds the plaintext
    _assert_hygienic(info.value, "secret")
    with pytest.raises(InvalidValue):
        legacy.encrypt(b"bytes", MASTER_KEY)  # type: ignore[arg-type]


def test_dek_round_trip() -> None:
    dek = os.urandom(32)
    assert legacy.decrypt_dek(legacy.encrypt(_b64(dek), MASTER_KEY), MASTER_KEY) == dek


# --- tampering, wrong keys, bad plaintexts ----------------------------------------------------

_REGIONS = {"salt": (0, 32), "iv": (32, 16), "tag": (48, 16), "data": (64, 39)}
FLIPS = [
    *[("salt", i) for i in (0, 1, 2, 8, 15, 16, 24, 30, 31)],
    *[("iv", i) for i in (0, 1, 5, 8, 11, 12, 14, 15)],
    *[("tag", i) for i in (0, 1, 3, 7, 8, 12, 14, 15)],
    *[("data", i) for i in (0, 1, 2, 5, 9, 10, 15, 20, 25, 30, 33, 35, 36, 37, 38)],
]


@pytest.mark.parametrize(("region", "offset"), FLIPS, ids=[f"{r}-{o}" for r, o in FLIPS])
def test_any_flipped_byte_fails_authentication(node_value: dict[str, Any], region: str, offset: int) -> None:
    # A salt flip changes the derived key; an IV, tag or data flip breaks the GCM tag.
    raw = bytearray(base64.b64decode(node_value["ciphertext"]))
    start, size = _REGIONS[region]
    assert len(raw) == 64 + 39 and offset < size
    raw[start + offset] ^= 1 << (offset % 8) if offset % 3 else 0xFF
    tampered = _b64(bytes(raw))
    assert legacy.is_legacy(tampered)
    with pytest.raises(DecryptionFailed) as info:
        legacy.decrypt(tampered, MASTER_KEY)
    assert type(info.value) is DecryptionFailed
    assert str(info.value) == AUTH_FAILED


def test_wrong_master_key_fails(node_value: dict[str, Any]) -> None:
    with pytest.raises(DecryptionFailed) as info:
        legacy.decrypt(node_value["ciphertext"], "shared-master-key-2025-10-28")
    assert type(info.value) is DecryptionFailed
    assert str(info.value) == AUTH_FAILED
    assert type(info.value.__cause__).__name__ == "InvalidTag"
    _assert_hygienic(info.value, node_value["plaintext"], node_value["ciphertext"], MASTER_KEY)


def test_truncated_data_fails_authentication(node_value: dict[str, Any]) -> None:
    raw = base64.b64decode(node_value["ciphertext"])
    for keep in (len(raw) - 1, 64):  # still long enough to parse, so it is the tag that fails
        with pytest.raises(DecryptionFailed, match="failed authentication"):
            legacy.decrypt(_b64(raw[:keep]), MASTER_KEY)


def test_non_utf8_plaintext_is_refused() -> None:
    value = legacy._seal(b"\xff\xfe-secret-\xc3", MASTER_KEY, os.urandom(32), os.urandom(16))
    with pytest.raises(DecryptionFailed, match="not valid UTF-8") as info:
        legacy.decrypt(value, MASTER_KEY)
    assert type(info.value) is DecryptionFailed
    # The UnicodeDecodeError holds the plaintext, so it must not be chained.
    assert info.value.__cause__ is None
    assert info.value.__context__ is None
    _assert_hygienic(info.value, "secret", value, MASTER_KEY)


@pytest.mark.parametrize(
    ("wrapped", "match"),
    [
        ("sk-ant-api03-not-a-dek", "not base64"),
        (_b64(bytes(31)), "31 bytes, expected 32"),
        (_b64(bytes(32)).rstrip("="), "not base64"),
    ],
    ids=["api-key", "31-bytes", "unpadded"],
)
def test_decrypt_dek_refuses_what_is_not_a_dek(wrapped: str, match: str) -> None:
    value = legacy._encrypt_from_parts(wrapped, MASTER_KEY, KAT_SALT, KAT_IV)
    with pytest.raises(DecryptionFailed, match=match) as info:
        legacy.decrypt_dek(value, MASTER_KEY)
    _assert_hygienic(info.value, wrapped, value, MASTER_KEY)


@pytest.mark.parametrize("master_key", ["", "   ", "\t\n", None, b"bytes-key", "\ud800-lone-surrogate"])
def test_missing_or_unusable_master_key(master_key: Any) -> None:
    with pytest.raises(WeakKeyError) as info:
        legacy.decrypt(KAT_VALUE, master_key)
    assert info.value.__cause__ is None
    _assert_hygienic(info.value, "lone-surrogate")
    with pytest.raises(WeakKeyError):
        legacy.encrypt("x", master_key)
    with pytest.raises(WeakKeyError):
        legacy.decrypt_many([KAT_VALUE], master_key)


# --- malformed values: refused before any scrypt ----------------------------------------------

_LONG = _b64(bytes(range(256)) * 4)  # 1024 bytes; 1024 % 3 == 1, so it ends in "=="
MALFORMED = {
    "empty": "",
    "not-base64": "this is not base64 at all, not even close!!" * 3,
    "too-short-63": _b64(bytes(63)),
    "too-short-48": _b64(bytes(48)),
    "missing-padding": _LONG.rstrip("="),
    "extra-padding": _LONG + "==",
    "padding-inside": _LONG[:40] + "=" + _LONG[41:],
    "trailing-newline": _LONG + "\n",
    "leading-space": " " + _LONG,
    "mime-wrapped": "\n".join(_LONG[i : i + 76] for i in range(0, len(_LONG), 76)),
    "urlsafe-alphabet": base64.urlsafe_b64encode(bytes(range(256)) * 4).decode(),
    "nonzero-trailing-bits": _LONG[:-3] + "x==",  # ".w==" -> ".x==" decodes to the same bytes
    "nul-suffix": _LONG + "\x00",
    "nul-only": "\x00" * 100,
    "non-ascii": "ключ" + _LONG,
    "lone-surrogate": _LONG[:-4] + "\ud800AA=",
    "kr1": "kr1:3:" + base64.urlsafe_b64encode(bytes(60)).decode(),
    "kr1-around-base64": "kr1:" + _LONG,
    "oversized": "A" * (legacy.MAX_VALUE_CHARS + 4),
}


@pytest.mark.parametrize("blob", list(MALFORMED.values()), ids=list(MALFORMED))
def test_malformed_value(blob: str) -> None:
    assert not legacy.is_legacy(blob)
    with pytest.raises(MalformedCiphertext) as info:
        legacy.decrypt(blob, MASTER_KEY)
    _assert_hygienic(info.value, blob, MASTER_KEY)


def test_malformed_values_are_refused_without_scrypt() -> None:
    # 20 rounds of every case would be ~400 scrypts (20+ s) if any reached the KDF.
    start = time.perf_counter()
    for _ in range(20):
        for blob in MALFORMED.values():
            with pytest.raises(MalformedCiphertext):
                legacy.decrypt(blob, MASTER_KEY)
    assert time.perf_counter() - start < 2.0


def test_non_canonical_trailing_bits_case_is_real() -> None:
    # The "nonzero-trailing-bits" case only tests something if lenient decoding accepts it.
    assert base64.b64decode(MALFORMED["nonzero-trailing-bits"]) == base64.b64decode(_LONG)


@pytest.mark.parametrize("blob", [None, b"AAAA" * 30, 42, ["AAAA"]])
def test_non_str_values(blob: Any) -> None:
    assert legacy.is_legacy(blob) is False
    with pytest.raises(MalformedCiphertext):
        legacy.decrypt(blob, MASTER_KEY)


def test_truncated_text_is_malformed() -> None:
    for cut in (1, 2, 3, 5, 100, len(KAT_VALUE) - 1):
        assert not legacy.is_legacy(KAT_VALUE[:-cut])
        with pytest.raises(MalformedCiphertext):
            legacy.decrypt(KAT_VALUE[:-cut], MASTER_KEY)


# --- is_legacy --------------------------------------------------------------------------


@settings(max_examples=300, deadline=None)
@given(value=st.text())
@example(value="")
@example(value="kr1:")
@example(value="=" * 88)
@example(value="\ud800" * 88)
def test_is_legacy_never_raises(value: str) -> None:
    result = legacy.is_legacy(value)
    assert isinstance(result, bool)
    if result:
        assert base64.b64encode(base64.b64decode(value)).decode() == value
        assert len(base64.b64decode(value)) >= 64


@settings(max_examples=300, deadline=None)
@given(raw=st.binary(max_size=300))
def test_is_legacy_on_encoded_bytes(raw: bytes) -> None:
    canonical = _b64(raw)
    assert legacy.is_legacy(canonical) is (len(raw) >= 64)
    if len(raw) % 3:
        assert not legacy.is_legacy(canonical.rstrip("="))
    assert not legacy.is_legacy(canonical + "\n")
    assert not legacy.is_legacy("kr1:" + canonical)


def test_is_legacy_is_cheap() -> None:
    # 2,000 scrypts would take over a minute; a shape check takes milliseconds.
    value = next((v["ciphertext"] for v in VALUE_VECTORS if v["length"] > 5000), KAT_VALUE)
    start = time.perf_counter()
    assert all(legacy.is_legacy(value) for _ in range(2000))
    assert time.perf_counter() - start < 1.0


# --- off the event loop ------------------------------------------------------------------


def test_decrypt_async_matches_decrypt() -> None:
    async def main() -> tuple[str, str]:
        with ThreadPoolExecutor(max_workers=2) as pool:
            a = await legacy.decrypt_async(KAT_VALUE, KAT_MASTER_KEY)
            b = await legacy.decrypt_async(KAT_VALUE, KAT_MASTER_KEY, executor=pool)
        return a, b

    assert asyncio.run(main()) == (KAT_PLAINTEXT, KAT_PLAINTEXT)


def test_decrypt_async_raises_typed_errors() -> None:
    with pytest.raises(DecryptionFailed, match="failed authentication"):
        asyncio.run(legacy.decrypt_async(KAT_VALUE, "not-the-key"))
    with pytest.raises(MalformedCiphertext):
        asyncio.run(legacy.decrypt_async("kr1:1:AAAA", KAT_MASTER_KEY))


def test_decrypt_async_does_not_block_the_loop() -> None:
    async def main() -> tuple[str, int, float]:
        ticks = 0
        stop = asyncio.Event()

        async def ticker() -> None:
            nonlocal ticks
            while not stop.is_set():
                await asyncio.sleep(0.001)
                ticks += 1

        task = asyncio.create_task(ticker())
        await asyncio.sleep(0)
        before, start = ticks, time.perf_counter()
        plaintext = await legacy.decrypt_async(KAT_VALUE, KAT_MASTER_KEY)
        during, elapsed = ticks - before, time.perf_counter() - start
        stop.set()
        await task
        return plaintext, during, elapsed

    plaintext, during, elapsed = asyncio.run(main())
    assert plaintext == KAT_PLAINTEXT
    # Run on the loop, scrypt (tens of ms) would allow zero ticks until it returned.
    assert during >= 5, f"ticker ticked {during} times during a {elapsed * 1000:.0f} ms decrypt"


# --- bulk --------------------------------------------------------------------------------


def test_decrypt_many_keeps_order_and_per_value_errors() -> None:
    tampered = KAT_VALUE[:-4] + "AAAA"
    assert tampered != KAT_VALUE
    results = legacy.decrypt_many([KAT_VALUE, tampered, "kr1:1:AAAA"], KAT_MASTER_KEY)
    assert results[0] == KAT_PLAINTEXT
    assert type(results[1]) is DecryptionFailed and str(results[1]) == AUTH_FAILED
    assert isinstance(results[2], MalformedCiphertext)
    assert legacy.decrypt_many([], KAT_MASTER_KEY) == []


def test_decrypt_many_in_a_process_pool() -> None:
    # spawn, not fork: the child must import keyrotor.crypto.legacy_format by name and unpickle the results,
    # as a migration's worker processes would.
    assert pickle.loads(pickle.dumps(legacy.decrypt_many)) is legacy.decrypt_many  # noqa: S301
    ctx = multiprocessing.get_context("spawn")
    with ProcessPoolExecutor(max_workers=1, mp_context=ctx) as pool:
        results = pool.submit(
            legacy.decrypt_many, [KAT_VALUE, "AAAA" * 30, KAT_VALUE], KAT_MASTER_KEY
        ).result(timeout=60)
    assert results[0] == results[2] == KAT_PLAINTEXT
    assert isinstance(results[1], DecryptionFailed) and str(results[1]) == AUTH_FAILED
