"""The audit key: what makes the audit chain keyed (HMAC-SHA256), so a database writer cannot forge it.

One key of 32 random bytes, created once by the first process that opens the KEK provider after
migration ``0011_audit_keyed``, stored in ``audit_keys`` wrapped by the KEK (like a DEK), and
unwrapped and cached by every process that writes or verifies the log. Its wrap is bound to the
key's id and to the **switch point**: the id of the last row written before it existed. Rows up
to the switch point keep the old, unkeyed format (``kra1``, plain SHA-256) and still verify as
such; every row after it must be keyed (``kra2``), so a writer without the key can neither
append rows that verify nor downgrade the tail to the unkeyed format. The switch point cannot
be moved without the KEK: the wrapped key would no longer unwrap.

Rows carry their key's id (``encryption_audit_log.audit_key_id``), so a later key (another id)
can take over while older rows keep verifying. A KEK rotation rewraps the audit key with the
DEKs (:func:`rewrap_keys`), and a KEK provider migration moves it (:func:`migrate_keys`), both
with no transaction open while a provider answers.

Processes find their key by the database they write to (:func:`key_for`). KeyManager loads it
when it opens; a process that writes events without a KeyManager (the CLI) registers a KEK
opener with :func:`set_kek_opener`, and the key is loaded on first use.
"""

from __future__ import annotations

import hashlib
import hmac
import os
from collections.abc import Awaitable, Callable, Mapping, Sequence
from typing import Any

from sqlalchemy.engine import URL
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from keyrotor.errors import ConfigurationError, KekError, KekMismatch, KekUnavailable, StoreBusy
from keyrotor.kek.base import ForeignKek, KekProvider, WrapContext, WrappedDek
from keyrotor.store import audit as store
from keyrotor.store import db
from keyrotor.store import kek as kek_store

KEY_BYTES = 32
# The wrap's context: a name no scope can have (scopes never start with "_"), so the wrapped
# audit key can never be taken for a DEK, and the switch point is part of what the KEK binds.
_SCOPE_PREFIX = "_keyrotor_audit_key:"
_BLOCK = 64
# How long the transaction creating the first audit key may idle holding the chain lock (its KEK
# wrap and, when another process created the key meanwhile, unwrap run under it).
KEY_CREATION_IDLE_S = 120.0


class AuditKey:
    """An unwrapped audit key, ready to MAC. Never printed: ``repr`` shows its id only.

    HMAC-SHA256 (RFC 2104) with the two padded-key states hashed once, so a MAC costs two
    ``hashlib`` copies: about 0.6 us for a row against 0.35 us for plain SHA-256.
    """

    __slots__ = ("_inner", "_outer", "key_id", "switch_after")

    def __init__(self, key_id: int, key: bytes, switch_after: int) -> None:
        if len(key) != KEY_BYTES:
            raise ConfigurationError("an audit key is 32 bytes")
        padded = key.ljust(_BLOCK, b"\x00")
        self._inner = hashlib.sha256(bytes(b ^ 0x36 for b in padded))
        self._outer = hashlib.sha256(bytes(b ^ 0x5C for b in padded))
        self.key_id = key_id
        self.switch_after = switch_after

    def __repr__(self) -> str:
        return f"AuditKey(id={self.key_id}, switch_after={self.switch_after})"

    def mac(self, data: bytes) -> bytes:
        """HMAC-SHA256 of ``data`` under this key."""
        inner = self._inner.copy()
        inner.update(data)
        outer = self._outer.copy()
        outer.update(inner.digest())
        return outer.digest()

    def checkpoint_mac(self, data: bytes) -> bytes:
        """The MAC of a checkpoint: under a key derived from this one, so a checkpoint and a
        row's MAC can never stand in for each other."""
        return hmac_sha256(self.mac(b"keyrotor audit checkpoint key"), data)


def hmac_sha256(key: bytes, data: bytes) -> bytes:
    """Plain HMAC-SHA256 (for derived keys)."""
    return hmac.new(key, data, hashlib.sha256).digest()


def _context(key_id: int, switch_after: int) -> WrapContext:
    return WrapContext(f"{_SCOPE_PREFIX}{switch_after}", key_id)


# Keys by database (host, port, name): a process may talk to several databases (tests do).
_KEYS: dict[str, AuditKey] = {}
_OPENER: Callable[[], Awaitable[KekProvider]] | None = None


def db_identity(url: URL) -> str:
    """Which database a URL names, for the key registry."""
    return f"{url.host}:{url.port}/{url.database}"


def register(url: URL, key: AuditKey) -> None:
    """Make ``key`` the one every writer of this process uses for the database at ``url``."""
    _KEYS[db_identity(url)] = key


def key_for(url: URL) -> AuditKey | None:
    """The audit key loaded for the database at ``url``, if any."""
    return _KEYS.get(db_identity(url))


def set_kek_opener(opener: Callable[[], Awaitable[KekProvider]] | None) -> None:
    """How this process opens its KEK provider when an audit event needs the key and none is
    loaded yet (the CLI sets it; KeyManager loads its key when it opens)."""
    global _OPENER
    _OPENER = opener


