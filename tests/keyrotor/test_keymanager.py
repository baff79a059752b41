"""KeyManager against the real Postgres: round trips, isolation, bad input, cache, concurrency."""

from __future__ import annotations

import asyncio
import json
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pydantic import SecretStr
from sqlalchemy import text

from keyrotor import KeyManager, Settings
from keyrotor.crypto import envelope
from keyrotor.crypto import legacy_format as legacy
from keyrotor.errors import (
    DecryptionFailed,
    InvalidInput,
    InvalidScope,
    InvalidValue,
    KekError,
    KeyrotorError,
    KeyVersionTooOld,
    KeyVersionUnknown,
    MalformedCiphertext,
    ScopeNotFound,
    SecretNotFound,
    StoreUnavailable,
    WeakKeyError,
)
from keyrotor.inputs import MAX_CONTEXT_CHARS
from keyrotor.kek.base import WrapContext, WrappedDek
from tests.conftest import MASTER_KEY
from tests.legacy_helpers import store_legacy_secret

VECTORS = Path(__file__).resolve().parents[2] / ".." / "shared" / "vectors" / "legacy-node.jsonl"
ANTHROPIC = "sk-ant-api03-" + "A1b2C3d4" * 11 + "xyzw1234"


async def test_scope_gets_version_1_on_first_use(km: KeyManager) -> None:
    token = await km.encrypt("tenant-42/openai", "sk-proj-abc", context="row:1")
    assert token.startswith("kr1:1:")
    async with km.engine.connect() as conn:
        row = (await conn.execute(text("SELECT active_version, latest_version FROM key_scopes"))).one()
        keys = (await conn.execute(text("SELECT version, state, kek_id FROM data_keys"))).all()
    assert tuple(row) == (1, 1)
    assert [(k[0], k[1]) for k in keys] == [(1, "active")]
    assert keys[0][2].startswith("local:")


