"""The old backend's second phase: its DEKs, adopted as decrypt-only versions of a scope, and
the values it sealed with them directly.
"""

from __future__ import annotations

import base64
import os
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from keyrotor.audit.log import AuditEvent, write_event
from keyrotor.census.locations import second_phase_location
from keyrotor.crypto import legacy_format as legacy
from keyrotor.errors import ConfigurationError, Conflict, DecryptionFailed, MalformedCiphertext, ScopeNotFound
from keyrotor.inputs import check_scope
from keyrotor.kek.base import WrapContext, WrappedDek
from keyrotor.keys import KeyManager
from keyrotor.store import census as census_store
from keyrotor.store import db, repo
from keyrotor.store import kek as kek_store
from keyrotor.store import legacy as store

SECOND_PHASE_IV = legacy.SECOND_PHASE_IV
SECOND_PHASE_TAG = legacy.SECOND_PHASE_TAG


def decrypt_second_phase(blob: str, cipher: AESGCM) -> str:
    """Decrypt a value the old backend's second phase encrypted directly with a DEK
    (:func:`keyrotor.crypto.legacy_format.open_second_phase`, whose layout is an ASSUMPTION).

    Raises:
        MalformedCiphertext: not base64 of at least 32 bytes.
        DecryptionFailed: failed authentication, or the plaintext is not UTF-8.
    """
    plaintext = legacy.open_second_phase(blob, cipher)
    try:
        return plaintext.decode("utf-8")
    except UnicodeDecodeError:
        # The error holds the plaintext (.object): raised after this block, not in it, so that it
        # is not kept as the new error's __context__ (``from None`` only hides that).
        pass
    raise DecryptionFailed("second-phase value decrypted, but it is not valid UTF-8")


def encrypt_second_phase(plaintext: str, dek: bytes) -> str:  # pragma: no cover - tests only
    """The inverse of :func:`decrypt_second_phase` (for tests of the assumed layout)."""
    iv = os.urandom(SECOND_PHASE_IV)
    sealed = AESGCM(dek).encrypt(iv, plaintext.encode("utf-8"), None)
    return base64.b64encode(iv + sealed[-SECOND_PHASE_TAG:] + sealed[:-SECOND_PHASE_TAG]).decode("ascii")


def try_second_phase(value: str, ciphers: Sequence[AESGCM]) -> str | None:
    """The plaintext if ``value`` is a second-phase value of one of ``ciphers`` (cheap: AES only)."""
    for cipher in ciphers:
        try:
            return decrypt_second_phase(value, cipher)
        except DecryptionFailed:
            continue
    return None


@dataclass(frozen=True)
class ImportedDek:
    """A legacy DEK adopted as a decrypt-only version of a scope."""

    scope: str
    version: int
    state: str
    grace_until: str | None

    def as_dict(self) -> dict[str, Any]:
        """The JSON form (``keyrotor legacy import-dek --json``)."""
        return {
            "scope": self.scope,
            "version": self.version,
            "state": self.state,
            "grace_until": self.grace_until,
        }


async def import_dek(km: KeyManager, scope: str, blob: str) -> ImportedDek:
    """Adopt the old backend's wrapped DEK (144 characters) as a new version of ``scope``.

    It becomes version ``latest + 1`` in state ``grace`` (decrypts, never encrypts) until now +
    the scope's grace period, wrapped under the current KEK: values the old second phase sealed
    with it open (:func:`decrypt_second_phase`) and ``keyrotor legacy migrate`` moves them to
    the active DEK. The scope is created (with a fresh DEK v1 as its active key) if needed.
    Its location :func:`~keyrotor.census.locations.second_phase_location` is recorded: the
    version is not retired, nor destroyed, until an operator acknowledges it.

    Raises:
        ConfigurationError: no legacy master key.
        MalformedCiphertext, DecryptionFailed: not a legacy wrapped DEK, or the wrong master key.
        Conflict: this DEK is already a version of the scope.
    """
    check_scope(scope)
    key = km.settings.legacy_key
    if key is None:
        raise ConfigurationError("importing a legacy DEK needs ENCRYPTION_KEY (or KEYROTOR_LEGACY_KEY)")
    # scrypt off the event loop (a thread: it releases the GIL), then the same checks as decrypt_dek.
    dek = _dek_bytes(await legacy.decrypt_async(legacy_dek_text(blob.strip()), key))
    await km._encryption_key(scope)  # create the scope (v1 active) if it does not exist
    async with db.transaction(km.sessions) as session:
        sc = await repo.get_scope(session, scope, for_update=True)
        if sc is None:
            raise ScopeNotFound(f"scope {scope!r} does not exist")
        for version, state, existing in await _unwrap_all(
            km, scope, await store.decrypting_deks(session, scope)
        ):
            if existing == dek:
                raise Conflict(f"{scope}: this legacy DEK is already v{version} ({state})")
        version = sc.latest_version + 1
        await kek_store.hold_off_kek_cutoff(session)  # no KEK cut-off between the wrap and the insert
        wrapped = await km.kek.wrap(dek, WrapContext(scope, version))
        grace_until = await store.insert_grace_dek(
            session, sc.id, version, blob=wrapped.blob, kek_id=wrapped.kek_id, kek_version=wrapped.kek_version
        )
        # Its values are wherever the old backend put them, registered or not, and carry no
        # version: a location of its own keeps the version from retirement and destruction
        # until an operator acknowledges it (every table holding them registered and migrated).
        # An acknowledgement left from an earlier DEK of the same name must not cover this one.
        location = second_phase_location(scope, version)
        await census_store.record_location(session, sc.id, version, location, 0)
        await census_store.drop_acknowledgements(session, location, None)
        await write_event(
            session,
            AuditEvent(
                event_type="config_change",
                scope=scope,
                key_version=version,
                metadata={"action": "import_legacy_dek", "state": "grace"},
            ),
        )
    km.invalidate(scope)
    return ImportedDek(scope, version, "grace", grace_until.isoformat() if grace_until else None)


def legacy_dek_text(blob: str) -> str:
    """Check the shape of a legacy wrapped DEK (cheaply) and return it."""
    if not legacy.is_legacy(blob):
        raise MalformedCiphertext("not a legacy wrapped DEK (expected the 144-character encrypted_dek)")
    return blob


def _dek_bytes(text_value: str) -> bytes:
    try:
        dek = legacy._strict_b64decode(text_value)
    except ValueError as exc:
        raise DecryptionFailed("legacy wrapped DEK decrypted, but it is not base64 text") from exc
    if len(dek) != legacy.DEK_LEN:
        raise DecryptionFailed(f"legacy wrapped DEK decrypted to {len(dek)} bytes, expected {legacy.DEK_LEN}")
    return dek


async def second_ciphers(km: KeyManager, scope: str) -> list[AESGCM]:
    """The ciphers of every DEK of ``scope`` that still decrypts, imported ones included."""
    async with db.transaction(km.sessions) as session:
        rows = await store.decrypting_deks(session, scope)
    return [AESGCM(dek) for _, _, dek in await _unwrap_all(km, scope, rows)]


async def _unwrap_all(
    km: KeyManager, scope: str, rows: Sequence[tuple[int, str, bytes, str, int]]
) -> list[tuple[int, str, bytes]]:
    """``(version, state, DEK)`` of each stored DEK row of ``scope``."""
    out = []
    for version, state, blob, kek_id, kek_version in rows:
        dek = await km.kek.unwrap(WrappedDek(kek_id, kek_version, blob), WrapContext(scope, version))
        out.append((version, state, dek))
    return out