def session_url(session: AsyncSession) -> URL:
    """The URL of the database a session talks to."""
    return session.get_bind().engine.url


async def key_in_session(session: AsyncSession) -> AuditKey | None:
    """The audit key for the session's database: the registered one, or loaded (and created if
    there is none yet) through the process's KEK opener. Call it before taking the chain lock
    (loading may call the KEK), and again under it when it returned None.

    Returns None only when no opener is set and no audit key exists (the chain is not keyed
    yet, so an unkeyed row is still valid).

    Raises:
        ConfigurationError: the chain is keyed and this process cannot load the key.
    """
    url = session_url(session)
    key = key_for(url)
    if key is not None:
        return key
    if _OPENER is not None:
        kek = await _OPENER()
        try:
            key = await _load_or_create(session, kek)
        finally:
            await kek.aclose()
        register(url, key)
        return key
    if await store.chain_keyed(session):
        raise ConfigurationError(
            "the audit chain is keyed and this process has not loaded the audit key: "
            "open a KeyManager (or keyrotor.audit.key.ensure_key) before writing audit events"
        )
    return None


async def ensure_key(sessions: async_sessionmaker[AsyncSession], kek: KekProvider) -> AuditKey:
    """Load the newest audit key (creating it on first use) and register it for this database.

    Raises:
        KekError, KekUnavailable: the KEK cannot unwrap (or wrap) the key.
    """
    async with db.transaction(sessions) as session:
        key = await _load_or_create(session, kek)
        register(session_url(session), key)
    return key


async def _load_or_create(session: AsyncSession, kek: KekProvider) -> AuditKey:
    row = await store.newest_key(session)
    if row is not None:
        return await _unwrap(kek, row)
    # Under the chain lock: no row can be appended between reading the head and recording it
    # as the switch point. The KEK wraps the key under it (the switch point is in the wrap's
    # context), once an install: the idle bound leaves room for a remote KEK and its retries.
    await store.lock_chain(session, KEY_CREATION_IDLE_S)
    row = await store.newest_key(session)
    if row is not None:  # another process created it while we waited for the lock
        return await _unwrap(kek, row)
    head = await store.last_event_id(session)
    raw = os.urandom(KEY_BYTES)
    await kek_store.hold_off_kek_cutoff(session, "audit_keys")  # no KEK cut-off between wrap and insert
    wrapped = await kek.wrap(raw, _context(1, head))
    await store.insert_first_key(session, head, wrapped.kek_id, wrapped.kek_version, wrapped.blob)
    return AuditKey(1, raw, head)


class AuditKeyMismatch(KekMismatch, KekError):
    """This process's KEK cannot unwrap the audit key: the wrong KEK, or ``audit_keys`` was
    altered (its switch point moved, its wrap replaced)."""


async def _unwrap(kek: KekProvider, row: Sequence[Any]) -> AuditKey:
    key_id, switch_after, kek_id, kek_version, blob = row
    try:
        raw = await kek.unwrap(
            WrappedDek(str(kek_id), int(kek_version), bytes(blob)), _context(int(key_id), int(switch_after))
        )
    except (KekUnavailable, ForeignKek):  # an outage; another provider (it names both and what to do)
        raise
    except KekError as exc:
        raise AuditKeyMismatch(
            f"this process's KEK cannot unwrap audit key {key_id} (wrapped by {kek_id}, KEK version "
            f"{kek_version}): check ENCRYPTION_KEY / ENCRYPTION_KEYS_PREVIOUS (or the provider settings), "
            f"or audit_keys was altered. Cause: {exc}"
        ) from None
    return AuditKey(int(key_id), raw, int(switch_after))


async def load_keys(sessions: async_sessionmaker[AsyncSession], kek: KekProvider) -> Mapping[int, AuditKey]:
    """Every audit key of the database, unwrapped, by id (what verification needs)."""
    async with db.transaction(sessions) as session:
        rows = await store.all_keys(session)
    return {int(r[0]): await _unwrap(kek, r) for r in rows}


async def rewrap_keys(
    sessions: async_sessionmaker[AsyncSession], kek: KekProvider, target: int | None = None
) -> int:
    """Rewrap every audit key under the KEK's current version (with a KEK rotation); how many
    new wrappings were written.

    As a DEK's rewrap (:mod:`keyrotor.rotation.rewrap`), through :func:`_replace_wraps`: the
    keys are read in a transaction of their own, rewrapped and verified with none open (no row
    lock is held while the provider answers), then each is written with compare-and-swap on its
    old wrapping (a key rewrapped meanwhile by another attempt is left as it is). Each new
    wrapping must unwrap to the same key as the old one (compared in constant time), under KEK
    version ``target`` or a later one if given (the provider's key may have been rotated past
    the run's target: :func:`keyrotor.rotation.kek.rotate_kek`): the stored wrapping is the
    only copy of the audit key.

    Raises:
        KekError: a new wrapping does not unwrap, or not to the same key (nothing is written).
        KekUnavailable: the provider cannot be reached (nothing is written).
    """
    async with db.transaction(sessions) as session:
        rows = await store.all_keys(session)
    written, _missed = await _replace_wraps(sessions, rows, kek.rewrap, kek, kek, target)
    return written


