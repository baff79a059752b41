"""DEK cache hit rate under a realistic mixed workload, against the seed's 95% at a 30-minute TTL.

A trace of requests replayed through a real :class:`keyrotor.KeyManager` (Postgres, Redis, the
local KEK) whose :class:`keyrotor.cache.DekCache` reads a virtual clock, so hours of traffic
take seconds and the 30-minute TTL (the default, as in the seed) really expires:

- many tenants, each with scopes ``tenant-<i>/<provider>`` (openai, anthropic, google weighted
  50/35/15), tenant popularity Zipf-like (weight 1/rank^s);
- requests arrive as a Poisson stream; 85% decrypt a value of the scope, 15% encrypt a new one;
- some rotations during the trace (scopes picked by popularity), through the real
  ``keyrotor.rotation.dek`` code and the real Redis key-change notice, which drops the scope's DEKs
  from the cache; the application's values of that scope are then on the new version (as the
  rotation's re-encryption leaves them);
- the process starts cold (empty cache), as a freshly started application does.

Figures: keyrotor's hit rate, against (a) the seed's 95% (a given figure, the number to beat),
(b) the seed's own cache replayed on the same trace (its DEKs were per provider, not per tenant:
three keys, a 30-minute TTL, no rotation), and (c) the ceiling on this trace: a cache that never
expires and is never invalidated misses only a scope's first request.

    .venv/bin/python -m bench.bench_cache [--tenants 1000] [--requests 120000] [--hours 2] [--json]
"""

from __future__ import annotations

import argparse
import asyncio
import bisect
import itertools
import json
import random
import uuid
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

import redis.asyncio as aioredis
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from bench.common import bench_settings, fresh_database, machine
from keyrotor import KeyManager
from keyrotor.cache import CacheStats, DekCache
from keyrotor.crypto import envelope
from keyrotor.kek.base import WrapContext
from keyrotor.notify import Notifier
from keyrotor.rotation import dek as rotation
from keyrotor.rotation.context import RotationContext
from keyrotor.schedule.rules import RotationPolicy
from keyrotor.store import db, repo

API_KEY = "sk-ant-api03-" + "x" * 95
PROVIDERS = (("openai", 0.50), ("anthropic", 0.35), ("google", 0.15))
SEED_BASELINE = 0.95
TTL_S = 1800.0
DECRYPT_SHARE = 0.85


@dataclass(frozen=True)
class Workload:
    tenants: int = 1_000
    requests: int = 120_000
    hours: float = 2.0
    rotations: int = 20
    zipf_s: float = 1.1
    seed: int = 11


@dataclass(frozen=True)
class Event:
    at_s: float
    scope: str
    op: str  # "decrypt" | "encrypt" | "rotate"


def trace(w: Workload) -> list[Event]:
    """The requests and rotations, in time order (deterministic for a given ``w.seed``)."""
    rng = random.Random(w.seed)
    weights = [1.0 / (rank**w.zipf_s) for rank in range(1, w.tenants + 1)]
    cum_t = list(itertools.accumulate(weights))
    cum_p = list(itertools.accumulate(p for _, p in PROVIDERS))

    def pick() -> str:
        tenant = bisect.bisect_left(cum_t, rng.random() * cum_t[-1])
        provider = PROVIDERS[bisect.bisect_left(cum_p, rng.random() * cum_p[-1])][0]
        return f"tenant-{tenant}/{provider}"

    duration = w.hours * 3600
    rate = w.requests / duration
    events: list[Event] = []
    t = 0.0
    for _ in range(w.requests):
        t += rng.expovariate(rate)
        events.append(Event(t, pick(), "decrypt" if rng.random() < DECRYPT_SHARE else "encrypt"))
    used = sorted({e.scope for e in events})
    popular = [e.scope for e in rng.sample(events, min(len(events), w.rotations * 4))]
    for scope in rng.sample(popular, min(len(popular), w.rotations)):
        if scope in used:
            events.append(Event(rng.uniform(0, t), scope, "rotate"))
    events.sort(key=lambda e: e.at_s)
    return events


def replay_seed_cache(events: list[Event]) -> float:
    """The seed's cache on the same requests: one DEK a provider, 30-minute TTL, no rotation."""
    now = 0.0
    cache = DekCache(ttl_s=TTL_S, clock=lambda: now)
    marker = object()
    for e in events:
        if e.op == "rotate":
            continue
        now = e.at_s
        provider = e.scope.rsplit("/", 1)[1]
        if cache.get(provider, 1) is None:
            cache.put(provider, 1, marker)  # type: ignore[arg-type]
    return cache.stats.hit_rate


def ceiling(events: list[Event]) -> float:
    """A cache that never forgets: only each scope's first request misses."""
    requests = [e for e in events if e.op != "rotate"]
    return 1 - len({e.scope for e in requests}) / len(requests)


