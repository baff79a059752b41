"""Retirement of an old DEK version: re-encrypt stragglers, prove nothing needs it, retire it.

:func:`retire_dek` runs only once the version's grace period is over (``force_now`` skips that
wait, never the proof nor the destruction window):

1. re-encrypt stragglers: rows still on the version (written by a process whose cache still
   named it as active) move to the scope's active DEK, a batch a transaction;
2. in ONE transaction (:func:`prove_unused`): lock the ``data_keys`` row, lock the registered
   columns (``managed_columns``, read again: what is counted is what the census covers), the
   scope's target tables and ``key_locations`` in ``SHARE`` mode (concurrent writers wait a
   moment; nobody can add a row or a location on the old version behind the count), count the
   rows on the version and, for an imported DEK only (``data_keys.imported``), the values not
   migrated from the old backend that it opens, in every target (all of them locked too)
   -- zero, or refuse -- and list the locations that received values of it which the census
   cannot count (:func:`keyrotor.census.locations.uncovered_locations`) -- none, or refuse with
   :class:`LocationNotCovered`. Then the version becomes ``retired``: its wrapped key is kept, it
   decrypts but never encrypts, and ``destroy_after`` = now + ``KEYROTOR_DESTROY_AFTER_DAYS``;
3. announce it, so every process reloads the DEK and notices each use of it.

The wrapped key is erased only later, by :mod:`keyrotor.rotation.destruction`, after that window passed
with no use, and after the same proof once more.
"""

from __future__ import annotations

import re
import shlex
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from functools import partial
from typing import Any

import structlog
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from keyrotor import runs
from keyrotor.audit.log import AuditEvent, write_event
from keyrotor.census.columns import freeze_targets
from keyrotor.census.locations import SECOND_PHASE_PREFIX, display, uncovered_locations
from keyrotor.crypto import legacy_format
from keyrotor.crypto.envelope import MAX_VERSION
from keyrotor.errors import Conflict, KeyVersionUnknown, PermanentError, ScopeNotFound
from keyrotor.inputs import check_scope
from keyrotor.notify import KeyChange
from keyrotor.rotation.context import RotationContext, run_to_commit
from keyrotor.rotation.lifecycle import begin_attempt, failing_run, record_failure, require_scope
from keyrotor.rotation.reencrypt import RowFailed, load_keys, reencrypt_batch
from keyrotor.runs import RunInfo
from keyrotor.store import db
from keyrotor.store import retire as store
from keyrotor.store.key_ranges import Key
from keyrotor.store.targets import (
    Target,
    count_legacy_values,
    count_version,
    has_legacy_values,
    lock_target,
    raw_connection,
    relax_commit,
)

log = structlog.get_logger("keyrotor.rotation.retire")

PROOF_ATTEMPTS = 3
# A location that names a column `keyrotor columns register` accepts (TABLE.COLUMN, SCHEMA.TABLE.COLUMN).
_TABLE_COLUMN = re.compile(r"[A-Za-z_][A-Za-z0-9_$]*(?:\.[A-Za-z_][A-Za-z0-9_$]*){1,2}")


class GraceNotOver(Conflict):
    """The DEK version is still in its grace period."""


class KeyStillInUse(Conflict):
    """Rows still use the DEK version, so it cannot be destroyed."""


class NotRetirable(Conflict):
    """The DEK version cannot be retired in its current state."""


class LocationNotCovered(Conflict):
    """Values of the DEK version went to a location the census cannot count."""


