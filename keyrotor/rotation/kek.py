"""KEK rotation: rewrap every DEK under the current KEK version. No secret is decrypted.

1. the provider's ``rotate()`` makes a new KEK version current -- except the local keyring,
   which rotates by configuration (a new ``ENCRYPTION_KEY`` with a higher
   ``ENCRYPTION_KEY_VERSION``, the old key kept in ``ENCRYPTION_KEYS_PREVIOUS``): then the
   current version is simply the target. The target is recorded on the run before anything is
   rewrapped, so a resumed run never rotates the provider twice.
2. every non-destroyed DEK with ``kek_version`` below the target is rewrapped, in batches, with
   ``kek.rewrap`` (server-side where the provider can). Each new wrapping is unwrapped and
   compared with the old one's DEK before it is written, with compare-and-swap on
   ``encrypted_dek`` and a ``rewrap`` audit event in the same transaction. Provider calls happen
   outside transactions; no row lock is held across a network call.

Before a provider is asked to rotate, a probe DEK goes through wrap, rewrap and unwrap: a
provider that only partly works (say, a token that may decrypt but not encrypt or rewrap) fails
the run there, before it has a new KEK version, and nothing is written.

The old KEK version must stay usable until the last DEK is rewrapped: the run's completion says
when that is. Where the provider can refuse old versions (Vault transit's
``min_decryption_version``), the run raises it, just before it completes, to the lowest KEK
version any stored DEK of that key still has (counted under a SHARE lock on ``data_keys``, so
no DEK being written meanwhile is missed); a ``config_change`` audit event records it.
"""

from __future__ import annotations

import hmac
import os
from dataclasses import dataclass
from typing import Any

import structlog
from sqlalchemy import text

from keyrotor import runs
from keyrotor.audit import key as audit_key
from keyrotor.audit.log import AuditEvent, write_events
from keyrotor.errors import ConfigurationError, KekError, PermanentError
from keyrotor.kek.base import KekProvider, RetiresKekVersions, WrapContext, WrappedDek, provider_layers
from keyrotor.notify import KeyChange
from keyrotor.rotation.context import RotationContext, kek_mismatch, run_to_commit
from keyrotor.rotation.lifecycle import fail
from keyrotor.runs import RunInfo
from keyrotor.store import db

log = structlog.get_logger("keyrotor.rotation.kek")


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
    from keyrotor.rotation.kek_migration import refuse_if_open

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
        target = run.to_version
        if target is None:
            await preflight(rc.kek)
            target = await _target_version(rc)
            async with db.transaction(rc.sessions) as session:
                locked = await runs.require_run(session, run.id, for_update=True)
                if locked.to_version is None:
                    total = (
                        await session.execute(
                            text(
                                "SELECT count(*) FROM data_keys "
                                "WHERE state <> 'destroyed' AND kek_version < :t"
                            ),
                            {"t": target},
                        )
                    ).scalar_one()
                    await session.execute(
                        text(
                            "UPDATE rotations SET to_version = :t, rows_total = :n, updated_at = now() "
                            "WHERE id = :id"
                        ),
                        {"t": target, "n": total, "id": run.id},
                    )
                else:
                    target = locked.to_version
        log.info("kek_rotation_started", kek_version=target, provider=rc.kek.name)
        rewrapped = 0
        after = run.cursor
        restarted = False
        while True:
            n, last_id = await run_to_commit(_rewrap_batch(rc, run, target, after))
            if last_id is None:
                if restarted or after == 0:
                    break
                after, restarted = 0, True  # one last pass from the start: rows skipped by a CAS miss
                continue
            rewrapped += n
            after = last_id
            log.info("deks_rewrapped", rows=n, kek_version=target)
        async with db.transaction(rc.sessions) as session:  # the audit chain's key, as a DEK
            await audit_key.rewrap_keys(session, rc.kek)
        retired = await _retire_old_versions(rc)
        async with db.transaction(rc.sessions) as session:
            if retired is not None:
                kek_id, before, after = retired
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
            await runs.complete_run(session, run.id)
            run = await runs.require_run(session, run.id)
    except PermanentError as exc:
        if not isinstance(exc, ConfigurationError):  # a misconfigured process leaves the run be
            await fail(rc, run, exc)
        raise
    await rc.announce(KeyChange("rewrapped", None, target))
    log.info("kek_rotation_completed", kek_version=target, rewrapped=rewrapped)
    return KekRotationResult(run, target, run.rows_done)


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


