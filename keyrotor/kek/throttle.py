"""A rate budget in front of the local keyring (``KEYROTOR_KEK_CALLS_PER_SECOND``).

The remote providers spend the budget themselves, once per request they send (retries
included), in their resilience layer (:mod:`keyrotor.kek.resilience`): only there is it known
how many requests a call became. The local keyring sends no request, so :class:`ThrottledKek`
spends one unit of a :class:`~keyrotor.kek.budget.RateBudget` per DEK it handles instead, and a
rotation on the local keyring is paced the same way. :func:`keyrotor.kek.factory.open_provider`
puts it in front of the local keyring only: in front of a remote provider it would count its
calls a second time.
"""

from __future__ import annotations

import time
from collections.abc import Sequence

import structlog

from keyrotor.kek.base import KekProvider, WrapContext, WrappedDek
from keyrotor.kek.budget import RateBudget

log = structlog.get_logger("keyrotor.kek.throttle")


class ThrottledKek:
    """A :class:`KekProvider` that waits for its budget before each call of the local keyring.

    A rewrap of many DEKs is sent in chunks of at most one second's budget (at least one DEK),
    each chunk spending as many units as it has DEKs: the provider never sees more than that
    many calls at once.

    Args:
        inner: the provider.
        budget: the budget (shared across processes in the worker).
    """

    def __init__(self, inner: KekProvider, budget: RateBudget) -> None:
        self.inner = inner
        self.budget = budget
        self._chunk = max(1, int(budget.rate))

    def __repr__(self) -> str:
        return f"ThrottledKek({self.inner!r}, budget={self.budget!r})"

    @property
    def name(self) -> str:
        return self.inner.name

    async def _spend(self, operation: str, units: int = 1) -> None:
        slot = await self.budget.acquire_slot(units)
        # The slot the budget granted (``slot_at``, Redis's clock) and the moment the call is let
        # through (``at``, this process's clock): what the two-worker test reads to check the
        # budget across processes, the schedule from the slots (a busy process may use its slot
        # late, never early) and each call against its slot (debug level: not logged by default).
        log.debug(
            "kek_budget_spent",
            operation=operation,
            units=units,
            waited_s=round(slot.wait_s, 4),
            slot_at=slot.starts_at,
            at=time.time(),
        )

    async def current_version(self) -> int:
        return await self.inner.current_version()

    async def wrap(self, dek: bytes, context: WrapContext) -> WrappedDek:
        await self._spend("wrap")
        return await self.inner.wrap(dek, context)

    async def unwrap(self, wrapped: WrappedDek, context: WrapContext) -> bytes:
        await self._spend("unwrap")
        return await self.inner.unwrap(wrapped, context)

    async def rewrap(self, items: Sequence[tuple[WrappedDek, WrapContext]]) -> list[WrappedDek]:
        out: list[WrappedDek] = []
        for i in range(0, len(items), self._chunk):
            chunk = items[i : i + self._chunk]
            await self._spend("rewrap", len(chunk))
            out.extend(await self.inner.rewrap(chunk))
        return out

    async def rotate(self) -> int:
        await self._spend("rotate")
        return await self.inner.rotate()

    async def check(self) -> None:
        await self._spend("check")
        await self.inner.check()

    async def aclose(self) -> None:
        await self.inner.aclose()