def not_covered(scope: str, version: int, locations: Sequence[str]) -> LocationNotCovered:
    """The refusal naming ``locations`` and the commands that resolve one (one line)."""
    names = [display(loc) for loc in locations]
    shown = ", ".join(names[:3]) + (f" and {len(names) - 3} more" if len(names) > 3 else "")
    first = shlex.quote(names[0])
    ignore = f"acknowledge it (`keyrotor columns ignore {first} --reason TEXT`)"
    if locations[0].startswith(SECOND_PHASE_PREFIX):
        # The old backend's values carry no version and may be in any table: only the operator
        # knows that every table holding them is registered (and migrated).
        fix = (
            "register every column of the old backend that holds its values, run `keyrotor legacy "
            f"migrate`, then {ignore}"
        )
    elif _TABLE_COLUMN.fullmatch(locations[0]):
        fix = f"register it (`keyrotor columns register {first} --pk PK_COLUMN --scope {scope}`) or {ignore}"
    else:  # not a table's column (no context, or a free-form one): only an acknowledgement counts
        fix = f"move those values to a registered column or {ignore}"
    return LocationNotCovered(
        f"{scope}: DEK v{version} is kept: values of it were encrypted for {shown}, which the census "
        f"cannot count; {fix}, then retire again"
    )


def not_migrated(scope: str, version: int, unmigrated: dict[str, int]) -> KeyStillInUse:
    """The refusal naming the targets that hold values the old backend sealed with the DEK."""
    counts = ", ".join(f"{t}: {n}" for t, n in sorted(unmigrated.items()))
    return KeyStillInUse(
        f"{scope}: values the old backend sealed with DEK v{version} are not migrated yet ({counts}); "
        "run `keyrotor legacy migrate`, then retire again; the key is kept"
    )


@dataclass(frozen=True)
class Proof:
    """What the census found on a DEK version: rows per target, uncovered locations, and values
    the old backend's second phase sealed with it (an imported DEK) per target."""

    rows: dict[str, int]
    uncovered: list[str]
    unmigrated: dict[str, int] = field(default_factory=dict)

    def refusal(self, scope: str, version: int) -> PermanentError | None:
        """The error that refuses retirement or destruction, or None if nothing needs the key."""
        if self.uncovered:
            return not_covered(scope, version, self.uncovered)
        if self.unmigrated:
            return not_migrated(scope, version, self.unmigrated)
        if self.rows:
            counts = ", ".join(f"{t}: {n}" for t, n in sorted(self.rows.items()))
            return KeyStillInUse(f"{scope}: rows still use DEK v{version} ({counts}); the key is kept")
        return None


async def prove_unused(
    rc: RotationContext, session: AsyncSession, scope: str, scope_id: int, version: int
) -> Proof:
    """Lock the scope's targets and ``key_locations`` in SHARE mode and count, inside the
    caller's transaction (which holds the ``data_keys`` row). The locks last until it ends, so
    nothing can add a row or a location of ``version`` between this proof and the caller's commit.

    An imported DEK (``data_keys.imported``) is also tried on every value not yet ``kr1`` of
    every target, with every target locked; a DEK keyrotor made leaves other scopes' targets alone.

    The targets are read again here, with the registry locked (:func:`freeze_targets`): a column
    registered after the job started is covered by the census below, so it must be counted too.
    """
    await freeze_targets(rc, session)
    apg = await raw_connection(session)
    rows: dict[str, int] = {}
    unmigrated: dict[str, int] = {}
    cipher: AESGCM | None = None
    ours = rc.targets_for(scope)
    counted = {t.name for t in ours}
    # A value the old backend's second phase sealed with an imported DEK carries no version:
    # only the DEK finds it among the values `legacy migrate` has not moved yet, in every target
    # and every row, whatever scope the row names (the old backend's DEK sealed values the
    # operator may file under other scopes; their migration tries those scopes' DEKs, so this
    # one is their only key). A DEK keyrotor made sealed only kr1 values, which carry their
    # version: the scope's own rows are all there is to count, and no other scope's writers
    # wait for its proof.
    imported = await store.is_imported(session, scope_id, version)
    for target in rc.all_targets if imported else ours:
        await lock_target(apg, target)
        if target.name in counted:
            n = await count_version(apg, target, scope_id, version)
            if n:
                rows[target.name] = n
        if not imported:
            continue
        if cipher is None and await has_legacy_values(apg, target):
            cipher = (await load_keys(session, rc.cipher, scope, scope_id, version, only=())).new_cipher
        if cipher is not None:
            sealed = await count_legacy_values(apg, target, partial(legacy_format.sealed_by, cipher=cipher))
            if sealed:
                unmigrated[target.name] = sealed
    # After the targets: a writer that records its location in its row's transaction takes
    # the tables in that order too.
    await store.lock_key_locations(session)
    return Proof(rows, await uncovered_locations(session, scope_id, scope, version), unmigrated)


