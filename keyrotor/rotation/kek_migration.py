"""KEK provider migration: rewrap every DEK from one provider (say ``local``) to another (``aws``).

No secret is decrypted, only the DEKs, one batch at a time, and a DEK's plaintext lives only in
memory for the duration of its rewrap. A run is a ``rotations`` row of kind ``kek_migrate``
(``detail``: ``from``/``to`` provider) whose cursor makes it resumable:

1. read a batch of non-destroyed DEKs whose ``kek_id`` is not the target's, after the cursor
   (no transaction is held across a provider call);
2. for each: unwrap with the source, wrap with the target under the same context (scope, DEK
   version), unwrap the new wrapping with the target and compare it with the source's DEK;
3. in one transaction: write each new wrapping with compare-and-swap on ``encrypted_dek`` and
   ``kek_id`` (a DEK rotated or rewrapped meanwhile is left alone and picked up by the final
   pass), one ``rewrap`` audit event per DEK (metadata: from/to provider, KEK ids and versions),
   and advance the cursor.
4. before the run completes, the audit chain's key moves the same way (read, moved and
   verified with no transaction open, written with compare-and-swap:
   :func:`keyrotor.audit.key.migrate_keys`).

A final pass from the start catches DEKs skipped by a CAS miss or created meanwhile by processes
still on the source provider. DEKs made by such processes after the run completes stay on the
source until the operator switches ``SECRETS_PROVIDER`` and runs ``keyrotor kek migrate --from
<source> --to <target>`` once more (``keyrotor kek status`` shows any left).
"""

from __future__ import annotations

import asyncio
import hmac
import os
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, cast

import structlog
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from keyrotor import runs
from keyrotor.audit import key as audit_key
from keyrotor.audit.log import AuditEvent, write_event
from keyrotor.errors import ConfigurationError, Conflict, KekError, PermanentError
from keyrotor.kek.base import (
    PROVIDER_SETTING,
    KekProvider,
    WrapContext,
    WrappedDek,
    provider_layers,
    provider_of,
)
from keyrotor.kek.factory import open_provider
from keyrotor.rotation.context import unwrap_stored_deks
from keyrotor.rotation.hang import hang_point
from keyrotor.rotation.rewrap import Item, Rewrap, refuse_if_open
from keyrotor.runs import RunInfo
from keyrotor.settings import Settings
from keyrotor.store import db
from keyrotor.store import kek as kek_store
from keyrotor.store.kek import DekToRewrap

log = structlog.get_logger("keyrotor.rotation.kek_migration")

KIND = cast(runs.RunKind, "kek_migrate")
PROVIDERS = ("local", "aws", "vault")
# A fixed probe context: the target's kek_id is learnt from a probe wrap.
_PROBE = WrapContext("keyrotor/migration-probe", 1)
# DEKs handled at once (unwrap + wrap + verify are network calls on remote providers).
_CONCURRENCY = 8
# Full passes before a run completes although DEKs are still being created on the source.
_MAX_PASSES = 3


@dataclass(frozen=True)
class MigrationResult:
    """The outcome of a migration run."""

    run: RunInfo
    source: str
    target: str
    target_kek_id: str
    migrated: int
    remaining: int

    def summary(self) -> dict[str, Any]:
        return {
            "run_id": self.run.id,
            "state": self.run.state,
            "from": self.source,
            "to": self.target,
            "target_kek_id": self.target_kek_id,
            "migrated": self.migrated,
            "remaining": self.remaining,
            "next_step": next_step(self.target),
        }


def next_step(target: str) -> str:
    """What the operator changes once a migration to ``target`` completed."""
    return (
        f"set SECRETS_PROVIDER={target} (keep its variables) in every keyrotor process and restart "
        "them; keep the old provider's configuration until `keyrotor kek status` shows no DEK on it"
    )


def check_provider_setting(name: str) -> str:
    """Refuse a provider name that is not ``local``, ``aws`` or ``vault`` (ConfigurationError)."""
    if name not in PROVIDERS:
        raise ConfigurationError(f"unknown KEK provider {name!r} (expected one of: {', '.join(PROVIDERS)})")
    return name