@settings(max_examples=40, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(value=st.text(min_size=1, max_size=2000))
async def test_round_trip_unicode(km: KeyManager, value: str) -> None:
    token = await km.encrypt("openai", value, context="c")
    assert await km.decrypt("openai", token, context="c") == value


async def test_round_trip_at_size_limit(km: KeyManager) -> None:
    value = "é" * (km.settings.max_value_bytes // 2)
    assert await km.decrypt("openai", await km.encrypt("openai", value)) == value


async def test_per_scope_isolation(km: KeyManager) -> None:
    a = await km.encrypt("anthropic", ANTHROPIC, context="x")
    await km.encrypt("openai", "sk-proj-abc", context="x")
    with pytest.raises(DecryptionFailed):
        await km.decrypt("openai", a, context="x")
    with pytest.raises(DecryptionFailed):
        await km.decrypt("anthropic", a, context="y")


@pytest.mark.parametrize(
    ("value", "error"),
    [("", InvalidValue), ("x" * 65536, InvalidValue), ("a\udcff", InvalidValue), (b"bytes", InvalidValue)],
)
async def test_bad_values(km: KeyManager, value: object, error: type[Exception]) -> None:
    with pytest.raises(error):
        await km.encrypt("openai", value)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    "scope", ["", "OpenAI", "a/../b", "a;DROP TABLE secrets", "x" * 300, "/lead", "trail/", "a//b", "ü"]
)
async def test_invalid_scopes(km: KeyManager, scope: str) -> None:
    with pytest.raises(InvalidScope):
        await km.encrypt(scope, "v")
    with pytest.raises(InvalidScope):
        await km.decrypt(scope, "kr1:1:AAAA")


async def test_unknown_scope_and_version(km: KeyManager) -> None:
    token = await km.encrypt("openai", "sk-1")
    with pytest.raises(ScopeNotFound):
        await km.decrypt("google", token.replace("kr1:1:", "kr1:1:"))
    with pytest.raises(KeyVersionUnknown):
        await km.decrypt("openai", token.replace("kr1:1:", "kr1:9:"))


async def test_destroyed_version_refuses(km: KeyManager) -> None:
    token = await km.encrypt("openai", "sk-1")
    async with km.engine.begin() as conn:
        await conn.execute(
            text("UPDATE data_keys SET state = 'destroyed', encrypted_dek = NULL, destroyed_at = now()")
        )
    km.invalidate()
    with pytest.raises(KeyVersionTooOld):
        await km.decrypt("openai", token)


async def test_garbage_ciphertexts(km: KeyManager) -> None:
    await km.encrypt("openai", "sk-1")
    for bad in ["", "hello", "kr1:1:%%%%", "\x00" * 10, "kr1:1:" + "A" * 40]:
        with pytest.raises(DecryptionFailed):
            await km.decrypt("openai", bad)
    with pytest.raises(MalformedCiphertext):
        await km.decrypt("openai", None)  # type: ignore[arg-type]


async def test_put_secrets_refuses_a_name_given_twice_as_bad_input(km: KeyManager) -> None:
    """Two values for one name in one call are the caller's mistake (InvalidInput), not a
    database refusal (StoreRejected, whose driver error quotes the statement's ciphertexts)."""
    with pytest.raises(InvalidInput) as info:
        await km.put_secrets("openai", [("prod", "sk-one-0123456789"), ("prod", "sk-two-0123456789")])
    assert "sk-one" not in str(info.value) and "kr1:" not in str(info.value)
    assert info.value.__cause__ is None
    with pytest.raises(SecretNotFound):  # nothing was stored
        await km.get_secret("openai", "prod")


@pytest.mark.parametrize(
    "context", [None, 5, ["x"], b"u.k:1", "u.k:\ud800", "\udcff", "u.k:" + "9" * MAX_CONTEXT_CHARS]
)
async def test_bad_contexts_raise_typed_errors(km: KeyManager, context: object) -> None:
    """A context that is not text, is not valid Unicode or is longer than any encrypt accepts is
    refused as InvalidInput by every call that takes one, never a bare AttributeError, TypeError
    or UnicodeEncodeError, and never remembered by the AAD memo."""
    token = await km.encrypt("openai", "sk-1", context="u.k:1")
    legacy_value = legacy.encrypt("sk-old", MASTER_KEY)
    aad_entries = envelope.aad.cache_info().currsize
    with pytest.raises(InvalidInput):
        await km.encrypt("openai", "sk-1", context=context)  # type: ignore[arg-type]
    for value in (token, legacy_value):
        with pytest.raises(InvalidInput):
            await km.decrypt("openai", value, context=context)  # type: ignore[arg-type]
    results = await km.decrypt_many("openai", [(token, context), (token, "u.k:1")])  # type: ignore[list-item]
    assert isinstance(results[0], InvalidInput) and results[1] == "sk-1"
    assert envelope.aad.cache_info().currsize <= aad_entries


async def test_decrypt_many_refuses_an_item_that_is_not_text_alone(km: KeyManager) -> None:
    token = await km.encrypt("openai", "sk-1", context="u.k:1")
    results = await km.decrypt_many("openai", [(5, "u.k:1"), (None, "u.k:1"), (token, "u.k:1")])  # type: ignore[list-item]
    assert isinstance(results[0], MalformedCiphertext) and isinstance(results[1], MalformedCiphertext)
    assert results[2] == "sk-1"


async def test_put_get_secret(km: KeyManager) -> None:
    await km.put_secret("anthropic", "prod", ANTHROPIC)
    await km.put_secret("anthropic", "prod", ANTHROPIC + "2")  # replace
    assert await km.get_secret("anthropic", "prod") == ANTHROPIC + "2"
    with pytest.raises(SecretNotFound):
        await km.get_secret("anthropic", "staging")
    with pytest.raises(InvalidInput):
        await km.put_secret("anthropic", " spaced ", "v")
    # a secret's ciphertext is bound to its name: moving it to another row fails
    async with km.engine.begin() as conn:
        await conn.execute(
            text(
                "INSERT INTO secrets (scope_id, name, ciphertext, dek_version) "
                "SELECT scope_id, 'copy', ciphertext, dek_version FROM secrets"
            )
        )
    with pytest.raises(DecryptionFailed):
        await km.get_secret("anthropic", "copy")


async def test_node_vectors_decrypt_through_keymanager(database_url: str, env: dict[str, str]) -> None:
    if not VECTORS.is_file():
        pytest.skip(f"shared vectors not found at {VECTORS}")
    env = {**env, "KEYROTOR_LEGACY_KEY": "shared-master-key-2025-10-27"}
    async with KeyManager.from_env(env) as km:
        for i, line in enumerate(VECTORS.read_text().splitlines()):
            v = json.loads(line)
            if v.get("kind") == "encrypted_dek":
                continue
            # A legacy value opens only through the row it lives in (here a secret of its scope).
            await km.encrypt(v["provider"], "warm-up")
            await store_legacy_secret(database_url, v["provider"], f"v{i}", v["ciphertext"])
            context = f"secret:v{i}"
            assert await km.decrypt(v["provider"], v["ciphertext"], context=context) == v["plaintext"]


async def test_legacy_wrong_key(km: KeyManager, database_url: str) -> None:
    blob = legacy.encrypt("sk-old", "another-master-key-that-is-long-enough!!")
    await km.encrypt("openai", "sk-new")
    await store_legacy_secret(database_url, "openai", "old", blob)
    with pytest.raises(DecryptionFailed):
        await km.decrypt("openai", blob, context="secret:old")


async def test_cache_hits_and_ttl(settings: Settings) -> None:
    s = settings.model_copy(update={"dek_cache_ttl_s": 0.2})
    async with KeyManager(s) as km:
        token = await km.encrypt("openai", "sk-1")
        km.invalidate()
        await km.decrypt("openai", token)
        before = km.cache.stats.misses
        for _ in range(10):
            await km.decrypt("openai", token)
        assert km.cache.stats.misses == before
        assert km.cache.stats.hits >= 10
        await asyncio.sleep(0.25)
        await km.decrypt("openai", token)
        assert km.cache.stats.misses == before + 1


async def test_cache_bounded_by_count(settings: Settings) -> None:
    s = settings.model_copy(update={"dek_cache_max_entries": 3})
    async with KeyManager(s) as km:
        for i in range(6):
            await km.encrypt(f"scope-{i}", "v")
        assert len(km.cache) == 3
        assert km.cache.stats.evictions >= 3


async def test_concurrent_misses_share_one_unwrap(km: KeyManager) -> None:
    token = await km.encrypt("openai", "sk-1")
    km.invalidate()
    calls = 0
    real = km.kek.unwrap

    async def counting(wrapped: WrappedDek, context: WrapContext) -> bytes:
        nonlocal calls
        calls += 1
        return await real(wrapped, context)

    km._kek = type("Counting", (), {"unwrap": staticmethod(counting), "aclose": km.kek.aclose})()
    results = await asyncio.gather(*(km.decrypt("openai", token) for _ in range(50)))
    assert results == ["sk-1"] * 50
    assert calls == 1


async def test_a_cancelled_first_use_does_not_cancel_the_calls_that_joined_it(km: KeyManager) -> None:
    """Concurrent misses share one unwrap; if the caller that started it is cancelled (its own
    timeout, its client gone) while the KEK answers, the callers that joined it still get the
    value, not a CancelledError nobody asked for."""
    token = await km.encrypt("openai", "sk-1")
    km.invalidate()
    real = km.kek.unwrap
    entered, gate = asyncio.Event(), asyncio.Event()

    async def slow(wrapped: WrappedDek, context: WrapContext) -> bytes:
        entered.set()
        await asyncio.wait_for(gate.wait(), timeout=10)  # a KMS round trip under way
        return await real(wrapped, context)

    km._kek = type("Slow", (), {"unwrap": staticmethod(slow), "aclose": km.kek.aclose})()
    first = asyncio.create_task(km.decrypt("openai", token))
    await asyncio.wait_for(entered.wait(), timeout=10)
    joined = asyncio.create_task(km.decrypt("openai", token))
    await asyncio.sleep(0.05)  # joined is waiting on the shared unwrap
    first.cancel()
    await asyncio.sleep(0.05)
    gate.set()
    assert await asyncio.wait_for(joined, timeout=10) == "sk-1"
    with pytest.raises(asyncio.CancelledError):
        await first


async def test_concurrent_encrypt_decrypt_many_tasks(km: KeyManager) -> None:
    async def worker(i: int) -> None:
        for j in range(20):
            scope = f"tenant-{i % 5}/openai"
            value = f"sk-{i}-{j}"
            token = await km.encrypt(scope, value, context=f"{i}:{j}")
            assert await km.decrypt(scope, token, context=f"{i}:{j}") == value

    await asyncio.gather(*(worker(i) for i in range(40)))


async def test_concurrent_scope_creation_from_two_managers(settings: Settings) -> None:
    async with KeyManager(settings) as a, KeyManager(settings) as b:
        tokens = await asyncio.gather(*(m.encrypt("google", "AIza-1") for m in (a, b) * 10))
        for t in tokens:
            assert await a.decrypt("google", t) == "AIza-1"
            assert await b.decrypt("google", t) == "AIza-1"


async def test_wrong_master_key_is_named(settings: Settings) -> None:
    async with KeyManager(settings) as km:
        token = await km.encrypt("openai", "sk-1")
    other = settings.model_copy(update={"encryption_key": SecretStr("z" * 10 + MASTER_KEY[::-1])})
    # Refused when it opens: the audit chain's key does not unwrap either.
    with pytest.raises(KekError) as info:
        async with KeyManager(other) as km2:
            await km2.decrypt("openai", token)
    assert "wrong KEK" in str(info.value)


@pytest.mark.parametrize("key", [None, "", "tiny-key-9", "a" * 64, "abababababababababababababababab"])
async def test_missing_or_weak_key_refused(settings: Settings, key: str | None) -> None:
    s = Settings.from_env(
        {"DATABASE_URL": settings.database_url, **({"ENCRYPTION_KEY": key} if key is not None else {})}
    )
    with pytest.raises(WeakKeyError) as info:
        async with KeyManager(s):
            pass
    if key:
        assert key not in str(info.value)


async def test_unreachable_database_is_transient() -> None:
    s = Settings.from_env(
        {
            "DATABASE_URL": "postgresql://postgres@127.0.0.1:1/none",
            "ENCRYPTION_KEY": MASTER_KEY,
            # No database to flush the audit queue into: do not wait the default 10 s at close.
            "KEYROTOR_AUDIT_CLOSE_TIMEOUT_SECONDS": "0",
        }
    )
    async with KeyManager(s) as km:
        with pytest.raises(StoreUnavailable):
            await km.encrypt("openai", "sk-1")


async def test_errors_and_reprs_never_contain_secrets(km: KeyManager) -> None:
    token = await km.encrypt("anthropic", ANTHROPIC, context="a")
    texts = [repr(km), repr(km.settings), str(km.settings), repr(km.kek)]
    for call in (
        km.decrypt("anthropic", token, context="b"),
        km.decrypt("openai", token, context="a"),
        km.encrypt("anthropic", ANTHROPIC * 400),
    ):
        try:
            await call
        except KeyrotorError as exc:
            texts += [str(exc), repr(exc), repr(exc.__cause__)]
    joined = "\n".join(texts)
    assert ANTHROPIC not in joined and ANTHROPIC[:30] not in joined
    assert MASTER_KEY not in joined


async def test_parse_memo_never_bypasses_authentication(
    km: KeyManager, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The decrypt path memoises parsed values (ciphertext only): every call still authenticates."""
    from keyrotor import opening

    tokens = [await km.encrypt("anthropic", f"{ANTHROPIC}-{i}", context=f"user:{i}") for i in range(5)]
    # Room for 3 entries (text + raw bytes + overhead): the memo empties itself many times below.
    monkeypatch.setattr(opening, "PARSED_BUDGET_BYTES", 3 * (2 * len(tokens[0]) + opening.PARSED_OVERHEAD))
    for _ in range(3):
        for i, token in enumerate(tokens):
            assert await km.decrypt("anthropic", token, context=f"user:{i}") == f"{ANTHROPIC}-{i}"
    assert 0 < len(km.opener._parsed) <= 3
    memo = repr(km.opener._parsed).encode() + b"".join(raw for _, raw in km.opener._parsed.values())
    assert ANTHROPIC.encode() not in memo and ANTHROPIC not in repr(km.opener._parsed)
    # A memoised value decrypts only in its own scope and context.
    with pytest.raises(DecryptionFailed):
        await km.decrypt("anthropic", tokens[4], context="user:3")
    with pytest.raises((DecryptionFailed, KeyVersionUnknown, ScopeNotFound)):
        await km.decrypt("openai", tokens[4], context="user:4")
    # A different text is a different memo entry: one flipped character fails authentication.
    flipped = tokens[4][:-3] + ("A" if tokens[4][-3] != "A" else "B") + tokens[4][-2:]
    with pytest.raises(DecryptionFailed):
        await km.decrypt("anthropic", flipped, context="user:4")
    assert await km.decrypt("anthropic", tokens[4], context="user:4") == f"{ANTHROPIC}-4"


@pytest.mark.parametrize("refresh_ahead", [0.5, 0.0])
async def test_refresh_ahead_keeps_a_key_in_use_cached(settings: Settings, refresh_ahead: float) -> None:
    """A hit late in a DEK's life re-unwraps it in the background; without that, it expires."""
    s = settings.model_copy(update={"dek_cache_ttl_s": 1.0, "dek_cache_refresh_ahead": refresh_ahead})
    async with KeyManager(s) as km:
        token = await km.encrypt("openai", "sk-1")
        km.invalidate()
        await km.decrypt("openai", token)  # miss: loaded at t0, expires at t0 + 1.0
        misses = km.cache.stats.misses
        await asyncio.sleep(0.6)  # past half its life: inside the refresh window (if on)
        assert await km.decrypt("openai", token) == "sk-1"
        for _ in range(100):  # the background unwrap, if one was started
            if not km._refreshing:
                break
            await asyncio.sleep(0.01)
        await asyncio.sleep(0.6)  # t0 + 1.2: the first load has expired
        assert await km.decrypt("openai", token) == "sk-1"
        assert km.cache.stats.misses == misses + (0 if refresh_ahead else 1)


def test_dek_cache_marks_entries_due_in_their_refresh_window() -> None:
    from cryptography.hazmat.primitives.ciphers.aead import AESGCM

    from keyrotor.cache import DekCache

    now = 0.0
    cache = DekCache(ttl_s=100.0, refresh_ahead=0.25, clock=lambda: now)
    cipher = AESGCM(AESGCM.generate_key(256))
    cache.put("openai", 1, cipher)
    now = 74.0
    assert cache.get("openai", 1) is cipher and not cache.due
    now = 76.0
    assert cache.get("openai", 1) is cipher and cache.take_due() == [("openai", 1)] and not cache.due
    cache.get("openai", 1)
    cache.put("openai", 1, cipher)  # refreshed: a new life, no longer due
    assert not cache.due and cache.get("openai", 1) is cipher and not cache.due
    now = 200.0
    assert cache.get("openai", 1) is None  # expired: a miss, never "due"
    cache.put("openai", 2, cipher)
    now = 280.0
    cache.get("openai", 2)
    cache.invalidate("openai")
    assert not cache.due and len(cache) == 0
    with pytest.raises(ValueError):
        DekCache(refresh_ahead=1.0)
