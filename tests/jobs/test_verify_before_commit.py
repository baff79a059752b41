"""Re-encryption verifies each new value before it overwrites the old one: forced to fail here.

The crypto is real (AES-256-GCM of pyca/cryptography, the real DEKs); only the output of the new
DEK's encrypt is corrupted, as a faulty cipher implementation or a bit flip in memory would. The
batch must write nothing, the run must fail naming the row (table and key), and every stored
value must still decrypt.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import cast

import pytest
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from keyrotor import KeyManager, Settings
from keyrotor.kek.base import WrappedDek
from keyrotor.rotation import dek as rotation
from keyrotor.rotation import reencrypt
from keyrotor.rotation.context import RotationContext
from keyrotor.rotation.reencrypt import RowFailed
from tests.jobs.conftest import settings_of
from tests.rotation_helpers import fetch, keyrotor

ROWS = 24


class CorruptingCipher:
    """A real AES-256-GCM cipher whose ``encrypt`` output has its last byte flipped.

    What it seals no decrypt accepts (the tag no longer matches); ``decrypt`` is the real one.
    """

    def __init__(self, real: AESGCM, good: int = 0) -> None:
        self._real = real
        self._good = good  # seals left intact before the corruption starts
        self.sealed = 0

    def encrypt(self, nonce: bytes, data: bytes, associated_data: bytes | None) -> bytes:
        out = bytearray(self._real.encrypt(nonce, data, associated_data))
        self.sealed += 1
        if self.sealed > self._good:
            out[-1] ^= 0x01
        return bytes(out)

    def decrypt(self, nonce: bytes, data: bytes, associated_data: bytes | None) -> bytes:
        return self._real.decrypt(nonce, data, associated_data)


@dataclass
class CorruptingContext(RotationContext):
    """Rotation dependencies whose cipher for DEK ``corrupt_version`` is a :class:`CorruptingCipher`."""

    corrupt_version: int = 2
    good: int = 0
    corrupted: CorruptingCipher | None = None

    async def cipher(self, scope: str, version: int, wrapped: WrappedDek) -> AESGCM:
        real = await super().cipher(scope, version, wrapped)
        if version != self.corrupt_version:
            return real
        self.corrupted = CorruptingCipher(real, self.good)
        return cast(AESGCM, self.corrupted)


def _quiet(s: Settings) -> Settings:
    return s.model_copy(update={"listen_key_changes": False})


async def _snapshot(s: Settings) -> list[tuple[str, str]]:
    return [(r[0], r[1]) for r in await fetch(s.database_url, "SELECT id, api_key FROM accounts ORDER BY id")]


# One transaction, and fanned out into ranges; the first row fails, or a row of a later slice
# of its batch (slices of 4 rows): the UPDATEs of the slices before it were already sent.
@pytest.mark.parametrize(("small", "good"), [("1000", 0), ("5", 0), ("1000", 10), ("5", 5)])
async def test_a_value_that_does_not_verify_stops_the_run_and_writes_nothing(
    wenv: dict[str, str], small: str, good: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(reencrypt, "PIPELINE_ROWS", 4)
    s = settings_of(wenv, KEYROTOR_SMALL_SCOPE_ROWS=small, KEYROTOR_REENCRYPT_RANGE_ROWS="8")
    await fetch(s.database_url, "CREATE TABLE accounts (id text PRIMARY KEY, api_key text)")
    keys = [f"acct:{i:02d}:ü" for i in range(ROWS)]
    plain = {k: f"sk-proj-{i:04d}-verify-before-commit" for i, k in enumerate(keys)}
    async with KeyManager(_quiet(s)) as km:
        for k in keys:
            token = await km.encrypt("openai", plain[k], context=f"accounts.api_key:{k}")
            await fetch(s.database_url, "INSERT INTO accounts VALUES ($1, $2)", k, token)
    reg = keyrotor("columns", "register", "accounts.api_key", "--pk", "id", "--scope", "openai", env=wenv)
    assert reg.returncode == 0, reg.stderr
    before = await _snapshot(s)
    failing = before[good][0]  # in key order, as the rows are re-encrypted

    async with KeyManager(_quiet(s)) as km:
        rc = CorruptingContext(km.sessions, km.kek, s, good=good)
        if small == "1000":
            with pytest.raises(RowFailed) as caught:
                await rotation.rotate_dek(rc, "openai")
        else:
            progress = await rotation.rotate_dek(rc, "openai")
            assert len(progress.ranges) >= 3
            r = progress.ranges[0]
            with pytest.raises(RowFailed) as caught:
                await rotation.reencrypt_range(rc, r.run_id, r.lo, r.hi, target=r.target)
            # The other ranges see the run failed and stop without touching a row.
            for r in progress.ranges[1:]:
                stopped = await rotation.reencrypt_range(rc, r.run_id, r.lo, r.hi, target=r.target)
                assert stopped.state == "failed" and stopped.rows == 0
        assert rc.corrupted is not None and rc.corrupted.sealed >= 1  # the corrupt path really ran

    named = f"accounts.api_key row id={failing!r} could not be re-encrypted"
    assert named in str(caught.value)
    run = (await fetch(s.database_url, "SELECT state, error, rows_done FROM rotations"))[0]
    assert run["state"] == "failed" and named in run["error"] and run["rows_done"] == 0
    assert not any(p in run["error"] for p in plain.values())
    assert await _snapshot(s) == before  # the batch wrote nothing
    async with KeyManager(_quiet(s)) as km:  # a fresh process's view: every value still decrypts
        for k, token in await _snapshot(s):
            assert token.startswith("kr1:1:")
            assert await km.decrypt("openai", token, context=f"accounts.api_key:{k}") == plain[k]