async def open_named_provider(
    name: str, settings: Settings, environ: Mapping[str, str] | None = None
) -> KekProvider:
    """Open provider ``name`` (``local``, ``aws``, ``vault``) from the same variables as
    ``SECRETS_PROVIDER=name`` would (``ENCRYPTION_KEY*``, ``AWS_*``, ``VAULT_*``).

    Raises:
        ConfigurationError: a variable the provider needs is missing (named in the message).
        KekError, KekUnavailable: the provider refused or cannot be reached.
    """
    check_provider_setting(name)
    env = os.environ if environ is None else environ
    return await open_provider(settings.model_copy(update={"secrets_provider": name}), env)


async def request_migration(
    session: AsyncSession, source: str, target: str, *, trigger: str = "api", request_id: str | None = None
) -> tuple[RunInfo, bool]:
    """Open the migration run (or join the open one, if it goes to the same target), recording
    ``request_id`` on it.

    Raises:
        InvalidRequestId: ``request_id`` is not valid.
        Conflict: a migration to another target, or a KEK rotation, is open.
        ConfigurationError: unknown provider, or source and target are the same.
    """
    check_provider_setting(source)
    check_provider_setting(target)
    if source == target:
        raise ConfigurationError(
            f"the DEKs are on {source} already (source and target are the same provider)"
        )
    await refuse_if_open(session, "kek", "a KEK rotation")
    run, created = await runs.open_run(
        session, KIND, None, trigger=trigger, detail={"from": source, "to": target}, request_id=request_id
    )
    if not created and (run.detail.get("to") != target or run.detail.get("from") != source):
        raise Conflict(
            f"migration run {run.id} from {run.detail.get('from')} to {run.detail.get('to')} is open: "
            "let it finish (or fail) first"
        )
    return run, created


async def migrate_kek(
    sessions: async_sessionmaker[AsyncSession],
    source: KekProvider,
    target: KekProvider,
    *,
    run_id: int,
    batch_size: int = 100,
    job_id: str | None = None,
) -> MigrationResult:
    """Drive migration run ``run_id``: rewrap every DEK not on ``target`` from ``source`` to it.

    Idempotent and resumable (the run's cursor); safe to run again after a crash.

    Args:
        sessions: the keyrotor database.
        source: the provider the DEKs are on now.
        target: the provider they move to.
        run_id: the run (:func:`request_migration`).
        batch_size: DEKs a transaction.
        job_id: the arq job driving it, recorded on the run.

    Returns:
        The outcome; ``remaining`` counts DEKs still not on the target (0 when it completed).

    Raises:
        KekError: a DEK does not unwrap under the source (a ``ForeignKek`` names the provider
            that wrapped it), or a new wrapping did not verify. The run fails; nothing of the
            batch is written.
        KekUnavailable, StoreUnavailable: an outage; run again and it resumes.
    """
    async with db.transaction(sessions) as session:
        run = await runs.require_run(session, run_id)
    src_name = str(run.detail.get("from", PROVIDER_SETTING.get(source.name, source.name)))
    dst_name = str(run.detail.get("to", PROVIDER_SETTING.get(target.name, target.name)))
    if run.terminal:
        tid = str(run.detail.get("target_kek_id", ""))
        return MigrationResult(run, src_name, dst_name, tid, run.rows_done, 0)
    run, target_id = await _start(sessions, run, source, target, job_id)
    migration = _Migration(sessions, run, source, target, target_id, dst_name)
    try:
        migrated = await migration.rewrap(batch_size).all_passes(migration.finished)
    except PermanentError as exc:
        if not isinstance(exc, ConfigurationError):  # a misconfigured process leaves the run be
            await _fail(sessions, run, source, target, exc)
        raise
    run, remaining = migration.run, migration.remaining
    log.info("kek_migration_completed", migrated=migrated, remaining=remaining, state=run.state)
    return MigrationResult(run, src_name, dst_name, target_id, migrated, remaining)


