"""Security (#19, findings 3, 8, 9, 10): bounded inputs and closed defaults.

Each test replays the attack as the review reproduced it, against a real database:

- 3: forged kr1 values (well formed, never authentic) used to fill the parse memo: 100 forged
  1 MiB values kept 235 MiB alive.
- 8: base64 strings shaped like legacy values, each costing one scrypt and one audit row.
- 9: ``/metrics`` bound on every interface, with scope names (tenant ids) in its labels.
- 10: a registered column whose context template gives the same AAD as a named secret.
"""

from __future__ import annotations

import asyncio
import base64
import gc
import os
import sys
import threading
import time
import tracemalloc
from collections.abc import Callable
from pathlib import Path

import pytest
import yaml
from prometheus_client import REGISTRY, generate_latest

from keyrotor import KeyManager, Settings, metrics
from keyrotor.census import columns
from keyrotor.crypto import envelope
from keyrotor.crypto import legacy_format as legacy
from keyrotor.errors import CiphertextTooLarge, DecryptionFailed, InvalidInput, LegacyDecryptThrottled
from keyrotor.keys import max_ciphertext_chars
from keyrotor.opening import PARSED_BUDGET_BYTES
from tests.cli_helpers import keyrotor
from tests.conftest import MASTER_KEY
from tests.legacy_helpers import store_legacy_secret
from tests.rotation_helpers import fetch

ROOT = Path(__file__).resolve().parents[2]


def _forged_kr1(n_bytes: int) -> str:
    """A well-formed kr1 value of version 1 whose tag is random: it never authenticates."""
    return "kr1:1:" + base64.urlsafe_b64encode(os.urandom(n_bytes)).decode().rstrip("=")


def _memo_bytes(km: KeyManager) -> int:
    memo = km.opener._parsed
    return sum(sys.getsizeof(k) + sys.getsizeof(v) + sys.getsizeof(v[1]) for k, v in memo.items())


async def test_forged_large_values_are_refused_unread(km: KeyManager, record: Callable[..., None]) -> None:
    await km.encrypt("openai", "sk-real")  # the scope and its DEK exist: forgeries reach the tag check
    limit = max_ciphertext_chars(km.settings.max_value_bytes)
    forged = [_forged_kr1(1 << 20) for _ in range(20)]
    assert all(len(f) > limit for f in forged)
    worst = 0.0
    for value in forged:
        t0 = time.perf_counter()
        with pytest.raises(CiphertextTooLarge):
            await km.decrypt("openai", value)
        worst = max(worst, time.perf_counter() - t0)
    assert not km.opener._parsed
    # Parsing a 1.4 M character value (strict base64url) alone takes milliseconds; refused
    # before any work, a call costs a length check and its audit event.
    assert worst < 0.05
    # The largest real value still opens: the bound is derived from KEYROTOR_MAX_VALUE_BYTES.
    big = "x" * km.settings.max_value_bytes
    assert await km.decrypt("openai", await km.encrypt("openai", big)) == big
    record(
        "security",
        finding=3,
        what="forged 1 MiB kr1 values refused before parsing (CiphertextTooLarge)",
        tries=len(forged),
        held=len(forged),
        worst_ms=round(worst * 1000, 2),
    )


async def test_memo_keeps_nothing_forged_and_stays_in_budget(
    km: KeyManager, record: Callable[..., None]
) -> None:
    await km.encrypt("openai", "sk-real")
    gc.collect()
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        for _ in range(200):  # the largest value under the limit, each a new forgery
            with pytest.raises(DecryptionFailed):
                await km.decrypt("openai", _forged_kr1(km.settings.max_value_bytes))
        gc.collect()
        retained = tracemalloc.get_traced_memory()[0] - before
    finally:
        tracemalloc.stop()
    assert not km.opener._parsed
    assert retained < 2 * 1024 * 1024, retained  # today's code kept ~9 MB of these 200
    # Authentic values are kept, within the byte budget however many there are.
    tokens = [await km.encrypt("openai", f"sk-{i:06d}-" + "k" * 100) for i in range(3000)]
    for token in tokens:
        await km.decrypt("openai", token)
    held = _memo_bytes(km)
    assert len(km.opener._parsed) > 0 and held <= PARSED_BUDGET_BYTES
    assert km.opener._parsed_bytes <= PARSED_BUDGET_BYTES
    record(
        "security",
        finding=3,
        what="parse memo after 200 forged 32 KiB values, then 3,000 authentic ones",
        tries=200,
        held=200,
        retained_kib=round(retained / 1024),
        memo_kib=round(held / 1024),
        budget_kib=PARSED_BUDGET_BYTES // 1024,
    )


