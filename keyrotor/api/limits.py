"""Who the client is (its address, through trusted proxies only) and how fast a token may go."""

from __future__ import annotations

import ipaddress
import math
import time
from collections.abc import Callable, Sequence

from keyrotor.errors import ConfigurationError

Network = ipaddress.IPv4Network | ipaddress.IPv6Network


def parse_proxies(value: str) -> tuple[Network, ...]:
    """``KEYROTOR_API_TRUSTED_PROXIES``: comma-separated addresses or CIDRs (empty: none).

    Raises:
        ConfigurationError: an entry is neither.
    """
    nets: list[Network] = []
    for part in value.split(","):
        part = part.strip()
        if not part:
            continue
        try:
            nets.append(ipaddress.ip_network(part, strict=False))
        except ValueError:
            raise ConfigurationError(
                f"KEYROTOR_API_TRUSTED_PROXIES: {part[:60]!r} is not an address or a CIDR"
            ) from None
    return tuple(nets)


def _trusted(addr: str, proxies: Sequence[Network]) -> bool:
    try:
        ip = ipaddress.ip_address(addr.strip())
    except ValueError:
        return False
    return any(ip in net for net in proxies)


def client_ip(peer: str | None, forwarded_for: str | None, proxies: Sequence[Network]) -> str | None:
    """The client's address: the peer's, unless the peer is a trusted proxy; then the nearest
    address of ``X-Forwarded-For`` (read right to left) that is not itself a trusted proxy.

    With no trusted proxy configured the header is ignored: anyone can write it.
    """
    if not proxies or not forwarded_for or peer is None or not _trusted(peer, proxies):
        return peer
    hops = [h.strip() for h in forwarded_for.split(",")[-32:] if h.strip()]
    for hop in reversed(hops):
        if not _trusted(hop, proxies):
            try:
                return str(ipaddress.ip_address(hop))
            except ValueError:
                return peer  # a garbled header: the last trusted hop is all we know
    return hops[0] if hops else peer


def client_key(ip: str | None) -> str:
    """The key a client's failed authentications are counted under: an IPv4 address (also
    when mapped into IPv6), or an IPv6 address's /64, which one host or site holds whole and
    could otherwise walk through, one fresh address a failure."""
    if ip is None:
        return "?"
    try:
        addr = ipaddress.ip_address(ip)
    except ValueError:
        return ip
    if isinstance(addr, ipaddress.IPv6Address):
        if addr.ipv4_mapped is not None:
            return str(addr.ipv4_mapped)
        return str(ipaddress.IPv6Network((addr, 64), strict=False))
    return str(addr)


class RateLimiter:
    """A token bucket per API token, in this process: ``rate`` units a second, ``burst`` at most.

    A unit is one value (a batch of 100 costs 100). A request of more units than ``burst`` may
    start once the bucket is full, and leaves the rest as debt that later requests wait out: the
    rate holds however large a request is. With several ``serve`` processes behind a load
    balancer, each has its own buckets. ``rate`` 0 turns the limit off.
    """

    _MAX_KEYS = 100_000

    def __init__(self, rate: float, burst: int, *, clock: Callable[[], float] = time.monotonic) -> None:
        self._rate = rate
        self._burst = float(burst)
        self._clock = clock
        self._buckets: dict[int | str, tuple[float, float]] = {}  # key -> (tokens, at)

    def available(self, key: int | str) -> bool:
        """Whether ``key`` could spend one unit now (spends nothing)."""
        if self._rate <= 0:
            return True
        bucket = self._buckets.get(key)
        if bucket is None:  # a full bucket: no clock needed
            return self._burst >= 1
        now = self._clock()
        tokens, at = bucket
        return min(self._burst, tokens + (now - at) * self._rate) >= 1

    def take(self, key: int | str, units: int = 1, *, paid: int = 0) -> float:
        """Spend ``units`` for ``key``: 0.0 if allowed, else the seconds to wait before retrying.

        ``paid``: units the same request spent already (a batch's first, spent before its body
        was read), so that a request larger than the burst starts from a full bucket, not never.
        """
        if self._rate <= 0:
            return 0.0
        now = self._clock()
        tokens, at = self._buckets.get(key, (self._burst, now))
        tokens = min(self._burst, tokens + (now - at) * self._rate)
        # What must be in the bucket to start; the whole cost is spent, below zero if need be.
        need = min(float(units + paid), self._burst) - paid
        if tokens < need:
            self._buckets[key] = (tokens, now)
            return max((need - tokens) / self._rate, 0.001)
        if len(self._buckets) >= self._MAX_KEYS and key not in self._buckets:
            self._buckets.clear()
        self._buckets[key] = (tokens - units, now)
        return 0.0


def retry_after(seconds: float) -> str:
    """A ``Retry-After`` header value (whole seconds, at least 1)."""
    return str(max(1, math.ceil(seconds)))
