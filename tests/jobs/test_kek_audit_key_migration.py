"""A KEK provider migration moves the audit chain's key as a KEK rotation rewraps it: read with no
transaction held, moved and verified with none open while the providers answer, then written
with compare-and-swap on the wrapping read.

The migration used to hold the key's row locked (``FOR UPDATE``) in one transaction across both
providers' calls: Vault or KMS over the network, maybe hung. Audit appends do not lock that row,
so they went on; but every other writer of the row (another attempt of the job, an operator)
waited on the remote call, and a row changed meanwhile could only be overwritten. Now nothing
holds the row while a provider answers, a change made meanwhile is read again (never
overwritten), and an attempt stopped before its swap leaves the old wrapping, still readable.
The providers are real (the local keyring and the session's OpenBao); only the target's answer
to its wrap of the audit key is held until the test lets it go.
"""

from __future__ import annotations

import asyncio
import hmac
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from typing import Any, cast

import asyncpg
import pytest

from keyrotor import Settings
from keyrotor.audit import key as audit_key
from keyrotor.audit.log import AuditEvent, write_event
from keyrotor.audit.verify import verify_chain
from keyrotor.errors import StoreBusy
from keyrotor.kek.base import KekProvider, WrapContext, WrappedDek
from keyrotor.kek.factory import open_provider
from keyrotor.rotation import kek_migration
from keyrotor.store import db
from tests.jobs.conftest import settings_of
from tests.rotation_helpers import fetch, seed
from tests.servers import ServerProcess, bao_server, vault_env

__all__ = ["bao_server"]  # the session's OpenBao dev server, a fixture

AUDIT_SCOPE = "_keyrotor_audit_key:"
DEADLINE_S = 30.0


class HeldWrap:
    """The real target provider; its wrap of the audit key is carried out at once, but answers
    only when the test sets ``go``. ``on_wrap`` runs meanwhile (the provider's work is done, the
    migration has not yet written anything), once for each wrap of the audit key."""

    def __init__(self, inner: KekProvider, on_wrap: Callable[[int], Any] | None = None) -> None:
        self.inner, self.on_wrap = inner, on_wrap
        self.arrived, self.go = asyncio.Event(), asyncio.Event()
        self.audit_wraps: list[WrappedDek] = []

    def __getattr__(self, name: str) -> Any:
        return getattr(self.inner, name)

    async def wrap(self, dek: bytes, context: WrapContext) -> WrappedDek:
        wrapped = await self.inner.wrap(dek, context)
        if context.scope.startswith(AUDIT_SCOPE):
            self.audit_wraps.append(wrapped)
            if self.on_wrap is not None:
                await self.on_wrap(len(self.audit_wraps))
            self.arrived.set()
            await self.go.wait()
        return wrapped


@dataclass
class Migration:
    """A local -> vault migration run of this test's database, its providers open."""

    s: Settings
    sessions: Any
    source: KekProvider
    target: KekProvider
    run_id: int
    tasks: list[asyncio.Task[Any]] = field(default_factory=list)

    def start(self, target: KekProvider) -> asyncio.Task[kek_migration.MigrationResult]:
        task = asyncio.create_task(
            kek_migration.migrate_kek(self.sessions, self.source, target, run_id=self.run_id)
        )
        self.tasks.append(task)
        return task

    async def key_row(self) -> asyncpg.Record:
        (row,) = await fetch(self.s.database_url, "SELECT * FROM audit_keys")
        return row

    async def mac_under(self, kek: KekProvider) -> bytes:
        """What the stored audit key MACs a probe to, opened by ``kek``."""
        return (await audit_key.load_keys(self.sessions, kek))[1].mac(b"probe")


@pytest.fixture
async def migration(wenv: dict[str, str], bao_server: ServerProcess) -> AsyncIterator[Migration]:
    s = settings_of(wenv)
    await seed(s, "anthropic", 2)  # a DEK, and the audit key (wrapped by local)
    engine = db.create_engine(s.database_url)
    source = await open_provider(s, {})
    target = await kek_migration.open_named_provider("vault", s, vault_env(bao_server))
    sessions = db.sessionmaker(engine)
    async with db.transaction(sessions) as session:
        run, _ = await kek_migration.request_migration(session, "local", "vault")
    m = Migration(s, sessions, source, target, run.id)
    try:
        yield m
    finally:
        for task in m.tasks:
            task.cancel()
        await asyncio.gather(*m.tasks, return_exceptions=True)
        await target.aclose()
        await source.aclose()
        await engine.dispose()


async def _row_locked(database_url: str) -> bool:
    """Whether a transaction holds audit_keys' row (a lock another writer would wait on)."""
    conn = await asyncpg.connect(database_url)
    try:
        async with conn.transaction():
            await conn.execute("SET LOCAL lock_timeout = '200ms'")
            try:
                await conn.execute("SELECT 1 FROM audit_keys FOR UPDATE")
            except asyncpg.exceptions.LockNotAvailableError:
                return True
        return False
    finally:
        await conn.close()


async def _audit_write(database_url: str, what: str) -> None:
    """An audit event appended by another connection (its own engine and transaction)."""
    engine = db.create_engine(database_url)
    try:
        async with db.transaction(db.sessionmaker(engine)) as session:
            await write_event(session, AuditEvent("config_change", metadata={"what": what}))
    finally:
        await engine.dispose()