async def _start(
    sessions: async_sessionmaker[AsyncSession],
    run: RunInfo,
    source: KekProvider,
    target: KekProvider,
    job_id: str | None,
) -> tuple[RunInfo, str]:
    """Prove the target works before anything is written, learn its kek_id, start the attempt."""
    target_id = (await target.wrap(os.urandom(32), _PROBE)).kek_id
    await target.check()
    async with db.transaction(sessions) as session:
        run = await runs.start_attempt(session, run.id, job_id)
        total = await kek_store.count_deks_not_on_kek(session, target_id)
        if run.rows_total is None:
            await kek_store.set_run_total(session, run.id, total)
        await runs.update_detail(session, run.id, target_kek_id=target_id, source_provider=source.name)
    structlog.contextvars.bind_contextvars(run_id=run.id)
    log.info("kek_migration_started", source=source.name, target=target.name, deks=total)
    return run, target_id


@dataclass
class _Migration:
    """What a migration run's rewrap does its own way: the DEKs, their rewrap, the audit, the end.

    ``run`` is the completed run once :meth:`finished` said so; ``remaining`` the DEKs it left
    off the target.
    """

    sessions: async_sessionmaker[AsyncSession]
    run: RunInfo
    source: KekProvider
    target: KekProvider
    target_id: str
    dst_name: str
    remaining: int = 0

    def rewrap(self, batch_size: int) -> Rewrap:
        return Rewrap(
            self.sessions,
            self.run,
            self.select,
            self.rewrap_items,
            self.metadata,
            batch_size=batch_size,
            progress_event="deks_migrated",
            progress_fields={"target": self.target.name},
            match_kek_id=True,
        )

    async def select(self, session: AsyncSession, after: int, limit: int) -> list[DekToRewrap]:
        return await kek_store.deks_not_on_kek(session, self.target_id, after=after, limit=limit)

    async def rewrap_items(self, items: list[Item]) -> list[WrappedDek]:
        limit = asyncio.Semaphore(_CONCURRENCY)
        tasks = [
            asyncio.ensure_future(_rewrap_one(self.source, self.target, old, ctx, limit))
            for old, ctx in items
        ]
        try:
            return list(await asyncio.gather(*tasks))
        except BaseException:
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            raise

    def metadata(self, old: WrappedDek, new: WrappedDek) -> dict[str, Any]:
        return {
            "migration": True,
            "from_provider": provider_of(old.kek_id),
            "to_provider": self.target.name,
            "from_kek_id": old.kek_id,
            "from_kek_version": old.kek_version,
            "to_kek_id": new.kek_id,
            "to_kek_version": new.kek_version,
        }

    async def finished(self, passes: int, _last_id: int) -> bool:
        """Complete the run once no DEK is left off the target, or after ``_MAX_PASSES`` more passes.

        Another pass picks up DEKs skipped by a CAS miss (rotated or rewrapped meanwhile) or
        created meanwhile by processes still on the source provider.
        """
        async with db.transaction(self.sessions) as session:
            remaining = await kek_store.count_deks_not_on_kek(session, self.target_id)
        if remaining and passes < _MAX_PASSES:
            return False
        await hang_point("kek_migration_completing")
        # The audit chain's key moves with the DEKs (a process on the target opens it), outside
        # any transaction: no lock on its row waits for the two providers' answers.
        await audit_key.migrate_keys(self.sessions, self.source, self.target, self.target_id)
        async with db.transaction(self.sessions) as session:
            self.remaining = await kek_store.count_deks_not_on_kek(session, self.target_id)
            if await runs.complete_run(session, self.run.id):  # not if another attempt did
                await runs.update_detail(
                    session, self.run.id, next_step=next_step(self.dst_name), remaining=self.remaining
                )
            self.run = await runs.require_run(session, self.run.id)
        return True


