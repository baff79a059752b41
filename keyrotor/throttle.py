"""A rate budget in front of a KEK provider (``KEYROTOR_KEK_CALLS_PER_SECOND``).

Rotation makes bursts of KEK calls (unwrapping a scope's DEKs, rewrapping every DEK); a KMS
quota is shared with the applications. :class:`ThrottledKek` spends one unit of an
:class:`aiolimiter.AsyncLimiter` per DEK handled, so a worker never exceeds its share.
"""

from __future__ import annotations

from collections.abc import Sequence

from aiolimiter import AsyncLimiter

from keyrotor.kek.base import KekProvider, WrapContext, WrappedDek


class ThrottledKek:
    """A :class:`KekProvider` that waits for its budget before each call.

    Args:
        inner: the provider.
        calls_per_second: the budget (> 0).
    """

    def __init__(self, inner: KekProvider, calls_per_second: float) -> None:
        self.inner = inner
        self.limiter = AsyncLimiter(calls_per_second, 1.0)
        # A batch bigger than one second's budget is split, because AsyncLimiter refuses to
        # acquire more than its capacity at once.
        self._chunk = max(1, int(calls_per_second))

    def __repr__(self) -> str:
        return f"ThrottledKek({self.inner!r}, calls_per_second={self.limiter.max_rate})"

    @property
    def name(self) -> str:
        return self.inner.name

    async def current_version(self) -> int:
        return await self.inner.current_version()

    async def wrap(self, dek: bytes, context: WrapContext) -> WrappedDek:
        await self.limiter.acquire()
        return await self.inner.wrap(dek, context)

    async def unwrap(self, wrapped: WrappedDek, context: WrapContext) -> bytes:
        await self.limiter.acquire()
        return await self.inner.unwrap(wrapped, context)

    async def rewrap(self, items: Sequence[tuple[WrappedDek, WrapContext]]) -> list[WrappedDek]:
        out: list[WrappedDek] = []
        for i in range(0, len(items), self._chunk):
            chunk = items[i : i + self._chunk]
            await self.limiter.acquire(len(chunk))
            out.extend(await self.inner.rewrap(chunk))
        return out

    async def rotate(self) -> int:
        await self.limiter.acquire()
        return await self.inner.rotate()

    async def check(self) -> None:
        await self.limiter.acquire()
        await self.inner.check()

    async def aclose(self) -> None:
        await self.inner.aclose()