def _forged_legacy() -> str:
    """A value legacy.is_legacy accepts (96 random bytes, base64) that never authenticates."""
    return base64.b64encode(os.urandom(96)).decode()


async def test_legacy_failures_are_bounded_and_throttled_per_actor(
    env: dict[str, str], record: Callable[..., None]
) -> None:
    s = Settings.from_env(
        {**env, "KEYROTOR_LEGACY_DECRYPT_CONCURRENCY": "2", "KEYROTOR_LEGACY_FAILURES_PER_MINUTE": "3"}
    )
    good = legacy.encrypt("sk-ant-legacy", MASTER_KEY)
    async with KeyManager(s) as km:
        await km.encrypt("openai", "sk-real")
        # A legacy value opens only through the row it lives in (finding 1): the forgeries are
        # stored as secrets, as a writer of the table could, so each reaches the scrypt.
        attempts = 30
        forged = [_forged_legacy() for _ in range(attempts + 50)]
        for i, value in enumerate(forged):
            await store_legacy_secret(env["DATABASE_URL"], "openai", f"f{i}", value)
        await store_legacy_secret(env["DATABASE_URL"], "openai", "good", good)
        threads: set[str] = set()
        stop = False

        def sample() -> None:  # the threads that run scrypt, seen while the attack runs
            while not stop:
                threads.update(t.name for t in threading.enumerate())
                time.sleep(0.002)

        sampler = threading.Thread(target=sample)
        sampler.start()
        t0 = time.perf_counter()
        results = await asyncio.gather(
            *(
                km.decrypt("openai", forged[i], context=f"secret:f{i}", actor="mallory")
                for i in range(attempts)
            ),
            return_exceptions=True,
        )
        elapsed = time.perf_counter() - t0
        stop = True
        sampler.join(timeout=5)
        failed = [r for r in results if type(r) is DecryptionFailed]
        throttled = [r for r in results if isinstance(r, LegacyDecryptThrottled)]
        assert len(failed) == 3 and len(throttled) == attempts - 3, results
        legacy_threads = {t for t in threads if t.startswith("keyrotor-legacy")}
        assert 1 <= len(legacy_threads) <= 2
        assert not any(t.startswith("asyncio_") for t in threads)  # never the default executor
        # Refused fast from now on: no scrypt.
        t1 = time.perf_counter()
        for i in range(attempts, attempts + 50):
            with pytest.raises(LegacyDecryptThrottled):
                await km.decrypt("openai", forged[i], context=f"secret:f{i}", actor="mallory")
        refused_ms = (time.perf_counter() - t1) * 1000 / 50
        # A refusal runs no scrypt: it costs a small part of one scrypt measured now, on the same
        # machine under the same load (a fixed bound in ms fails on a busy machine).
        t2 = time.perf_counter()
        legacy.decrypt(good, MASTER_KEY)
        scrypt_ms = (time.perf_counter() - t2) * 1000
        assert refused_ms < max(5.0, scrypt_ms / 4), (refused_ms, scrypt_ms)
        # Another actor is not affected; its legacy value opens.
        assert await km.decrypt("openai", good, context="secret:good", actor="alice") == "sk-ant-legacy"
        await km.flush_audit()
    rows = await fetch(
        env["DATABASE_URL"],
        "SELECT event_type, count(*) AS n FROM encryption_audit_log WHERE actor = 'mallory' GROUP BY 1",
    )
    counts = {r["event_type"]: r["n"] for r in rows}
    assert counts == {"failed_decrypt": 3, "unauthorized": 1}, counts
    record(
        "security",
        finding=8,
        what="forged legacy values from one actor (limit 3 a minute, 2 at once)",
        tries=attempts + 50,
        held=attempts + 50,
        scrypt_runs=3,
        audit_rows=4,
        attack_s=round(elapsed, 2),
        refused_ms=round(refused_ms, 3),
    )