@dataclass(frozen=True)
class RetireResult:
    """The outcome of a retirement."""

    run: RunInfo
    scope: str
    version: int
    stragglers: int
    already_destroyed: bool = False
    destroy_after: datetime | None = None

    def summary(self) -> dict[str, Any]:
        return {
            "run_id": self.run.id,
            "scope": self.scope,
            "version": self.version,
            "state": self.run.state,
            "stragglers_reencrypted": self.stragglers,
            "already_destroyed": self.already_destroyed,
            "destroy_after": self.destroy_after.isoformat() if self.destroy_after else None,
        }


async def check_retirable(
    sessions: async_sessionmaker[AsyncSession], scope: str, version: int, *, force_now: bool
) -> str:
    """Refuse early, with the reason, if ``version`` cannot be retired now. Returns its state.

    Raises:
        ScopeNotFound, KeyVersionUnknown: no such scope or version.
        NotRetirable: the version is pending or active (rotate first).
        GraceNotOver: its grace period ends later (``force_now`` skips this check).
    """
    if not 0 < version <= MAX_VERSION:
        # Not sent to Postgres: an integer column refuses it with an untyped DataError.
        raise KeyVersionUnknown(f"{scope}: DEK v{version} does not exist")
    async with db.transaction(sessions) as session:
        row = await store.retirement_facts(session, scope, version)
    if row is None:
        raise ScopeNotFound(f"scope {scope!r} does not exist")
    state, grace_until, active = row
    if state is None:
        raise KeyVersionUnknown(f"{scope}: DEK v{version} does not exist")
    if state in ("pending", "active"):
        raise NotRetirable(
            f"{scope}: DEK v{version} is {state} (the active version is v{active}); rotate the scope first"
        )
    in_grace = grace_until is not None and grace_until > datetime.now(UTC)
    if state in ("grace", "retired") and in_grace and not force_now:
        raise GraceNotOver(
            f"{scope}: DEK v{version} is in grace until {grace_until.isoformat()}; "
            "retire it after that, or pass --force-now to skip the wait (the proof that no row "
            "uses it still runs)"
        )
    return str(state)


async def request_retirement(
    sessions: async_sessionmaker[AsyncSession],
    scope: str,
    version: int,
    *,
    force_now: bool = False,
    trigger: str = "api",
    request_id: str | None = None,
) -> RunInfo:
    """Open (or join) the retirement run of ``scope`` v``version`` after the early checks,
    recording ``request_id`` on it.

    A location the census cannot count is refused here already: a run this call opens is marked
    failed with the refusal and a failed ``retire`` event is audited (so it shows in ``runs``,
    ``status`` and the audit log); an open run it joins is left to its attempt, whose proof
    refuses the same location in its transaction and fails and audits the run. The worker's
    proof checks again in its transaction in any case.

    Raises:
        InvalidRequestId: ``request_id`` is not valid.
        GraceNotOver, NotRetirable, KeyVersionUnknown, ScopeNotFound: see :func:`check_retirable`.
        LocationNotCovered: values of the version went to a location the census cannot count.
        Conflict: the retirement (or destruction) of another version of the scope is open.
    """
    check_scope(scope)
    return await _open_retirement(
        sessions, scope, version, force_now=force_now, trigger=trigger, request_id=request_id
    )