# Rounds of a migration's read, wrap and compare-and-swap before a row that changes under each
# of them is left to the job's retry.
_MIGRATION_ROUNDS = 3


async def migrate_keys(
    sessions: async_sessionmaker[AsyncSession], source: KekProvider, target: KekProvider, target_id: str
) -> int:
    """Move every audit key not yet wrapped by ``target`` (kek_id ``target_id``) from ``source`` to
    it (with a KEK provider migration); how many new wrappings were written.

    The same path as :func:`rewrap_keys` (:func:`_replace_wraps`): read with no transaction
    held, unwrapped by ``source`` and wrapped by ``target`` with none open (a slow or hung
    provider holds no lock on the row), the new wrapping unwrapped by ``target`` and compared
    with the key, then written with compare-and-swap on the wrapping read. A kill before the
    swap leaves the old wrapping, which ``source`` still opens. A swap that misses (the row
    changed meanwhile: another attempt moved it, an operator rewrapped it) is never forced:
    the rows are read again and what is still off ``target`` is moved from its new wrapping.

    Raises:
        KekError: a key does not unwrap under ``source``, or the new wrap does not verify
            (nothing of it is written).
        KekUnavailable: a provider cannot be reached (nothing of it is written).
        StoreBusy: a key changed under each of a few rounds; transient, the job's retry moves it.
    """

    async def move(items: list[tuple[WrappedDek, WrapContext]]) -> list[WrappedDek]:
        return [await target.wrap(await source.unwrap(old, ctx), ctx) for old, ctx in items]

    written = 0
    for _round in range(_MIGRATION_ROUNDS):
        async with db.transaction(sessions) as session:
            rows = await store.keys_not_wrapped_by(session, target_id)
        n, missed = await _replace_wraps(sessions, rows, move, source, target, None)
        written += n
        if not missed:
            return written
    async with db.transaction(sessions) as session:
        left = await store.keys_not_wrapped_by(session, target_id)
    if left:
        raise StoreBusy(
            f"audit key {int(left[0][0])} changed while it was moved to {target.name}, "
            f"{_MIGRATION_ROUNDS} times: left as it is for a later attempt"
        )
    return written


async def _replace_wraps(
    sessions: async_sessionmaker[AsyncSession],
    rows: Sequence[Sequence[Any]],
    wrap_anew: Callable[[list[tuple[WrappedDek, WrapContext]]], Awaitable[list[WrappedDek]]],
    opens_old: KekProvider,
    opens_new: KekProvider,
    target: int | None,
) -> tuple[int, list[int]]:
    """Give audit keys ``rows`` (read by the caller, its transaction ended) the wrappings
    ``wrap_anew`` makes, each verified, with no transaction open until the swap; returns (new
    wrappings written, ids whose compare-and-swap missed).

    The provider calls (``wrap_anew``, the verification's unwraps) run with no transaction
    open. Every new wrapping is verified before any is written, and the writes are one
    transaction of compare-and-swaps on the wrappings read: an attempt stopped in between (a
    kill, a provider error) has written nothing, and the old wrapping, still readable, stays.
    """
    if not rows:
        return 0, []
    items = [(WrappedDek(str(r[2]), int(r[3]), bytes(r[4])), _context(int(r[0]), int(r[1]))) for r in rows]
    fresh = await wrap_anew(items)
    for r, (old, ctx), new in zip(rows, items, fresh, strict=True):
        await _verify_rewrap(opens_old, opens_new, int(r[0]), old, new, ctx, target)
    missed: list[int] = []
    async with db.transaction(sessions) as session:
        for r, (old, _ctx), new in zip(rows, items, fresh, strict=True):
            swapped = await store.swap_key_wrap(
                session, int(r[0]), old.blob, new.kek_id, new.kek_version, new.blob
            )
            if not swapped:
                missed.append(int(r[0]))
    return len(rows) - len(missed), missed


async def _verify_rewrap(
    opens_old: KekProvider,
    opens_new: KekProvider,
    key_id: int,
    old: WrappedDek,
    new: WrappedDek,
    ctx: WrapContext,
    target: int | None,
) -> None:
    """Raise KekError unless ``new`` (opened by ``opens_new``) opens to the key ``old`` (opened
    by ``opens_old``) opens to, under KEK version ``target`` or later if given."""
    try:
        same = hmac.compare_digest(await opens_new.unwrap(new, ctx), await opens_old.unwrap(old, ctx))
    except KekUnavailable:
        raise
    except KekError as exc:
        raise KekError(f"the new wrapping of audit key {key_id} does not unwrap: {exc}") from None
    if not same or (target is not None and new.kek_version < target):
        expected = "it opens to " + ("the same key" if same else "another key")
        if target is not None:
            expected += f"; KEK version {new.kek_version}, expected {target} or later"
        raise KekError(
            f"the new wrapping of audit key {key_id} by {opens_new.name} did not verify "
            f"({expected}): its old wrapping is kept"
        )
