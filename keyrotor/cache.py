"""The DEK cache: unwrapped DEKs by (scope, version), bounded by age and by count.

Unwrapping costs a KEK provider round trip (a KMS call, a Vault request); decrypting with a
cached DEK costs microseconds. The cache holds ready ``AESGCM`` objects, not raw key bytes,
because building one costs more than decrypting a short value with it.
"""

from __future__ import annotations

import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass

from cryptography.hazmat.primitives.ciphers.aead import AESGCM


@dataclass
class CacheStats:
    """Hit and miss counters since the cache was made."""

    hits: int = 0
    misses: int = 0
    evictions: int = 0

    @property
    def hit_rate(self) -> float:
        total = self.hits + self.misses
        return self.hits / total if total else 0.0


class DekCache:
    """LRU of ``AESGCM`` ciphers with a TTL. Not thread-safe: one per event loop."""

    def __init__(
        self, *, ttl_s: float = 1800.0, max_entries: int = 10_000, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self._ttl_s = ttl_s
        self._max = max_entries
        self._clock = clock
        self._entries: OrderedDict[tuple[str, int], tuple[AESGCM, float]] = OrderedDict()
        self.stats = CacheStats()

    def __len__(self) -> int:
        return len(self._entries)

    def __repr__(self) -> str:
        return f"DekCache(entries={len(self._entries)}, ttl_s={self._ttl_s}, max_entries={self._max})"

    def get(self, scope: str, version: int) -> AESGCM | None:
        """The cached cipher, or None (counted as a miss) if absent or expired."""
        # On the decrypt hot path: one dict probe and one clock read on a hit.
        entry = self._entries.get((scope, version))
        if entry is not None and self._clock() < entry[1]:
            self.stats.hits += 1
            return entry[0]
        if entry is not None:
            del self._entries[(scope, version)]
        self.stats.misses += 1
        return None

    def put(self, scope: str, version: int, cipher: AESGCM) -> None:
        """Cache a cipher for ``ttl_s``; evict the least recently stored entry past ``max_entries``."""
        key = (scope, version)
        self._entries[key] = (cipher, self._clock() + self._ttl_s)
        self._entries.move_to_end(key)
        while len(self._entries) > self._max:
            self._entries.popitem(last=False)
            self.stats.evictions += 1

    def invalidate(self, scope: str | None = None, version: int | None = None) -> int:
        """Drop entries (all, a scope's, or one version). Returns how many were dropped."""
        if scope is None:
            n = len(self._entries)
            self._entries.clear()
            return n
        keys = [k for k in self._entries if k[0] == scope and (version is None or k[1] == version)]
        for k in keys:
            del self._entries[k]
        return len(keys)