async def _fail(
    sessions: async_sessionmaker[AsyncSession],
    run: RunInfo,
    source: KekProvider,
    target: KekProvider,
    exc: PermanentError,
) -> None:
    """Mark the run failed and audit the failed rewrap (in a transaction of its own); nothing
    if the run has ended already (another attempt of the job completed it)."""
    async with db.transaction(sessions) as session:
        if not await runs.fail_run(session, run.id, exc):
            log.warning("kek_migration_ended_before_failure", error=type(exc).__name__)
            return
        await write_event(
            session,
            AuditEvent(
                "rewrap",
                success=False,
                error_message=f"{type(exc).__name__}: {exc}"[:1000],
                metadata={
                    "run_id": run.id,
                    "from_provider": source.name,
                    "to_provider": target.name,
                    **runs.request_context(run.request_ids),
                },
            ),
        )
    log.error("kek_migration_failed", error=f"{type(exc).__name__}: {exc}")


async def _rewrap_one(
    source: KekProvider, target: KekProvider, old: WrappedDek, ctx: WrapContext, limit: asyncio.Semaphore
) -> WrappedDek:
    async with limit:
        dek = await source.unwrap(old, ctx)
        try:
            new = await target.wrap(dek, ctx)
            # Prove the target opens its wrapping to the very same DEK before it replaces the old.
            if not hmac.compare_digest(await target.unwrap(new, ctx), dek):
                raise KekError(
                    f"migrated DEK v{ctx.dek_version} of {ctx.scope!r} unwraps to another key under "
                    f"{target.name}"
                )
        finally:
            del dek
        return new


# --- status ------------------------------------------------------------------------------------


async def kek_census(session: AsyncSession) -> list[dict[str, Any]]:
    """Non-destroyed DEKs per ``(kek_id, kek_version)``, with the provider each id belongs to."""
    return [
        {"kek_id": kid, "provider": provider_of(kid), "kek_version": kv, "deks": n}
        for kid, kv, n in await kek_store.deks_per_kek(session)
    ]


async def kek_status(
    sessions: async_sessionmaker[AsyncSession], kek: KekProvider | str, open_error: Exception | None = None
) -> dict[str, Any]:
    """What ``keyrotor kek status --json`` prints: the provider, its versions, DEKs per KEK, check.

    Args:
        sessions: the keyrotor database.
        kek: the open provider, or the name of the one that could not be opened.
        open_error: why it could not be opened.

    The provider check and the version read never raise: their failure is reported, so status
    works during a provider outage.
    """
    if isinstance(kek, str):
        name = kek  # not opened: for aws, which mode is not known
        doc: dict[str, Any] = {"provider": name, "setting": kek, "current_kek_version": None}
        doc["check"] = {"ok": False, "error": f"{type(open_error).__name__}: {open_error}"}
    else:
        name = kek.name
        doc = {"provider": name, "setting": PROVIDER_SETTING.get(name, name)}
        try:
            doc["current_kek_version"] = await kek.current_version()
            # Vault transit: the oldest KEK version it still unwraps with (rotate_kek raises it).
            for layer in provider_layers(kek):
                key_info = getattr(layer, "key_info", None)
                if key_info is not None:
                    doc["min_decryption_version"] = (await key_info()).min_decryption_version
                    break
        except Exception as exc:  # reported, not raised
            doc["current_kek_version"] = None
            doc["version_error"] = f"{type(exc).__name__}: {exc}"
        try:
            await kek.check()
            # The probe passes with any valid key: a stored DEK tells a wrong ENCRYPTION_KEY.
            unwrapped = await unwrap_stored_deks(sessions, kek)
            doc["check"] = {"ok": True, "error": None, "deks_unwrapped": unwrapped}
        except Exception as exc:
            doc["check"] = {"ok": False, "error": f"{type(exc).__name__}: {exc}"}
    async with db.transaction(sessions) as session:
        census = await kek_census(session)
        open_runs = [
            r.as_dict()
            for r in await runs.list_runs(session, limit=50, open_only=True)
            if r.kind in ("kek", "kek_migrate")
        ]
    mine = {c["provider"] for c in census if PROVIDER_SETTING.get(c["provider"]) == doc["setting"]}
    if not isinstance(kek, str):
        mine = {kek.name}
    doc["deks"] = census
    doc["kek_versions_in_use"] = sorted({c["kek_version"] for c in census if c["provider"] in mine})
    doc["deks_on_other_providers"] = sum(c["deks"] for c in census if c["provider"] not in mine)
    doc["open_runs"] = open_runs
    return doc
