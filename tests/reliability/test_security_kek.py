"""Security (#19, finding 7): the local KEK derivation.

The attack: with a database dump, test guesses at ``ENCRYPTION_KEY`` offline against the key
check value in ``data_keys.kek_id``; with the same fixed salt everywhere, one scrypt per guess
tests every install at once, and predictable keys (``0123456789abcdef0123456789abcdef``,
``my-company-production-encryption-key-2024``) were accepted.
"""

from __future__ import annotations

import base64
import hashlib
import hmac
import time
import uuid
from collections.abc import Callable

import asyncpg
import pytest

from keyrotor import KeyManager, Settings
from keyrotor.errors import WeakKeyError
from keyrotor.kek.base import WrapContext, WrappedDek
from keyrotor.kek.install_salt import read_install_salt
from keyrotor.kek.local import KEY_BYTES, KEY_PREFIX, LocalKeyring, check_master_key
from keyrotor.queue.client import KeyrotorClient
from keyrotor.store import db
from tests.cli_helpers import keyrotor
from tests.conftest import MASTER_KEY, PG_ADMIN
from tests.rotation_helpers import fetch, run_burst_worker

WEAK_KEYS = ["0123456789abcdef0123456789abcdef", "my-company-production-encryption-key-2024"]


def _old_kek(key: str) -> bytes:
    """The derivation every install used before the install salt (written out independently)."""
    return hashlib.scrypt(key.encode(), salt=b"keyrotor/local-kek/v1", n=2**14, r=8, p=1, dklen=32)


def _check_value(kek: bytes) -> str:
    return hmac.new(kek, b"keyrotor key check value", hashlib.sha256).hexdigest()[:16]


@pytest.mark.parametrize("weak", WEAK_KEYS)
def test_weak_keys_are_refused_by_the_cli(
    weak: str, env: dict[str, str], record: Callable[..., None]
) -> None:
    with pytest.raises(WeakKeyError):
        check_master_key(weak)
    done = keyrotor("kek", "status", env={**env, "ENCRYPTION_KEY": weak})
    lines = done.stderr.strip().splitlines()
    assert done.returncode == 2, done.stderr
    assert len(lines) == 1 and lines[0].startswith("keyrotor: error: ENCRYPTION_KEY is too predictable")
    assert weak not in done.stderr + done.stdout
    record("security", finding=7, what=f"weak ENCRYPTION_KEY refused ({weak[:10]}...)", tries=1, held=1)


def test_keygen_gives_32_random_bytes_that_are_accepted(record: Callable[..., None]) -> None:
    keys = set()
    for _ in range(5):
        done = keyrotor("keygen", env={})
        assert done.returncode == 0, done.stderr
        keys.add(done.stdout.strip())
    assert len(keys) == 5
    for key in keys:
        assert key.startswith(KEY_PREFIX)
        body = key[len(KEY_PREFIX) :]
        assert len(base64.urlsafe_b64decode(body + "=")) == KEY_BYTES
        assert check_master_key(key) == key
    # Not 32 bytes after the prefix: refused, not taken for a passphrase.
    with pytest.raises(WeakKeyError):
        check_master_key(KEY_PREFIX + base64.urlsafe_b64encode(b"x" * 31).decode().rstrip("="))
    record("security", finding=7, what="keyrotor keygen: distinct 32-byte keys, accepted", tries=5, held=5)


async def _new_install(name: str) -> str:
    """A database migrated from scratch, as `keyrotor db upgrade` does for a new install."""
    url = PG_ADMIN.rsplit("/", 1)[0] + "/" + name
    await db.ensure_database(url)
    engine = db.create_engine(url)
    try:
        await db.upgrade(engine)
    finally:
        await engine.dispose()
    return url


async def _drop(name: str) -> None:
    conn = await asyncpg.connect(PG_ADMIN)
    try:
        await conn.execute(f"DROP DATABASE IF EXISTS {name} WITH (FORCE)")
    finally:
        await conn.close()