async def _open_retirement(
    sessions: async_sessionmaker[AsyncSession],
    scope: str,
    version: int,
    *,
    force_now: bool,
    trigger: str,
    request_id: str | None = None,
) -> RunInfo:
    state = await check_retirable(sessions, scope, version, force_now=force_now)
    refusal: LocationNotCovered | None = None
    async with db.transaction(sessions) as session:
        sid = (await require_scope(session, scope)).id
        run, created = await runs.open_run(
            session,
            "retire",
            sid,
            trigger=trigger,
            from_version=version,
            detail={"force_now": force_now},
            request_id=request_id,
        )
        if run.from_version == version and not run.detail.get("destroy") and state != "destroyed":
            uncovered = await uncovered_locations(session, sid, scope, version)
            if uncovered:
                refusal = not_covered(scope, version, uncovered)
                # Only the run this call opened is failed (and audited) here. An open run it
                # joined belongs to the attempt that may be working on it: that attempt's proof
                # refuses the same locations under its locks and fails and audits the run itself,
                # whereas failing it from here would leave the attempt to retire the key under
                # a failed run if the location were acknowledged meanwhile.
                if created:
                    await record_failure(session, run, refusal)
    if refusal is not None:
        fields = {"scope": scope, "version": version, "run_id": run.id, "joined": not created}
        log.warning("retire_refused", **fields, error=str(refusal))
        raise refusal
    if run.from_version != version:
        raise Conflict(f"{scope}: the retirement of v{run.from_version} (run {run.id}) is still open")
    if run.detail.get("destroy") and not created:
        raise Conflict(
            f"{scope}: the destruction of v{version} (run {run.id}) is running; "
            "retire it again after that run ends"
        )
    return run


async def retire_dek(
    rc: RotationContext,
    scope: str,
    version: int,
    *,
    force_now: bool = False,
    trigger: str = "api",
    run_id: int | None = None,
    job_id: str | None = None,
) -> RetireResult:
    """Retire DEK ``version`` of ``scope`` once nothing needs it: decrypt-only, its wrapped key
    kept until ``destroy_after``. Idempotent; retiring a retired version proves again and
    starts a new destruction window (the uses since its first retirement still cancel it while
    its destruction is pending: :func:`keyrotor.store.retire.retire_dek`).

    Raises:
        GraceNotOver: the grace period is not over (and ``force_now`` is False).
        NotRetirable: the version is pending or active.
        LocationNotCovered: values of the version went to a location the census cannot count.
        KeyStillInUse: rows still reference the version after re-encrypting stragglers (for
            example one that does not decrypt, named in the message); the key is kept.
        KekMismatch: this process's KEK cannot unwrap the scope's DEKs.
    """
    check_scope(scope)
    if run_id is None:
        run = await _open_retirement(rc.sessions, scope, version, force_now=force_now, trigger=trigger)
    else:
        async with db.transaction(rc.sessions) as session:
            run = await runs.require_run(session, run_id)
        if run.kind != "retire" or run.scope != scope or run.from_version != version:
            raise Conflict(f"run {run_id} is not the retirement of {scope} v{version}")
    if run.terminal:
        return RetireResult(run, scope, version, 0)
    await rc.check_kek(scope)
    run = await begin_attempt(rc, run, scope, job_id)  # the proof covers every registered column
    async with failing_run(rc, run):
        if await check_retirable(rc.sessions, scope, version, force_now=force_now) == "destroyed":
            async with db.transaction(rc.sessions) as session:
                await runs.complete_run(session, run.id)
                run = await runs.require_run(session, run.id)
            return RetireResult(run, scope, version, 0, already_destroyed=True)
        stragglers, destroy_after = await _retire(rc, run, scope, version, force_now)
    await rc.announce(KeyChange("retired", scope, version))
    async with db.transaction(rc.sessions) as session:
        run = await runs.require_run(session, run.id)
    log.info("dek_retired", version=version, stragglers=stragglers, destroy_after=destroy_after.isoformat())
    return RetireResult(run, scope, version, stragglers, destroy_after=destroy_after)


async def _retire(
    rc: RotationContext, run: RunInfo, scope: str, version: int, force_now: bool
) -> tuple[int, datetime]:
    """Re-encrypt stragglers and prove, until the proof holds (:data:`PROOF_ATTEMPTS` times at
    most). Returns ``(stragglers, destroy_after)``.

    Raises:
        KeyStillInUse: rows keep appearing on the version.
    """
    stragglers = 0
    for _attempt in range(PROOF_ATTEMPTS):
        stragglers += await _reencrypt_stragglers(rc, run, scope, version)
        destroy_after = await run_to_commit(_prove_and_retire(rc, run, scope, version, force_now))
        if destroy_after is not None:
            return stragglers, destroy_after
    raise KeyStillInUse(
        f"{scope}: rows keep being written under DEK v{version}; a process still encrypts with it "
        "(a stale cache?). The key is kept; retire again later"
    )