def test_metrics_bind_loopback_and_scope_labels_can_be_hashed(record: Callable[..., None]) -> None:
    assert Settings.from_env({"ENCRYPTION_KEY": MASTER_KEY}).metrics_host == "127.0.0.1"
    # The examples that are scraped over a network say so explicitly.
    compose = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
    assert compose["x-keyrotor"]["environment"]["KEYROTOR_METRICS_HOST"] == "0.0.0.0"  # noqa: S104
    configmap = yaml.safe_load((ROOT / "deploy/k8s/configmap.yaml").read_text())
    assert configmap["data"]["KEYROTOR_METRICS_HOST"] == "0.0.0.0"  # noqa: S104
    tenant = f"tenant-{os.urandom(4).hex()}/openai"
    try:
        for mode in ("hashed", "off"):
            metrics.configure_scope_labels(mode)
            metrics.rotation_completed(tenant, 1.0)
            metrics.ROTATIONS_STARTED.labels(metrics.scope_label(tenant)).inc()
            text = generate_latest(REGISTRY).decode()
            assert tenant not in text
            assert (metrics.scope_label(tenant) in text) and (mode != "hashed" or "h:" in text)
    finally:
        metrics.configure_scope_labels("plain")
    record(
        "security",
        finding=9,
        what="/metrics on loopback by default; hashed and off scope labels",
        tries=2,
        held=2,
    )


async def test_context_template_that_collides_with_secrets_is_refused(
    km: KeyManager, env: dict[str, str], record: Callable[..., None]
) -> None:
    await fetch(env["DATABASE_URL"], "CREATE TABLE app_tokens (id bigint PRIMARY KEY, token text)")
    # The attack: row 7 of a column registered as `secret:{pk}` has the AAD of the secret "7".
    assert envelope.aad("openai", 1, "secret:{pk}".replace("{pk}", "7")) == envelope.aad(
        "openai", 1, "secret:7"
    )
    refused = ["secret:{pk}", "secret:x{pk}", "secret:{pk}:api", "secret::{pk}"]
    for template in refused:
        with pytest.raises(InvalidInput, match="collides"):
            await columns.register(
                km.sessions, "app_tokens.token", pk="id", scope="openai", context_template=template
            )
    done = keyrotor(
        "columns", "register", "app_tokens.token", "--pk", "id", "--scope", "openai",
        "--context-template", "secret:{pk}", env=env,
    )  # fmt: skip
    assert done.returncode == 2 and done.stderr.count("\n") == 1 and "collides" in done.stderr, done.stderr
    # Near misses that cannot produce `secret:<name>` are accepted.
    col = await columns.register(
        km.sessions, "app_tokens.token", pk="id", scope="openai", context_template="secrets:{pk}"
    )
    assert col.context_template == "secrets:{pk}"
    record(
        "security",
        finding=10,
        what="context templates colliding with secret:{pk} refused (library and CLI, exit 2)",
        tries=len(refused) + 2,
        held=len(refused) + 2,
    )


async def test_a_database_error_never_quotes_the_statement_s_parameters(settings: Settings) -> None:
    # keyrotor's errors keep the driver's error as their __cause__, and a logged traceback prints
    # it. SQLAlchemy appends every parameter of the failed statement to that error's text: a
    # failed batch would print its ciphertexts (thousands, in the compare-and-swap) and wrapped
    # DEKs. The engine hides them.
    import traceback

    from sqlalchemy import text as sql_text

    from keyrotor.errors import StoreRejected
    from keyrotor.store import db

    engine = db.create_engine(settings.database_url)
    marker = "kr1:1:" + "Q" * 40
    try:
        with pytest.raises(StoreRejected) as caught:
            async with db.transaction(db.sessionmaker(engine)) as session:
                await session.execute(sql_text("SELECT length(:v) / 0"), {"v": marker})
    finally:
        await engine.dispose()
    printed = "".join(traceback.format_exception(caught.value))
    assert "division by zero" in printed and "parameters hidden" in printed
    assert marker not in printed and "QQQQ" not in printed
