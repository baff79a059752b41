"""What the rotation code needs, in one object: sessions, the KEK, settings, budgets, caches.

A :class:`RotationContext` is built once per worker process (``worker/main.py``) or per test
and handed to every function of :mod:`keyrotor.rotation.dek`, :mod:`keyrotor.rotation.reencrypt`,
:mod:`keyrotor.rotation.retire` and :mod:`keyrotor.rotation.kek`. It also unwraps DEKs for them
(:meth:`RotationContext.cipher`), caching the ready ciphers by ``(scope, version)``: a DEK
version never changes its bytes, only its wrapping.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, TypeVar

import structlog
from aiolimiter import AsyncLimiter
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from keyrotor.cache import DekCache
from keyrotor.errors import KekError, KekMismatch
from keyrotor.kek.base import KekProvider, WrapContext, WrappedDek
from keyrotor.settings import Settings
from keyrotor.store import db
from keyrotor.store import rotation as store
from keyrotor.store.targets import Target, default_targets

if TYPE_CHECKING:
    from keyrotor.notify import KeyChange, Notifier

T = TypeVar("T")

log = structlog.get_logger("keyrotor.rotation.context")


@dataclass
class RotationContext:
    """Dependencies of the rotation code. Build one per process; it is not thread-safe.

    Args:
        sessions: the session factory of the keyrotor database.
        kek: the KEK provider (wrapped in a rate budget by the worker if configured).
        settings: batch sizes, budgets, thresholds.
        notifier: announces key changes on Redis; None in tests that run without it.
        targets: the ciphertext columns rotation covers (default: keyrotor's ``secrets``).
    """

    sessions: async_sessionmaker[AsyncSession]
    kek: KekProvider
    settings: Settings
    notifier: Notifier | None = None
    targets: Sequence[Target] | None = None
    ciphers: DekCache = field(default_factory=lambda: DekCache(ttl_s=3600.0, max_entries=10_000))
    row_budget: AsyncLimiter | None = None

    def __post_init__(self) -> None:
        if self.targets is None:
            self.targets = default_targets()
        rate = self.settings.reencrypt_rows_per_second
        if self.row_budget is None and rate > 0:
            # Below one row a second the bucket holds one row, refilled every 1/rate seconds
            # (AsyncLimiter(0.5, 1.0) would let a row through every second, not every two).
            self.row_budget = AsyncLimiter(rate, 1.0) if rate >= 1 else AsyncLimiter(1, 1 / rate)

    @property
    def all_targets(self) -> Sequence[Target]:
        """The registered targets (never None after construction)."""
        assert self.targets is not None
        return self.targets

    def targets_for(self, scope: str) -> list[Target]:
        """The targets that may hold values of ``scope``."""
        return [t for t in self.all_targets if t.covers(scope)]

    @property
    def batch_rows(self) -> int:
        """Rows per re-encryption transaction (never more than one second of the row budget)."""
        n = self.settings.reencrypt_batch_rows
        rate = self.settings.reencrypt_rows_per_second
        return max(1, min(n, int(rate))) if rate > 0 else n

    @property
    def range_rows(self) -> int:
        """Rows per id range: smaller under a row budget, so one range job fits well within
        the job timeout (half of it) even at the budgeted pace."""
        n = self.settings.reencrypt_range_rows
        rate = self.settings.reencrypt_rows_per_second
        if rate > 0:
            n = min(n, max(self.batch_rows, int(rate * self.settings.job_timeout_s / 2)))
        return n

    async def spend_rows(self, n: int) -> None:
        """Wait for ``n`` rows of the re-encryption budget (no-op when unlimited)."""
        if self.row_budget is not None and n > 0:
            await self.row_budget.acquire(min(float(n), self.row_budget.max_rate))

    async def announce(self, change: KeyChange) -> None:
        """Publish a key change (no-op without a notifier)."""
        if self.notifier is not None:
            await self.notifier.publish(change)

    async def test_pause(self) -> None:
        """The test-only pause between batches (KEYROTOR_TEST_BATCH_DELAY_S)."""
        if self.settings.test_batch_delay_s > 0:
            await asyncio.sleep(self.settings.test_batch_delay_s)

    # --- DEKs ------------------------------------------------------------------------------

    async def cipher(self, scope: str, version: int, wrapped: WrappedDek) -> AESGCM:
        """The cipher of one DEK version, unwrapped once and cached.

        Raises:
            KekMismatch: the KEK cannot unwrap it (a wrong or missing key in this process).
            KekUnavailable: the provider cannot be reached (transient).
        """
        cached = self.ciphers.get(scope, version)
        if cached is not None:
            return cached
        try:
            dek = await self.kek.unwrap(wrapped, WrapContext(scope, version))
        except KekError as exc:
            raise kek_mismatch(scope, version, wrapped, exc) from exc
        cipher = AESGCM(dek)
        self.ciphers.put(scope, version, cipher)
        return cipher

    async def check_kek(self, scope: str | None = None) -> int:
        """Prove this process's KEK unwraps the stored DEKs: one DEK per distinct KEK id/version.

        Run at worker start-up (all scopes) and before each run (its scope), so a worker
        configured with the wrong ``ENCRYPTION_KEY`` refuses to rotate instead of failing
        halfway or, worse, wrapping new DEKs that the other processes cannot open.

        Returns:
            How many DEKs were checked.

        Raises:
            KekMismatch: naming the scope, version and KEK id that did not unwrap.
        """
        return await unwrap_stored_deks(self.sessions, self.kek, scope)


async def unwrap_stored_deks(
    sessions: async_sessionmaker[AsyncSession], kek: KekProvider, scope: str | None = None
) -> int:
    """Unwrap one stored DEK per distinct KEK id and version (of ``scope``, or all) with ``kek``.

    A provider's own probe passes with any valid key; only a stored DEK tells a wrong one.

    Returns:
        How many DEKs were checked.

    Raises:
        KekMismatch: naming the scope, version and KEK id that did not unwrap.
    """
    async with db.transaction(sessions) as session:
        rows = await store.one_dek_per_kek(session, scope)
    for name, version, kek_id, kek_version, blob in rows:
        wrapped = WrappedDek(kek_id=kek_id, kek_version=kek_version, blob=bytes(blob))
        try:
            await kek.unwrap(wrapped, WrapContext(name, version))
        except KekError as exc:
            raise kek_mismatch(name, version, wrapped, exc) from exc
    return len(rows)


def kek_mismatch(scope: str, version: int, wrapped: WrappedDek, exc: BaseException) -> KekMismatch:
    """The error a process with the wrong KEK raises (names ids and versions only)."""
    return KekMismatch(
        f"this process's KEK cannot unwrap DEK v{version} of scope {scope!r} (wrapped by {wrapped.kek_id}, "
        f"KEK version {wrapped.kek_version}): check ENCRYPTION_KEY / ENCRYPTION_KEYS_PREVIOUS "
        f"(or the provider settings); refusing to rotate. Cause: {exc}"
    )


async def run_to_commit(aw: Awaitable[T]) -> T:
    """Run one protected step (its transactions) to its end even if the caller is cancelled
    meanwhile, then re-raise.

    A worker told to stop (arq cancels its jobs on SIGTERM) thus finishes the step in hand (a
    batch: a few milliseconds to a second) instead of throwing its work away; the job is then
    run again and resumes after that step. A second cancellation (the worker's stop grace ran
    out, ``keyrotor.worker.main.LeasedWorker``) cancels the step itself: a step that had not sent
    COMMIT rolls back (its transaction's context manager sees the ``CancelledError``); one that
    had may have committed, since the server can apply a COMMIT whose answer never arrives. The
    ``protected_step_cancelled`` log line says which (``rolled_back`` or ``unknown``); either way
    nothing here assumes the step's effect, and the job's next attempt reads the run's state
    from the database and resumes from whatever committed.
    """
    with db.watch_commits() as watch:
        task = asyncio.ensure_future(aw)
    try:
        return await asyncio.shield(task)
    except asyncio.CancelledError as cancelled:
        if not task.done():
            try:
                await task  # cancelled again here -> the step is cancelled too
            except BaseException as exc:  # its CancelledError, or what a driver made of it
                # Never "rolled back" once COMMIT may have gone out: its outcome is unknown.
                outcome = "unknown" if watch.committing else "rolled_back"
                log.warning("protected_step_cancelled", outcome=outcome, error=type(exc).__name__)
                raise cancelled from None
        raise
