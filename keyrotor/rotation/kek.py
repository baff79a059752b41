"""KEK rotation: rewrap every DEK under the current KEK version. No secret is decrypted.

1. the provider's ``rotate()`` makes a new KEK version current -- except the local keyring,
   which rotates by configuration (a new ``ENCRYPTION_KEY`` with a higher
   ``ENCRYPTION_KEY_VERSION``, the old key kept in ``ENCRYPTION_KEYS_PREVIOUS``): then the
   current version is simply the target. The target is recorded on the run before anything is
   rewrapped, so a resumed run never rotates the provider twice. Before the rotate request is
   sent, the provider's latest version is recorded on the run too (``detail.kek_rotate_from``):
   a request that timed out may still be carried out, late, and the run's retry then finds the
   key past that version and adopts the new version instead of rotating again. An attempt that
   resumes a run with a target first reads the provider's version afresh: its process may have
   cached the version from before another process rotated.
2. every non-destroyed DEK with ``kek_version`` below the target is rewrapped, in batches, with
   ``kek.rewrap`` (server-side where the provider can). Each new wrapping is unwrapped and
   compared with the old one's DEK before it is written, with compare-and-swap on
   ``encrypted_dek`` and a ``rewrap`` audit event in the same transaction. Provider calls happen
   outside transactions; no row lock is held across a network call. The audit chain's key
   is rewrapped, verified and written the same way before the run completes. A request carried
   out later still (after the retry's own rotation) rotates the key past the target: wrappings
   under the newer version are taken, and a fresh read of the provider's version once every key
   is on the target raises the run's target to it and rewraps again (``_rewrap_to_latest``).

Before a provider is asked to rotate, a probe DEK goes through wrap, rewrap and unwrap: a
provider that only partly works (say, a token that may decrypt but not encrypt or rewrap) fails
the run there, before it has a new KEK version, and nothing is written.

The old KEK version must stay usable until the last DEK is rewrapped: the run's completion says
when that is. Where the provider can refuse old versions (Vault transit's
``min_decryption_version``), the run raises it, just before it completes, to the lowest KEK
version any stored DEK of that key still has (counted under a SHARE lock on ``data_keys``, so
no DEK being written meanwhile is missed); a ``config_change`` audit event records it. It counts
what is stored, never the run's target, so a key rotated past the target cuts nothing off.
"""

from __future__ import annotations

import hmac
import os
from dataclasses import dataclass, replace
from typing import Any

import structlog
from sqlalchemy.ext.asyncio import AsyncSession

from keyrotor import runs
from keyrotor.audit import key as audit_key
from keyrotor.audit.log import AuditEvent, write_events
from keyrotor.errors import ConfigurationError, KekError, KekUnavailable, PermanentError
from keyrotor.kek.base import (
    KekProvider,
    RetiresKekVersions,
    RotatesFromVersion,
    WrapContext,
    WrappedDek,
    provider_layers,
)
from keyrotor.notify import KeyChange
from keyrotor.rotation.context import RotationContext, kek_mismatch
from keyrotor.rotation.hang import hang_point
from keyrotor.rotation.lifecycle import fail
from keyrotor.rotation.rewrap import Item, Rewrap, refuse_if_open
from keyrotor.runs import RunInfo
from keyrotor.store import db
from keyrotor.store import kek as kek_store
from keyrotor.store.kek import DekToRewrap

log = structlog.get_logger("keyrotor.rotation.kek")

# The run's detail key for the provider's latest KEK version before the rotate request.
ROTATE_FROM = "kek_rotate_from"
# The run's detail key for the targets it left because the key was rotated past them meanwhile.
TARGET_RAISED_FROM = "kek_target_raised_from"
# Rounds of rewrapping, each ending with a fresh read of the provider's version.
_TARGET_ROUNDS = 3


@dataclass(frozen=True)
class KekRotationResult:
    """The outcome of a KEK rotation."""

    run: RunInfo
    kek_version: int
    rewrapped: int

    def summary(self) -> dict[str, Any]:
        return {
            "run_id": self.run.id,
            "state": self.run.state,
            "kek_version": self.kek_version,
            "rewrapped": self.rewrapped,
        }


async def request_kek_rotation(
    session: Any, *, trigger: str = "api", request_id: str | None = None
) -> tuple[RunInfo, bool]:
    """Open the KEK rotation run, or join the open one (recording ``request_id`` on it).

    Raises:
        Conflict: a KEK provider migration is open (the two would rewrap the same DEKs).
        InvalidRequestId: ``request_id`` is not valid.
    """
    await refuse_if_open(session, "kek_migrate", "a KEK provider migration")
    return await runs.open_run(session, "kek", None, trigger=trigger, request_id=request_id)