async def _reencrypt_stragglers(rc: RotationContext, run: RunInfo, scope: str, version: int) -> int:
    written = 0
    for target in rc.targets_for(scope):
        after: Key | None = None  # from the first key, whatever the key's type
        while True:
            await rc.spend_rows(rc.batch_rows)
            last_id, n = await run_to_commit(_straggler_batch(rc, run, target, scope, version, after))
            if last_id is None:
                break
            written += n
            after = last_id
    return written


async def _straggler_batch(
    rc: RotationContext, run: RunInfo, target: Target, scope: str, version: int, after: Key | None
) -> tuple[Key | None, int]:
    """One batch of ``target``'s rows on ``version`` moved to the active DEK: ``(last id, rows)``."""
    async with db.transaction(rc.sessions) as session:
        sc = await require_scope(session, scope)
        keys = await load_keys(session, rc.cipher, scope, sc.id, sc.active_version, only=[version])
        apg = await raw_connection(session)
        await relax_commit(apg)  # the proof's transaction below commits synchronously
        try:
            b = await reencrypt_batch(apg, target, keys, version, after=after, limit=rc.batch_rows)
        except RowFailed as exc:
            raise KeyStillInUse(f"{scope}: DEK v{version} is still needed: {exc}; the key is kept") from exc
        if b.written:
            await runs.add_progress(session, run.id, b.written)
        return b.last_id, b.written


async def _prove_and_retire(
    rc: RotationContext, run: RunInfo, scope: str, version: int, force_now: bool
) -> datetime | None:
    """The proof and the retirement, in one transaction. Returns ``destroy_after``, or None if
    rows appeared on the version (nothing written: the caller re-encrypts them and tries again).

    Raises:
        LocationNotCovered: a location of the version's values is neither counted nor acknowledged.
    """
    async with db.transaction(rc.sessions) as session:
        await store.limit_lock_wait(session)
        key_id, state, scope_id = await store.lock_dek_to_retire(session, scope, version)
        if state not in ("grace", "retired"):
            raise NotRetirable(f"{scope}: DEK v{version} is {state}")
        proof = await prove_unused(rc, session, scope, scope_id, version)
        if proof.uncovered:
            raise not_covered(scope, version, proof.uncovered)
        if proof.unmigrated:
            raise not_migrated(scope, version, proof.unmigrated)
        if proof.rows:
            log.warning("dek_still_in_use", version=version, rows=proof.rows)
            return None
        destroy_after = await store.retire_dek(session, key_id, rc.settings.destroy_after_days)
        await retire_event(
            session,
            run,
            scope,
            version,
            success=True,
            state="retired",
            destroy_after=destroy_after.isoformat(),
            force_now=force_now,
            count_stragglers=True,
        )
        await runs.complete_run(session, run.id)
    rc.ciphers.invalidate(scope, version)
    return destroy_after


async def retire_event(
    session: AsyncSession,
    run: RunInfo,
    scope: str,
    version: int,
    *,
    success: bool,
    state: str,
    count_stragglers: bool = False,
    **meta: Any,
) -> None:
    """Write the ``retire`` audit event of a retirement or destruction run (``state`` is what it
    did: ``retired``, ``destroyed``, ``cancelled``...), in the caller's transaction."""
    done = await runs.require_run(session, run.id)
    if count_stragglers:
        meta["stragglers"] = done.rows_done
    await write_event(
        session,
        AuditEvent(
            event_type="retire",
            scope=scope,
            key_version=version,
            success=success,
            metadata={
                "run_id": run.id,
                "state": state,
                **meta,
                "trigger": run.trigger,
                **runs.request_context(done.request_ids),
            },
        ),
    )
