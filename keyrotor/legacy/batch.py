"""One batch of a legacy migration: decrypt (scrypt, in a process pool), seal under the scope's
active DEK, verify. Shared by the single-worker migration (:mod:`keyrotor.legacy.migration`) and
the range jobs of a fanned-out one (:mod:`keyrotor.legacy.ranges`).

A value that does not decrypt (tampered, or another master key) is left as it was and reported
with its row id and reason, never its value.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import multiprocessing
import os
import re
import threading
import time
from collections.abc import Iterable, Mapping, Sequence, Set
from dataclasses import dataclass, field
from typing import Any

from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from keyrotor.census.locations import location_of
from keyrotor.crypto import envelope
from keyrotor.crypto import legacy_format as legacy
from keyrotor.errors import ConfigurationError, DecryptionFailed, PermanentError
from keyrotor.inputs import check_scope
from keyrotor.keys import KeyManager
from keyrotor.legacy.report import AUTH_FAILED, MAX_LISTED, ColumnReport
from keyrotor.legacy.second_phase import second_ciphers, try_second_phase
from keyrotor.legacy.sources import row_context
from keyrotor.store.key_ranges import Key
from keyrotor.store.legacy import SealedBatch, Source

# This many failures in a row, none migrated yet: the master key is wrong, not the values.
WRONG_KEY_THRESHOLD = 8

# Provider key shapes: reported when a scope's name suggests a provider and the key does not fit.
_SHAPES: tuple[tuple[str, re.Pattern[str]], ...] = (
    ("anthropic", re.compile(r"sk-ant-[A-Za-z0-9_\-]{16,}")),
    ("openai", re.compile(r"sk-[A-Za-z0-9_\-]{16,}")),
    ("google", re.compile(r"AIza[A-Za-z0-9_\-]{30,}")),
    ("gemini", re.compile(r"AIza[A-Za-z0-9_\-]{30,}")),
)


def shape_warning(scope: str, plaintext: str) -> str | None:
    """Why ``plaintext`` does not look like a key of the provider ``scope`` names (None if it does)."""
    lowered = scope.lower()
    for provider, pattern in _SHAPES:
        if provider in lowered:
            if pattern.fullmatch(plaintext.strip()) is None:
                return f"does not look like a {provider} key"
            return None
    return None


def make_executor(workers: int = 0) -> concurrent.futures.ProcessPoolExecutor:
    """A process pool sized to the machine (``workers`` 0: one a core) for scrypt.

    ``spawn``: a forked child of a process with an event loop and driver threads may inherit
    their locks held; spawned ones start clean. Each child imports the ``keyrotor`` package (its
    ``__init__`` brings in the library) and the parent's main module, about a second and a half
    of one core's time, once a pool (one a `migrate` call or a range job, for all its batches).
    """
    n = workers or os.cpu_count() or 1
    spawn = multiprocessing.get_context("spawn")
    return concurrent.futures.ProcessPoolExecutor(
        max_workers=n, mp_context=spawn, initializer=_exit_with_parent, initargs=(os.getpid(),)
    )


def _exit_with_parent(parent: int) -> None:
    # A pool child whose parent is SIGKILLed never sees EOF on the call queue (its siblings
    # hold the pipe's other end), so it would sleep forever: three leaked processes per
    # killed worker. A daemon thread ends it once it has been re-parented.
    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(1.0)
        os._exit(0)

    threading.Thread(target=watch, name="keyrotor-parent-watch", daemon=True).start()


async def decrypt_batch(
    values: Sequence[str], master_key: str, executor: concurrent.futures.Executor, workers: int
) -> list[str | DecryptionFailed]:
    """Decrypt ``values`` in ``workers`` chunks on ``executor``; results in order."""
    if not values:
        return []
    loop = asyncio.get_running_loop()
    size = -(-len(values) // max(1, workers))
    chunks = [list(values[i : i + size]) for i in range(0, len(values), size)]
    parts = await asyncio.gather(
        *(loop.run_in_executor(executor, legacy.decrypt_many, chunk, master_key) for chunk in chunks)
    )
    return [r for part in parts for r in part]


async def open_batch(
    km: KeyManager,
    key: str,
    pool: concurrent.futures.Executor,
    workers: int,
    src: Source,
    rows: list[Any],
    rep: ColumnReport,
    second: dict[str, list[AESGCM]],
    *,
    dry_run: bool = False,
) -> SealedBatch:
    """Decrypt one batch of legacy rows (scrypt in ``pool``) and seal each under its scope's DEK.

    Failures are counted and named (by row id) in ``rep``; ``second`` caches each scope's
    second-phase DEKs. ``dry_run``: seal under a throwaway key instead (:func:`seal_batch`).
    """
    candidates: list[Any] = []
    known: dict[int, str] = {}  # row index in candidates -> second-phase plaintext
    for r in rows:
        scope_name = r[2] or ""
        if scope_name and scope_name not in second:
            second[scope_name] = await second_ciphers(km, scope_name)
        plain = try_second_phase(r[1], second.get(scope_name, []))
        if plain is not None:
            known[len(candidates)] = plain
            candidates.append(r)
        elif legacy.is_legacy(r[1]):
            candidates.append(r)
        else:
            _fail(rep, r[0], "neither a kr1 nor a legacy value (malformed)")
    # scrypt: in the pool, never on the event loop.
    first = [r[1] for i, r in enumerate(candidates) if i not in known]
    opened = iter(await decrypt_batch(first, key, pool, workers))
    results = [known[i] if i in known else next(opened) for i in range(len(candidates))]
    return await seal_batch(km, src, candidates, results, rep, dry_run=dry_run)


async def seal_batch(
    km: KeyManager,
    src: Source,
    rows: list[Any],
    results: list[str | DecryptionFailed],
    rep: ColumnReport,
    *,
    dry_run: bool = False,
) -> SealedBatch:
    """Seal each decrypted row under its scope's active DEK and verify it (failures go to ``rep``).

    ``dry_run``: seal and verify under a throwaway key of each scope instead, so that a dry run
    writes nothing at all: no scope or DEK is created for a scope named by a row, and no
    encryption is reserved nor location recorded for a value that is never stored.
    """
    out = SealedBatch()
    keys: dict[str, tuple[int, int, AESGCM]] = {}
    for row, result in zip(rows, results, strict=True):
        row_id, value, scope, stored_context = row[0], row[1], row[2], row[3]
        if isinstance(result, DecryptionFailed):
            _fail(rep, row_id, f"{type(result).__name__}: {result}")
            continue
        if not scope:
            _fail(rep, row_id, "the row has no scope (scope column is empty)")
            continue
        warning = shape_warning(scope, result)
        if warning is not None and len(rep.warnings) < MAX_LISTED:
            rep.warnings.append({"id": row_id, "warning": warning})
        context = row_context(src, row_id, stored_context)
        try:
            if scope not in keys:
                check_scope(scope)  # a row naming no valid scope fails, named; no scope is created
                # The active DEK (the scope is created with v1 if it does not exist yet).
                keys[scope] = _throwaway_key() if dry_run else await km._encryption_key(scope)
            scope_id, version, cipher = keys[scope]
            if not dry_run and not km.usage.take(scope_id, version):  # reserved before use
                await km.usage.acquire(scope_id, version, scope=scope)  # (keyrotor.census.usage)
            sealed = _seal(result, scope, version, cipher, context)
        except PermanentError as exc:
            _fail(rep, row_id, f"{type(exc).__name__}: {exc}")
            continue
        location = location_of(context)  # recorded (committed) before the value is written
        if not dry_run and not km.usage.count(scope_id, version, location):
            await km.usage.record(scope_id, version, location)
        out.ids.append(row_id)
        out.olds.append(value)
        out.news.append(sealed)
        out.versions.append(version)
        out.scopes.append(scope)
    return out


def _throwaway_key() -> tuple[int, int, AESGCM]:
    """A random DEK no value is ever stored under (a dry run's), as ``(scope id, version, cipher)``."""
    return 0, 1, AESGCM(AESGCM.generate_key(bit_length=256))


def _seal(plain: str, scope: str, version: int, cipher: AESGCM, context: str) -> str:
    """``plain`` as a kr1 value of ``cipher``'s DEK, opened again and compared before use.

    Raises:
        DecryptionFailed: the new value does not open to ``plain``.
    """
    plaintext = plain.encode("utf-8")
    sealed = envelope.seal(plaintext, cipher=cipher, scope=scope, dek_version=version, context=context)
    _, raw = envelope.split(sealed)
    if envelope.open_raw(raw, cipher=cipher, scope=scope, dek_version=version, context=context) != plaintext:
        raise DecryptionFailed("the new kr1 value did not verify")
    return sealed


def _fail(rep: ColumnReport, row_id: Key, reason: str) -> None:
    rep.failed_count += 1
    if len(rep.failed) < MAX_LISTED:
        rep.failed.append({"id": row_id, "reason": reason})


def check_wrong_key(
    failed: Iterable[tuple[str, Mapping[str, Any]]],
    *,
    decrypted: int,
    known: Set[tuple[str, Key]] = frozenset(),
) -> None:
    """Refuse to go on when nothing has decrypted and the first values all failed authentication.

    A run (or range) with the wrong master key would otherwise record every value as failed;
    ``WRONG_KEY_THRESHOLD`` such failures and no success mean the key is not the old backend's.
    ``failed`` holds ``(source, failure)`` pairs; ``known`` the ``(source, row id)`` of values an
    earlier run failed to authenticate while its key opened others: values that are not the old
    backend's (tampered, or base64 that only looks like one), which say nothing about the key, so
    a run that finds only those left reports them instead of stopping.

    Raises:
        ConfigurationError: the legacy master key is wrong; nothing has been written.
    """
    if decrypted:
        return
    auth_failures = sum(
        1 for source, f in failed if AUTH_FAILED in f["reason"] and (source, f["id"]) not in known
    )
    if auth_failures >= WRONG_KEY_THRESHOLD:
        raise ConfigurationError(
            f"the first {auth_failures} legacy values all failed authentication and none decrypted: "
            "ENCRYPTION_KEY (or KEYROTOR_LEGACY_KEY) is not the old backend's master key; nothing was written"
        )


@dataclass
class KeyEvidence:
    """What one attempt at a run (or range) has seen of its own master key, for
    :func:`check_wrong_key`.

    Only this attempt's values count: what an earlier attempt, or another worker, migrated says
    nothing about this process's key (a worker restarted with another ``KEYROTOR_LEGACY_KEY``, or
    workers set up with different keys, would otherwise record every value left as failed and
    complete the run), and the failures they recorded say nothing either (:meth:`ignore`).
    """

    known: set[tuple[str, Key]] = field(default_factory=set)
    opened: int = 0

    def ignore(self, source: str, failed: Iterable[Mapping[str, Any]]) -> None:
        """Leave out of the judgement the failures ``source``'s report held before this attempt."""
        self.known |= {(source, f["id"]) for f in failed}

    def check(self, failed: Iterable[tuple[str, Mapping[str, Any]]], opened: int) -> None:
        """Add a batch's ``opened`` values, then :func:`check_wrong_key` on ``failed``."""
        self.opened += opened
        check_wrong_key(failed, decrypted=self.opened, known=self.known)
