"""The DEK cache: unwrapped DEKs by (scope, version), bounded by age and by count.

Unwrapping costs a KEK provider round trip (a KMS call, a Vault request); decrypting with a
cached DEK costs microseconds. The cache holds ready ``AESGCM`` objects, not raw key bytes,
because building one costs more than decrypting a short value with it.

Refresh-ahead: a hit in the last ``refresh_ahead`` part of an entry's life marks the entry
``due``; its owner (KeyManager) unwraps it again in the background and puts it back with a new
TTL, so a key in steady use never expires on a caller's path. Each refresh goes to the KEK
provider again, so the TTL still bounds how long a revoked KEK grant goes unnoticed; a refresh
that is refused (not an outage) drops the entry at once (``keyrotor.keyring``).
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
        self,
        *,
        ttl_s: float = 1800.0,
        max_entries: int = 10_000,
        refresh_ahead: float = 0.5,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if not 0.0 <= refresh_ahead < 1.0:
            raise ValueError("refresh_ahead must be in [0, 1)")
        self._ttl_s = ttl_s
        self._max = max_entries
        # An entry's age from which a hit marks it due for a background refresh (past its
        # expiry, i.e. never, when refresh-ahead is off).
        self._refresh_age = ttl_s * (1.0 - refresh_ahead) if refresh_ahead else ttl_s + 1.0
        self._clock = clock
        # (scope, version) -> (cipher, expires at, refresh due from)
        self._entries: OrderedDict[tuple[str, int], tuple[AESGCM, float, float]] = OrderedDict()
        self.stats = CacheStats()
        # Entries a hit found in their refresh window; the owner takes them (see KeyManager).
        self.due: set[tuple[str, int]] = set()

    def __len__(self) -> int:
        return len(self._entries)

    def __repr__(self) -> str:
        return f"DekCache(entries={len(self._entries)}, ttl_s={self._ttl_s}, max_entries={self._max})"

    def probe(self, scope: str, version: int) -> AESGCM | None:
        """The cached cipher (a hit is counted), or None without counting a miss: for a fast
        path whose miss is counted by the :meth:`get` of the path it falls back to."""
        # On the decrypt hot path: one dict probe, one clock read and two comparisons on a hit.
        entry = self._entries.get((scope, version))
        if entry is not None:
            now = self._clock()
            if now < entry[1]:
                self.stats.hits += 1
                if now >= entry[2]:
                    self.due.add((scope, version))
                return entry[0]
            del self._entries[(scope, version)]
        return None

    def get(self, scope: str, version: int) -> AESGCM | None:
        """The cached cipher, or None (counted as a miss) if absent or expired."""
        cipher = self.probe(scope, version)
        if cipher is None:
            self.stats.misses += 1
        return cipher

    def put(self, scope: str, version: int, cipher: AESGCM) -> None:
        """Cache a cipher for ``ttl_s``; evict the least recently stored entry past ``max_entries``."""
        key = (scope, version)
        now = self._clock()
        self._entries[key] = (cipher, now + self._ttl_s, now + self._refresh_age)
        self._entries.move_to_end(key)
        self.due.discard(key)
        while len(self._entries) > self._max:
            self._entries.popitem(last=False)
            self.stats.evictions += 1

    def invalidate(self, scope: str | None = None, version: int | None = None) -> int:
        """Drop entries (all, a scope's, or one version). Returns how many were dropped."""
        if scope is None:
            n = len(self._entries)
            self._entries.clear()
            self.due.clear()
            return n
        keys = [k for k in self._entries if k[0] == scope and (version is None or k[1] == version)]
        for k in keys:
            del self._entries[k]
            self.due.discard(k)
        return len(keys)

    def take_due(self) -> list[tuple[str, int]]:
        """The entries marked for a background refresh since the last call (and unmark them)."""
        due = list(self.due)
        self.due.clear()
        return due