async def rotate_kek(
    rc: RotationContext, *, trigger: str = "api", run_id: int | None = None, job_id: str | None = None
) -> KekRotationResult:
    """Rewrap every DEK under the current (or a newly rotated) KEK version. Idempotent.

    Raises:
        KekMismatch: this process cannot unwrap the stored DEKs (old KEK version missing?).
        KekError: a rewrapped DEK did not verify (the run fails; nothing of its batch is written).
        KekUnavailable, StoreUnavailable: outages; run again and it resumes.
    """
    async with db.transaction(rc.sessions) as session:
        if run_id is None:
            run, _ = await request_kek_rotation(session, trigger=trigger)
        else:
            run = await runs.require_run(session, run_id)
    if run.terminal:
        return KekRotationResult(run, run.to_version or 0, run.rows_done)
    await rc.check_kek()
    async with db.transaction(rc.sessions) as session:
        run = await runs.start_attempt(session, run.id, job_id)
    structlog.contextvars.bind_contextvars(run_id=run.id)
    try:
        if run.to_version is None:
            target = await _fix_target(rc, run)
        else:
            target = run.to_version
            await _catch_up(rc, target)
        log.info("kek_rotation_started", kek_version=target, provider=rc.kek.name)
        target, rewrapped = await _rewrap_to_latest(rc, run, target)
        run = await _complete(rc, run)
    except PermanentError as exc:
        if not isinstance(exc, ConfigurationError):  # a misconfigured process leaves the run be
            await fail(rc, run, exc)
        raise
    await rc.announce(KeyChange("rewrapped", None, target))
    log.info("kek_rotation_completed", kek_version=target, rewrapped=rewrapped)
    return KekRotationResult(run, target, run.rows_done)


async def _fix_target(rc: RotationContext, run: RunInfo) -> int:
    """Rotate the provider (after its preflight) and record the target version on the run, once.

    A run that another attempt gave a target meanwhile keeps that one.
    """
    await preflight(rc.kek)
    target = await _target_version(rc, run)
    await hang_point("kek_rotated")
    async with db.transaction(rc.sessions) as session:
        locked = await runs.require_run(session, run.id, for_update=True)
        if locked.to_version is not None:
            return locked.to_version
        total = await kek_store.count_deks_below_kek_version(session, target)
        await kek_store.set_kek_run_target(session, run.id, target, total)
    return target


async def _rewrap_to_latest(rc: RotationContext, run: RunInfo, target: int) -> tuple[int, int]:
    """Rewrap every DEK and the audit key under ``target`` or later; returns the run's target
    at the end and the DEKs written.

    Transit and KMS take no idempotency token: a rotate request of an earlier attempt that
    reached the provider even later than this attempt's fresh read (seconds of job backoff)
    rotates the key once more, past the target. The wrappings made under that version open to
    the same keys, so they are taken; and once every key is on the target, the provider's
    version is read again: a key that went past it makes the newest version the run's target
    (recorded on the run) and the rewrap goes round again, so the run ends with every key on
    one version, the latest it saw, which its cut-off then keeps. At most
    :data:`_TARGET_ROUNDS` rounds: a key rotated past that again ends the run on its target,
    the newer version used only by what was wrapped under it (the cut-off counts what is stored).
    """
    rewrapped, rounds = 0, 0
    while True:
        rewrapped += await _rewrap(rc, run, target).all_passes(_one_more_pass)
        await audit_key.rewrap_keys(rc.sessions, rc.kek, target)  # the audit chain's key, as a DEK
        rounds += 1
        provider = _rotating_provider(rc)
        latest = None if provider is None else await provider.latest_version()
        if latest is None or latest <= target or rounds == _TARGET_ROUNDS:
            return target, rewrapped
        target = await _raise_target(rc, run, target, latest)
        run = replace(run, cursor=0)  # the keys left below it may be anywhere


async def _raise_target(rc: RotationContext, run: RunInfo, target: int, latest: int) -> int:
    """Make ``latest`` the run's target (the key was rotated past ``target`` meanwhile); the
    target now recorded (another attempt may have raised it further)."""
    log.warning("kek_rotated_past_target", kek_version=target, latest=latest)
    async with db.transaction(rc.sessions) as session:
        locked = await runs.require_run(session, run.id, for_update=True)
        if locked.terminal or (locked.to_version or 0) >= latest:
            return max(locked.to_version or 0, latest)
        left = await kek_store.count_deks_below_kek_version(session, latest)
        await kek_store.set_kek_run_target(session, run.id, latest, locked.rows_done + left)
        raised = [*locked.detail.get(TARGET_RAISED_FROM, []), target]
        await runs.update_detail(session, run.id, **{TARGET_RAISED_FROM: raised})
    return latest