async def _retire_old_versions(rc: RotationContext) -> tuple[str, int, int] | None:
    """Raise the provider's minimum decryption version to the lowest KEK version still in use.

    Returns (kek_id, previous minimum, new minimum), or None if the provider has no such setting,
    no DEK uses its key, or nothing changed. A provider that refuses (permission denied) is
    logged and left be: every DEK is rewrapped, the cut-off is hygiene.
    """
    provider = next((p for p in provider_layers(rc.kek) if isinstance(p, RetiresKekVersions)), None)
    if provider is None:
        return None
    async with db.transaction(rc.sessions) as session:
        # SHARE mode waits for transactions writing DEKs to commit, so a DEK wrapped under an
        # old version and being inserted right now is counted, not cut off; and it is held
        # until the provider has answered, so none can be inserted between the count and the
        # cut-off (DEK writers wait one provider call, once a KEK rotation).
        await session.execute(text("SET LOCAL lock_timeout = '10s'"))
        await session.execute(text("LOCK TABLE data_keys IN SHARE MODE"))
        lowest = (
            await session.execute(
                text(
                    "SELECT least((SELECT min(kek_version) FROM data_keys "
                    "WHERE state <> 'destroyed' AND kek_id = :kid), "
                    "(SELECT min(kek_version) FROM audit_keys WHERE kek_id = :kid))"
                ),
                {"kid": provider.kek_id},
            )
        ).scalar_one()
        if lowest is None:
            return None
        try:
            before = await provider.raise_min_decryption_version(int(lowest))
        except KekError as exc:
            log.warning(
                "kek_versions_not_retired", kek_id=provider.kek_id, error=f"{type(exc).__name__}: {exc}"
            )
            return None
    if before is None:
        return None
    log.info(
        "kek_versions_retired", kek_id=provider.kek_id, min_decryption_version=int(lowest), previous=before
    )
    return provider.kek_id, before, int(lowest)


async def _target_version(rc: RotationContext) -> int:
    if rc.kek.name == "local":
        return await rc.kek.current_version()
    # Not retried on a timeout: a blind retry could rotate twice (the provider says so too).
    return await rc.kek.rotate()


async def _rewrap_batch(rc: RotationContext, run: RunInfo, target: int, after: int) -> tuple[int, int | None]:
    async with db.transaction(rc.sessions) as session:
        rows = (
            await session.execute(
                text(
                    "SELECT d.id, s.name, d.version, d.kek_id, d.kek_version, d.encrypted_dek "
                    "FROM data_keys d JOIN key_scopes s ON s.id = d.scope_id "
                    "WHERE d.state <> 'destroyed' AND d.kek_version < :t "
                    "AND d.id > :after ORDER BY d.id LIMIT :n"
                ),
                {"t": target, "after": after, "n": rc.settings.kek_rewrap_batch},
            )
        ).all()
    if not rows:
        return 0, None
    items = [
        (WrappedDek(kek_id, kek_version, bytes(blob)), WrapContext(scope, version))
        for _id, scope, version, kek_id, kek_version, blob in rows
    ]
    try:
        fresh = await rc.kek.rewrap(items)
    except KekError as exc:
        old, ctx = items[0]
        raise kek_mismatch(ctx.scope, ctx.dek_version, old, exc) from exc
    for (old, ctx), new in zip(items, fresh, strict=True):
        # Prove the new wrapping opens to the same DEK before the old one is replaced.
        try:
            same = hmac.compare_digest(await rc.kek.unwrap(new, ctx), await rc.kek.unwrap(old, ctx))
        except KekError as exc:
            raise KekError(
                f"rewrapped DEK v{ctx.dek_version} of {ctx.scope!r} does not unwrap: {exc}"
            ) from exc
        if not same or new.kek_version != target:
            raise KekError(
                f"rewrapped DEK v{ctx.dek_version} of {ctx.scope!r} did not verify "
                f"(KEK version {new.kek_version}, expected {target})"
            )
    written = 0
    events: list[AuditEvent] = []
    async with db.transaction(rc.sessions) as session:
        for (row_id, scope, version, *_rest), (old, _ctx), new in zip(rows, items, fresh, strict=True):
            result: Any = await session.execute(
                text(
                    "UPDATE data_keys SET encrypted_dek = :new, kek_id = :kid, kek_version = :kv "
                    "WHERE id = :id AND encrypted_dek = :old AND state <> 'destroyed'"
                ),
                {"id": row_id, "new": new.blob, "kid": new.kek_id, "kv": new.kek_version, "old": old.blob},
            )
            if result.rowcount:
                written += 1
                events.append(
                    AuditEvent(
                        event_type="rewrap",
                        scope=scope,
                        key_version=version,
                        success=True,
                        metadata={
                            "run_id": run.id,
                            "from_kek_version": old.kek_version,
                            "to_kek_version": new.kek_version,
                            "kek_id": new.kek_id,
                            **runs.request_context(run.request_ids),
                        },
                    )
                )
        await write_events(session, events)
        await runs.add_progress(session, run.id, written, cursor=rows[-1][0])
    return written, rows[-1][0]
