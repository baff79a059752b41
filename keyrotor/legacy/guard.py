"""Bounds on what legacy decrypts in ``KeyManager.decrypt`` can cost.

Any canonical base64 string of 88 characters or more is shaped like a legacy value, and testing
it costs one scrypt (~50 ms of CPU, 16 MiB). Unbounded, a caller with decrypt rights could keep
every core busy with forged values, and each attempt wrote an audit row. So:

- at most ``KEYROTOR_LEGACY_DECRYPT_CONCURRENCY`` derivations run at once, in a thread pool of
  their own (scrypt releases the GIL), never in the loop's default executor that other work
  shares; callers beyond that wait their turn;
- an actor whose legacy decrypts failed authentication ``KEYROTOR_LEGACY_FAILURES_PER_MINUTE``
  times in the current one-minute window is refused at once, without scrypt, with
  :class:`~keyrotor.errors.LegacyDecryptThrottled` until the window ends. Only the first refusal
  of a window is reported as such (:meth:`LegacyGuard.check` says which), so the audit log gets
  one row a window, not one an attempt. Once an actor has failed, its decrypts under way count
  against the budget too, so concurrent attempts cannot overshoot it.

Malformed values never reach scrypt (the guard takes values ``legacy.parse`` already decoded) and
do not count.
The actor is whoever the caller names; one who varies it meets the concurrency bound still.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import time
from collections.abc import Callable

from keyrotor.crypto import legacy_format as legacy
from keyrotor.errors import DecryptionFailed, LegacyDecryptThrottled

WINDOW_S = 60.0
_MAX_ACTORS = 10_000


class LegacyGuard:
    """Concurrency bound and per-actor failure budget for legacy decrypts.

    Args:
        concurrency: derivations at once (threads of the dedicated pool).
        failures_per_window: failed decrypts an actor may have in one window.
        window_s: the window's length.
        clock: monotonic seconds (tests pass their own).
    """

    def __init__(
        self,
        concurrency: int,
        failures_per_window: int,
        *,
        window_s: float = WINDOW_S,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.concurrency = concurrency
        self.failures_per_window = failures_per_window
        self.window_s = window_s
        self._clock = clock
        self._semaphore = asyncio.Semaphore(concurrency)
        self._executor: concurrent.futures.ThreadPoolExecutor | None = None
        # actor -> [window start, failures in it, refusal reported]
        self._failures: dict[str, list[float]] = {}
        self._running: dict[str, int] = {}  # actor -> its decrypts under way (within the bound)
        self.refused = 0  # refusals since start (for tests and reports)

    def check(self, actor: str, running: int = 0) -> bool:
        """Refuse an actor over its budget. Returns True if it has failures in this window.

        ``running`` is how many of the actor's decrypts are under way: once it has failed, those
        count against the budget too, so concurrent attempts cannot overshoot it.

        Raises:
            LegacyDecryptThrottled: over budget; ``first_in_window`` on the exception says
                whether this is the window's first refusal (the one to audit).
        """
        entry = self._failures.get(actor)
        if entry is None:
            return False
        now = self._clock()
        if now - entry[0] >= self.window_s:
            del self._failures[actor]
            return False
        if entry[1] + running < self.failures_per_window:
            return True
        self.refused += 1
        first = not entry[2]
        entry[2] = 1.0
        left = self.window_s - (now - entry[0])
        exc = LegacyDecryptThrottled(
            f"actor {actor!r}: {int(entry[1])} failed legacy decrypts in {self.window_s:.0f} s; "
            f"refused for {left:.0f} s more"
        )
        exc.first_in_window = first
        exc.retry_after_s = left
        raise exc

    async def decrypt(self, actor: str, raw: bytes, master_key: str) -> str:
        """``legacy.decrypt_parsed`` of a value's decoded bytes, within the bounds (module docstring).

        Raises:
            LegacyDecryptThrottled: the actor is over its failure budget.
            WeakKeyError, DecryptionFailed: as ``legacy.decrypt_parsed``.
        """
        self.check(actor)
        async with self._semaphore:
            # Failures may have arrived while this call waited.
            self.check(actor, self._running.get(actor, 0))
            self._running[actor] = self._running.get(actor, 0) + 1
            try:
                loop = asyncio.get_running_loop()
                return await loop.run_in_executor(self._pool(), legacy.decrypt_parsed, raw, master_key)
            except DecryptionFailed:
                self.record_failure(actor)
                raise
            finally:
                left = self._running.pop(actor) - 1
                if left:
                    self._running[actor] = left

    def record_failure(self, actor: str) -> None:
        """Count a failed legacy decrypt of ``actor`` in its window (also one the reader refused
        after scrypt: a value that is not its row's successor's)."""
        now = self._clock()
        entry = self._failures.get(actor)
        if entry is None or now - entry[0] >= self.window_s:
            if entry is None and len(self._failures) >= _MAX_ACTORS:
                self._forget_expired(now)
            self._failures[actor] = [now, 1.0, 0.0]
        else:
            entry[1] += 1

    def _forget_expired(self, now: float) -> None:
        for actor in [a for a, e in self._failures.items() if now - e[0] >= self.window_s]:
            del self._failures[actor]
        while len(self._failures) >= _MAX_ACTORS:  # all current: the oldest go first
            del self._failures[next(iter(self._failures))]

    def _pool(self) -> concurrent.futures.ThreadPoolExecutor:
        if self._executor is None:
            self._executor = concurrent.futures.ThreadPoolExecutor(
                max_workers=self.concurrency, thread_name_prefix="keyrotor-legacy"
            )
        return self._executor

    def close(self) -> None:
        """Stop the pool's threads (a derivation under way finishes; its result is dropped)."""
        if self._executor is not None:
            self._executor.shutdown(wait=False, cancel_futures=True)
            self._executor = None