async def create_scopes(km: KeyManager, scopes: list[str]) -> dict[str, str]:
    """Create the scopes (DEK v1 each) in one transaction, as ``KeyManager`` would one by one, and
    seal one value a scope. Returns the values."""
    policy = RotationPolicy(enabled=True, interval_days=90, grace_days=7)
    now = datetime.now(UTC)
    tokens: dict[str, str] = {}
    async with db.transaction(km.sessions) as session:
        for scope in scopes:
            dek = envelope.new_dek()
            await repo.create_scope(
                session, scope, await km.kek.wrap(dek, WrapContext(scope, 1)), policy, now
            )
            tokens[scope] = envelope.seal(
                API_KEY.encode(), cipher=AESGCM(dek), scope=scope, dek_version=1, context=f"user:{scope}"
            )
    return tokens


async def measure(w: Workload) -> dict[str, Any]:
    events = trace(w)
    url = await fresh_database("keyrotor_bench_cache")
    channel = f"keyrotor_bench_cache:{uuid.uuid4().hex[:8]}"
    settings = bench_settings(url, audit_mode="off", notify_channel=channel, small_scope_rows=1_000)
    now = 0.0
    # ``writer`` stands for the rotation worker: it re-encrypts the application's values, so
    # the measured process meets the new DEK only when its traffic does.
    writer_settings = bench_settings(url, audit_mode="off", listen_key_changes=False)
    cache = DekCache(
        ttl_s=settings.dek_cache_ttl_s,
        max_entries=settings.dek_cache_max_entries,
        refresh_ahead=settings.dek_cache_refresh_ahead,
        clock=lambda: now,
    )
    async with KeyManager(settings, cache=cache) as km, KeyManager(writer_settings) as writer:
        scopes = sorted({e.scope for e in events})
        tokens = await create_scopes(km, scopes)  # every scope exists before the trace starts
        km.invalidate()
        cache.stats = CacheStats()  # count the trace only, not the set-up
        redis: Any = aioredis.from_url(settings.redis_url)  # type: ignore[no-untyped-call]
        try:
            rc = RotationContext(km.sessions, km.kek, settings, notifier=Notifier(redis, channel))
            await asyncio.sleep(0.2)  # the key-change listener subscribes
            rotated = 0
            for e in events:
                now = e.at_s
                if e.op == "decrypt":
                    await km.decrypt(e.scope, tokens[e.scope], context=f"user:{e.scope}")
                elif e.op == "encrypt":
                    await km.encrypt(e.scope, API_KEY, context=f"user:{e.scope}")
                else:
                    progress = await rotation.rotate_dek(rc, e.scope)
                    assert progress.run.state == "completed", progress.run
                    rotated += 1
                    await asyncio.sleep(0.02)  # the notice reaches the listener
                    # The rotation re-encrypted the application's values of this scope.
                    tokens[e.scope] = await writer.encrypt(e.scope, API_KEY, context=f"user:{e.scope}")
        finally:
            await redis.aclose()
        stats = km.cache.stats
    requests = sum(1 for e in events if e.op != "rotate")
    return {
        "machine": machine(),
        "tenants": w.tenants,
        "scopes_used": len(scopes),
        "requests": requests,
        "hours": w.hours,
        "requests_per_s_virtual": round(requests / (w.hours * 3600), 1),
        "rotations": rotated,
        "zipf_s": w.zipf_s,
        "ttl_s": TTL_S,
        "hits": stats.hits,
        "misses": stats.misses,
        "keyrotor_hit_rate": stats.hit_rate,
        "seed_baseline": SEED_BASELINE,
        "seed_cache_same_trace_hit_rate": replay_seed_cache(events),
        "ceiling_hit_rate": ceiling(events),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--tenants", type=int, default=Workload.tenants)
    parser.add_argument("--requests", type=int, default=Workload.requests)
    parser.add_argument("--hours", type=float, default=Workload.hours)
    parser.add_argument("--rotations", type=int, default=Workload.rotations)
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    import logging

    import structlog

    structlog.configure(wrapper_class=structlog.make_filtering_bound_logger(logging.WARNING))
    r = asyncio.run(measure(Workload(args.tenants, args.requests, args.hours, args.rotations)))
    if args.json:
        print(json.dumps(r, indent=2))
        return
    print(
        f"machine: {r['machine']}; {r['requests']:,} requests over {r['hours']} h "
        f"({r['requests_per_s_virtual']}/s), {r['tenants']:,} tenants ({r['scopes_used']:,} scopes used, "
        f"Zipf s={r['zipf_s']}), {r['rotations']} rotations, TTL {r['ttl_s']:.0f} s"
    )
    hits, misses, seed = r["hits"], r["misses"], r["seed_cache_same_trace_hit_rate"]
    print(f"keyrotor DEK cache hit rate {r['keyrotor_hit_rate']:.2%} ({hits:,} hits, {misses:,} misses)")
    print(f"seed baseline {r['seed_baseline']:.0%}; the seed's per-provider cache on this trace {seed:.2%}")
    print(f"ceiling (never expires, never invalidated) {r['ceiling_hit_rate']:.2%}")


if __name__ == "__main__":
    main()