def _rewrap(rc: RotationContext, run: RunInfo, target: int) -> Rewrap:
    async def select(session: AsyncSession, after: int, limit: int) -> list[DekToRewrap]:
        return await kek_store.deks_below_kek_version(session, target, after=after, limit=limit)

    async def rewrap(items: list[Item]) -> list[WrappedDek]:
        return await _rewrap_verified(rc.kek, items, target)

    def metadata(old: WrappedDek, new: WrappedDek) -> dict[str, Any]:
        return {
            "from_kek_version": old.kek_version,
            "to_kek_version": new.kek_version,
            "kek_id": new.kek_id,
        }

    return Rewrap(
        rc.sessions,
        run,
        select,
        rewrap,
        metadata,
        batch_size=rc.settings.kek_rewrap_batch,
        progress_event="deks_rewrapped",
        progress_fields={"kek_version": target},
    )


async def _one_more_pass(passes: int, last_id: int) -> bool:
    # One last pass from the start picks up rows skipped by a CAS miss; none is needed when
    # the only pass started at the first id and found nothing.
    return passes > 0 or last_id == 0


async def _rewrap_verified(kek: KekProvider, items: list[Item], target: int) -> list[WrappedDek]:
    """Rewrap ``items`` and prove each new wrapping opens to the same DEK as the old one, under
    ``target`` or a later version (the key rotated past the target: :func:`_rewrap_to_latest`)."""
    try:
        fresh = await kek.rewrap(items)
    except KekError as exc:
        old, ctx = items[0]
        raise kek_mismatch(ctx.scope, ctx.dek_version, old, exc) from exc
    for (old, ctx), new in zip(items, fresh, strict=True):
        try:
            same = hmac.compare_digest(await kek.unwrap(new, ctx), await kek.unwrap(old, ctx))
        except KekError as exc:
            raise KekError(
                f"rewrapped DEK v{ctx.dek_version} of {ctx.scope!r} does not unwrap: {exc}"
            ) from exc
        if not same or new.kek_version < target:
            raise KekError(
                f"rewrapped DEK v{ctx.dek_version} of {ctx.scope!r} did not verify "
                f"(KEK version {new.kek_version}, expected {target} or later)"
            )
    return fresh


async def _complete(rc: RotationContext, run: RunInfo) -> RunInfo:
    """Retire old KEK versions where the provider can, and complete the run."""
    retired = await _retire_old_versions(rc, run)
    async with db.transaction(rc.sessions) as session:
        # Locked, and read afresh: arq may run the job twice (an attempt stalled past its lease
        # while another took the job over), and the other attempt may have recorded the cut-off
        # and completed the run meanwhile. Each is done once.
        locked = await runs.require_run(session, run.id, for_update=True)
        if retired is not None and "kek_min_decryption_version" not in locked.detail:
            await _record_retirement(session, run, *retired)
        await runs.complete_run(session, run.id)  # a no-op if another attempt completed it
        return await runs.require_run(session, run.id)


async def _record_retirement(
    session: AsyncSession, run: RunInfo, kek_id: str, before: int, after: int
) -> None:
    await runs.update_detail(session, run.id, kek_min_decryption_version=after)
    await write_events(
        session,
        [
            AuditEvent(
                "config_change",
                metadata={
                    "what": "kek_min_decryption_version",
                    "kek_id": kek_id,
                    "before": before,
                    "after": after,
                    "run_id": run.id,
                    **runs.request_context(run.request_ids),
                },
            )
        ],
    )


_PROBE = WrapContext("keyrotor/kek-rotation-probe", 1)


async def preflight(kek: KekProvider) -> None:
    """Prove the provider can do everything a KEK rotation needs: wrap, rewrap and unwrap a probe.

    Raises:
        KekError: naming the provider and the cause; the rotation must not start.
        KekUnavailable: the provider cannot be reached (transient).
    """
    probe = os.urandom(32)
    try:
        wrapped = await kek.wrap(probe, _PROBE)
        (rewrapped,) = await kek.rewrap([(wrapped, _PROBE)])
        same = hmac.compare_digest(await kek.unwrap(rewrapped, _PROBE), probe)
    except KekError as exc:
        raise KekError(
            f"{kek.name}: refusing to rotate the KEK, the provider does not fully work "
            f"(a probe DEK's wrap, rewrap and unwrap): {exc}"
        ) from exc
    finally:
        del probe
    if not same:
        raise KekError(
            f"{kek.name}: refusing to rotate the KEK, a rewrapped probe DEK unwraps to another key"
        )