async def test_audit_writes_go_on_while_the_target_wraps_the_audit_key(migration: Migration) -> None:
    m = migration
    before = await m.key_row()
    original = await m.mac_under(m.source)
    held = HeldWrap(m.target)
    task = m.start(cast(KekProvider, held))
    await asyncio.wait_for(held.arrived.wait(), DEADLINE_S)
    # The target is answering: nothing holds the row, and an audit write commits meanwhile.
    assert not await _row_locked(m.s.database_url)
    await asyncio.wait_for(_audit_write(m.s.database_url, "written while the provider answers"), 10)
    assert not task.done()
    held.go.set()
    result = await asyncio.wait_for(task, DEADLINE_S)
    assert result.run.state == "completed"
    row = await m.key_row()
    assert row["kek_id"] == result.target_kek_id != before["kek_id"]
    assert bytes(row["wrapped"]) == held.audit_wraps[0].blob
    assert hmac.compare_digest(await m.mac_under(m.target), original)  # the very same key
    keys = await audit_key.load_keys(m.sessions, m.target)
    report = await verify_chain(m.sessions, keys=keys)
    assert report.ok, report


async def _wrap_again_on_source(m: Migration) -> bytes:
    """Another writer's change to the row: the same key wrapped again by the source (a fresh
    nonce, so other bytes), committed while the migration waits for the target."""
    row = await m.key_row()
    ctx = WrapContext(f"{AUDIT_SCOPE}{row['switch_after']}", row["id"])
    raw = await m.source.unwrap(WrappedDek(row["kek_id"], row["kek_version"], bytes(row["wrapped"])), ctx)
    again = await m.source.wrap(raw, ctx)
    conn = await asyncpg.connect(m.s.database_url)
    try:
        async with conn.transaction():
            await conn.execute("SET LOCAL lock_timeout = '5s'")
            await conn.execute("UPDATE audit_keys SET wrapped = $1 WHERE id = $2", again.blob, row["id"])
    finally:
        await conn.close()
    return again.blob


async def test_a_row_changed_meanwhile_is_read_again_not_overwritten(migration: Migration) -> None:
    m = migration
    original = await m.mac_under(m.source)
    changed: list[bytes] = []

    async def change_once(n: int) -> None:
        if n == 1:
            changed.append(await _wrap_again_on_source(m))

    held = HeldWrap(m.target, change_once)
    held.go.set()  # the wraps answer at once; the row changes between the read and the swap
    result = await asyncio.wait_for(m.start(cast(KekProvider, held)), DEADLINE_S)
    assert result.run.state == "completed"
    # The first wrapping was of the row as read before the change: the swap missed, the row
    # was read again (the changed wrapping) and moved from there.
    assert len(held.audit_wraps) == 2
    row = await m.key_row()
    assert bytes(row["wrapped"]) == held.audit_wraps[1].blob and row["kek_id"] == result.target_kek_id
    assert hmac.compare_digest(await m.mac_under(m.target), original)


async def test_a_row_that_keeps_changing_is_refused_and_kept(migration: Migration) -> None:
    m = migration
    original = await m.mac_under(m.source)
    changed: list[bytes] = []

    async def change_every_time(_n: int) -> None:
        changed.append(await _wrap_again_on_source(m))

    held = HeldWrap(m.target, change_every_time)
    held.go.set()
    with pytest.raises(StoreBusy, match="audit key 1"):
        await asyncio.wait_for(m.start(cast(KekProvider, held)), DEADLINE_S)
    # Transient: the run stays open for the job's retry, and the row keeps the other writer's
    # wrapping (never one of the migration's, made from an older read).
    (run,) = await fetch(m.s.database_url, "SELECT state FROM rotations WHERE id = $1", m.run_id)
    assert run["state"] == "running"
    assert bytes((await m.key_row())["wrapped"]) == changed[-1]
    assert hmac.compare_digest(await m.mac_under(m.source), original)
    result = await asyncio.wait_for(m.start(m.target), DEADLINE_S)  # the retry, undisturbed
    assert result.run.state == "completed"
    assert hmac.compare_digest(await m.mac_under(m.target), original)


async def test_stopped_between_the_wrap_and_the_swap_the_old_wrapping_stays(migration: Migration) -> None:
    m = migration
    before = await m.key_row()
    original = await m.mac_under(m.source)
    held = HeldWrap(m.target)
    task = m.start(cast(KekProvider, held))
    await asyncio.wait_for(held.arrived.wait(), DEADLINE_S)
    # The target has wrapped the key; the attempt stops before it writes (a kill, a lost lease).
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await asyncio.wait_for(task, DEADLINE_S)
    row = await m.key_row()
    assert (row["kek_id"], bytes(row["wrapped"])) == (before["kek_id"], bytes(before["wrapped"]))
    assert hmac.compare_digest(await m.mac_under(m.source), original)  # still readable
    await asyncio.wait_for(_audit_write(m.s.database_url, "after the stopped attempt"), 10)
    result = await asyncio.wait_for(m.start(m.target), DEADLINE_S)  # the next attempt
    assert result.run.state == "completed"
    assert hmac.compare_digest(await m.mac_under(m.target), original)