async def test_two_installs_with_one_passphrase_have_different_kek_ids(record: Callable[..., None]) -> None:
    names = [f"kr_sec_{uuid.uuid4().hex[:10]}" for _ in range(2)]
    try:
        urls = [await _new_install(n) for n in names]
        ids: list[str] = []
        salts: list[bytes] = []
        for url in urls:
            s = Settings.from_env({"DATABASE_URL": url, "ENCRYPTION_KEY": MASTER_KEY})
            async with KeyManager(s) as km:
                await km.encrypt("openai", "sk-same-everywhere")
            rows = await fetch(url, "SELECT kek_id FROM data_keys")
            ids.append(rows[0]["kek_id"])
            salt = await read_install_salt(url)
            assert salt is not None and len(salt) == 32
            salts.append(salt)
        assert salts[0] != salts[1]
        assert ids[0] != ids[1] and all(i.startswith("local:v2:") for i in ids)
        # The fixed-salt check value that used to be in every install's rows is in neither.
        old = "local:" + _check_value(_old_kek(MASTER_KEY))
        assert old not in ids
        # Testing a guess against a kek_id takes the KDF (scrypt): time one such test.
        t0 = time.perf_counter()
        guess = hashlib.scrypt(
            MASTER_KEY.encode(), salt=b"keyrotor/local-kek/v2:" + salts[0], n=2**14, r=8, p=1, dklen=32
        )
        kdf_ms = (time.perf_counter() - t0) * 1000
        assert ids[0] == "local:v2:" + _check_value(guess)
        assert kdf_ms > 5
    finally:
        for n in names:
            await _drop(n)
    record(
        "security",
        finding=7,
        what="same passphrase, two fresh installs: different salts and kek_ids; a guess costs one scrypt",
        tries=2,
        held=2,
        kdf_ms=round(kdf_ms, 1),
    )


async def test_deks_wrapped_the_old_way_still_open_and_rewrap_to_v2(
    env: dict[str, str], record: Callable[..., None]
) -> None:
    s = Settings.from_env(env)
    # A process of before the install salt: no salt, the fixed-salt scrypt.
    old_ring = LocalKeyring.from_keys({1: MASTER_KEY}, current=1, install_salt=None)
    async with KeyManager(s, kek=old_ring) as km:
        tokens = {f"tenant-{i}/openai": await km.encrypt(f"tenant-{i}/openai", f"sk-{i}") for i in range(3)}
    rows = await fetch(
        env["DATABASE_URL"], "SELECT k.name, d.* FROM data_keys d JOIN key_scopes k ON k.id = d.scope_id"
    )
    old_id = "local:" + _check_value(_old_kek(MASTER_KEY))
    assert {r["kek_id"] for r in rows} == {old_id}  # exactly today's format
    # Today's code, upgraded: the salted keyring opens them.
    async with KeyManager(s) as km:
        for scope, token in tokens.items():
            assert await km.decrypt(scope, token) == "sk-" + scope.split("-")[1].split("/")[0]
        ring = km.kek
        assert isinstance(ring, LocalKeyring) and ring.install_salt is not None
        items = [
            (
                WrappedDek(r["kek_id"], r["kek_version"], bytes(r["encrypted_dek"])),
                WrapContext(r["name"], r["version"]),
            )
            for r in rows
        ]
        rewrapped = await ring.rewrap(items)
    assert all(w.kek_id.startswith("local:v2:") for w in rewrapped)
    for new, (old, ctx) in zip(rewrapped, items, strict=True):
        assert ring.unwrap_sync(new, ctx) == old_ring.unwrap_sync(old, ctx)
    record(
        "security",
        finding=7,
        what="DEKs wrapped by the pre-salt derivation open, and rewrap to v2",
        tries=3,
        held=3,
    )


async def test_the_documented_move_rewraps_pre_salt_deks_with_rotate_kek(
    wenv: dict[str, str], record: Callable[..., None]
) -> None:
    """docs/providers.md: upgrade, keep the old key as previous, a keygen key as v2, rotate-kek."""
    s = Settings.from_env(wenv)
    old_ring = LocalKeyring.from_keys({1: MASTER_KEY}, current=1, install_salt=None)
    async with KeyManager(s, kek=old_ring) as km:
        tokens = {f"tenant-{i}/openai": await km.encrypt(f"tenant-{i}/openai", f"sk-{i}") for i in range(4)}
    new_key = keyrotor("keygen", env={}).stdout.strip()
    moved = Settings.from_env(
        {
            **wenv,
            "ENCRYPTION_KEY": new_key,
            "ENCRYPTION_KEY_VERSION": "2",
            "ENCRYPTION_KEYS_PREVIOUS": f'{{"1": "{MASTER_KEY}"}}',
        }
    )
    async with KeyrotorClient(moved) as client:
        handle = await client.rotate_kek()
        await run_burst_worker(moved)
        run = await handle.result(timeout_s=30)
    assert run.rows_done == run.rows_total == len(tokens)
    keys = await fetch(wenv["DATABASE_URL"], "SELECT kek_version, kek_id FROM data_keys")
    assert {k["kek_version"] for k in keys} == {2}
    assert all(k["kek_id"].startswith("local:v2:") for k in keys)
    only_new = Settings.from_env({**wenv, "ENCRYPTION_KEY": new_key, "ENCRYPTION_KEY_VERSION": "2"})
    async with KeyManager(only_new) as km:
        for scope, token in tokens.items():
            assert await km.decrypt(scope, token) == "sk-" + scope.split("-")[1].split("/")[0]
    record(
        "security",
        finding=7,
        what="the documented move: rotate-kek rewraps pre-salt DEKs under a keygen key",
        tries=len(tokens),
        held=len(tokens),
    )
