"""Failover reads: a DEK unwrapped through the primary, or through a secondary's copy while the
primary's store or KEK provider is unavailable (see the docstring of
:mod:`keyrotor.replication.check`).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable, Sequence
from typing import Any

from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from prometheus_client import Counter as PromCounter
from prometheus_client import Gauge

from keyrotor.errors import KekError, KekUnavailable, StoreUnavailable
from keyrotor.replication.regions import Region, error_text
from keyrotor.settings.library import MIN_DESTROY_AFTER_DAYS

log = logging.getLogger("keyrotor.replication.check")

FAILOVER_ACTIVE = Gauge(
    "keyrotor_failover_active", "1 while DEK reads bypass the unavailable primary region."
)
FAILOVER_READS = PromCounter(
    "keyrotor_failover_unwraps_total", "DEKs unwrapped through a secondary region's copy.", ["region"]
)

# The states a regional copy must have been copied in for a failover read to serve it.
FAILOVER_STATES = ("pending", "active", "grace")
# How recently a copy must have been written, or its region proven in sync by a full check, for
# a failover read to serve it. A DEK in one of FAILOVER_STATES at that moment must first be
# retired and then kept for at least MIN_DESTROY_AFTER_DAYS before it can be destroyed, so a copy
# proven this recently cannot be of a destroyed DEK. A day less than the window: the margin
# covers the length of a check (the primary is read before the region is graded) and clock skew.
FAILOVER_MAX_PROOF_AGE_S = (MIN_DESTROY_AFTER_DAYS - 1) * 86_400.0

FailoverEmit = Callable[[bool, dict[str, Any], str | None], Awaitable[None]]
PrimaryFetch = Callable[[str, int], Awaitable[AESGCM]]


class Failover:
    """Whether reads have left the primary, and the secondaries they go to meanwhile.

    Args:
        primary: the primary region's name.
        regions: the secondaries, in the order of ``KEYROTOR_REGIONS``.
        timeout_s: how long a read waits for one region (``KEYROTOR_FAILOVER_TIMEOUT_SECONDS``).
        retry_s: how long a region that failed is skipped.
        on_failover: called with ``(success, metadata, error)`` when reads leave the primary
            (``success`` False) and when they return (True).
    """

    def __init__(
        self,
        primary: str,
        regions: Sequence[Region],
        *,
        timeout_s: float,
        retry_s: float,
        on_failover: FailoverEmit | None = None,
    ) -> None:
        self.primary = primary
        self.regions = regions
        self.timeout_s = timeout_s
        self.retry_s = retry_s
        self.on_failover = on_failover
        self.failing_over = False
        self._primary_down_until = 0.0

    async def fetch(self, scope: str, version: int, primary: PrimaryFetch) -> AESGCM:
        """Unwrap a DEK through the primary, or through the first healthy secondary if the
        primary's store or KEK provider is unavailable.

        Raises:
            whatever the primary raised (StoreUnavailable if it did not answer within
            ``timeout_s``), if no secondary could serve the DEK either;
            permanent errors of the primary (unknown scope or version, destroyed key) at once.
            (A version no region holds in one of :data:`FAILOVER_STATES` gets the primary's error.)
        """
        cause: BaseException | None = None
        if time.monotonic() >= self._primary_down_until:
            try:
                cipher = await self._ask_primary(primary, scope, version)
            except (StoreUnavailable, KekUnavailable) as exc:
                cause = exc
                self._primary_down_until = time.monotonic() + self.retry_s
                await self._leave_primary(exc)
            else:
                await self._return_to_primary()
                return cipher
        copy = await self._from_secondaries(scope, version)
        if copy is not None:
            return copy
        if cause is None:  # the primary was skipped (recently down): ask it after all
            return await self._ask_primary(primary, scope, version)
        raise cause

    async def _ask_primary(self, primary: PrimaryFetch, scope: str, version: int) -> AESGCM:
        """The primary's answer within ``timeout_s``; a silent primary is StoreUnavailable."""
        try:
            return await asyncio.wait_for(primary(scope, version), self.timeout_s)
        except TimeoutError as exc:
            raise StoreUnavailable(
                f"the primary region {self.primary} did not answer within {self.timeout_s:g}s"
            ) from exc

    async def _leave_primary(self, exc: BaseException) -> None:
        if self.failing_over:
            return
        self.failing_over = True
        FAILOVER_ACTIVE.set(1)
        log.warning(
            "primary region %s unavailable (%s): reading DEKs from secondaries", self.primary, error_text(exc)
        )
        await self._emit(
            False, {"from": self.primary, "state": "failover", "reason": type(exc).__name__}, error_text(exc)
        )

    async def _return_to_primary(self) -> None:
        if not self.failing_over:
            return
        self.failing_over = False
        FAILOVER_ACTIVE.set(0)
        log.warning("primary region %s is back: DEK reads return to it", self.primary)
        await self._emit(True, {"to": self.primary, "state": "recovered"}, None)

    async def _from_secondaries(self, scope: str, version: int) -> AESGCM | None:
        """The DEK from the first secondary that serves it (healthy ones first), or None."""
        for region in self._order():
            try:
                dek = await asyncio.wait_for(
                    region.unwrap_copy(
                        scope, version, states=FAILOVER_STATES, proven_within_s=FAILOVER_MAX_PROOF_AGE_S
                    ),
                    self.timeout_s,
                )
            except (StoreUnavailable, KekUnavailable, TimeoutError, KekError, OSError) as exc:
                region.down_until = time.monotonic() + self.retry_s
                log.warning(
                    "secondary region %s cannot serve %s v%d: %s",
                    region.name,
                    scope,
                    version,
                    error_text(exc),
                )
                continue
            if dek is None:
                continue
            FAILOVER_READS.labels(region.name).inc()
            return AESGCM(dek)
        return None

    def _order(self) -> list[Region]:
        now = time.monotonic()
        healthy = [r for r in self.regions if r.down_until <= now]
        return healthy + [r for r in self.regions if r.down_until > now]

    async def _emit(self, success: bool, metadata: dict[str, Any], error: str | None) -> None:
        if self.on_failover is None:
            return
        try:
            await self.on_failover(success, metadata, error)
        except Exception as exc:  # auditing must not turn a served read into a failure
            log.error("failover audit event not recorded: %s", type(exc).__name__)