async def _retire_old_versions(
    rc: RotationContext, run: RunInfo | None = None
) -> tuple[str, int, int] | None:
    """Raise the provider's minimum decryption version to the lowest KEK version still in use.

    Returns (kek_id, previous minimum, new minimum), or None if the provider has no such setting,
    no DEK uses its key, or nothing changed. A provider that refuses (permission denied) is
    logged and left be: every DEK is rewrapped, the cut-off is hygiene.

    The change at the provider and its audit event cannot share a transaction. So ``run``'s
    detail records the minimum found (``kek_cutoff_from``, committed) before the provider is
    asked to raise it: an attempt that dies after the provider answered and before the event
    committed leaves it behind, and the next attempt of the run returns that change again, so
    that it is recorded (once: the run completes in the event's transaction).
    """
    provider = next((p for p in provider_layers(rc.kek) if isinstance(p, RetiresKekVersions)), None)
    if provider is None:
        return None
    try:
        current = await provider.min_decryption_version()
        if run is not None and (unrecorded := await _note_cutoff(rc, run, provider.kek_id, current)):
            return unrecorded
        await hang_point("kek_cutoff_request")
        async with db.transaction(rc.sessions) as session:
            # SHARE mode waits for transactions writing DEKs to commit, so a DEK wrapped under an
            # old version and being inserted right now is counted, not cut off; and it is held
            # until the provider has answered, so none can be inserted between the count and the
            # cut-off (DEK writers wait one provider call, once a KEK rotation).
            await kek_store.lock_deks_against_writes(session)
            lowest = await kek_store.lowest_kek_version_in_use(session, provider.kek_id)
            if lowest is None:
                return None
            before = await provider.raise_min_decryption_version(lowest)
    except KekError as exc:
        log.warning("kek_versions_not_retired", kek_id=provider.kek_id, error=f"{type(exc).__name__}: {exc}")
        return None
    if before is None:
        return None
    await hang_point("kek_cutoff_done")
    log.info("kek_versions_retired", kek_id=provider.kek_id, min_decryption_version=lowest, previous=before)
    return provider.kek_id, before, lowest


async def _note_cutoff(
    rc: RotationContext, run: RunInfo, kek_id: str, current: int
) -> tuple[str, int, int] | None:
    """Record ``current`` as the minimum ``run`` raises from, unless an earlier attempt of it
    raised the minimum and did not live to record it: that change, to be recorded now."""
    async with db.transaction(rc.sessions) as session:
        detail = (await runs.require_run(session, run.id, for_update=True)).detail
        found = detail.get("kek_cutoff_from")
        if found is not None and int(found) < current and "kek_min_decryption_version" not in detail:
            log.warning("kek_versions_retired", kek_id=kek_id, min_decryption_version=current, previous=found)
            return kek_id, int(found), current
        await runs.update_detail(session, run.id, kek_cutoff_from=current)
    return None


def _rotating_provider(rc: RotationContext) -> RotatesFromVersion | None:
    return next((p for p in provider_layers(rc.kek) if isinstance(p, RotatesFromVersion)), None)


async def _catch_up(rc: RotationContext, target: int) -> None:
    """Make this process's provider wrap under the run's target before it rewraps.

    The attempt that rotated may have run in another process: this one's provider may still
    hold the version it read before (cached, up to 5 minutes for Secrets Manager), and its
    rewraps would be refused as not on the target. A fresh read replaces the cached version.

    Raises:
        KekUnavailable: the provider still shows an older version than the target (a replica
            behind its primary, say): retried later.
    """
    provider = _rotating_provider(rc)
    if provider is None:
        return
    latest = await provider.latest_version()
    if latest < target:
        raise KekUnavailable(
            f"{rc.kek.name}: the KEK shows version {latest}, below the run's target {target}; "
            "retrying until the provider shows it"
        )


async def _target_version(rc: RotationContext, run: RunInfo) -> int:
    if rc.kek.name == "local":
        return await rc.kek.current_version()
    provider = _rotating_provider(rc)
    if provider is None:
        return await rc.kek.rotate()
    since = run.detail.get(ROTATE_FROM)
    if since is None:
        since = await provider.latest_version()
        # Committed before the request is sent: an attempt that dies or times out after it
        # leaves its starting point behind, and the next attempt rotates from the same one.
        async with db.transaction(rc.sessions) as session:
            locked = await runs.require_run(session, run.id, for_update=True)
            recorded = locked.detail.get(ROTATE_FROM)
            if recorded is None:
                await runs.update_detail(session, run.id, **{ROTATE_FROM: since})
            else:
                since = recorded
    await hang_point("kek_rotate_request")
    return await provider.rotate_from(int(since))
