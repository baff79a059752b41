"""The application of the KEK crash suite: it keeps decrypting and encrypting while a KEK run
is SIGKILLed around it.

    python -m tests.reliability.kek_usage_child VALUES_JSON STOP_FILE

``VALUES_JSON`` maps scope -> {name: plaintext} of the stored values. Until ``STOP_FILE``
exists, every round reads one stored value of every scope, encrypts a new one into it (and,
every few rounds, into a scope of its own, whose first DEK is wrapped meanwhile) and opens
the last values it wrote again (all of them at the end). Its DEK cache lives 1 ms
(``KEYROTOR_DEK_CACHE_TTL_SECONDS``, set by the test), so each read unwraps through the KEK,
as a cold process would. At the end it prints one JSON line: counts and every error (class
and message, which hold no secret).
"""

from __future__ import annotations

import asyncio
import json
import secrets
import sys
from pathlib import Path
from typing import Any

from keyrotor import KeyManager

ROUND_PAUSE_S = 0.02
# Values of its own opened again each round (all of them once more at the end).
RECHECK = 30


async def _round(km: KeyManager, values: dict[str, dict[str, str]], mine: list[Any], n: int) -> int:
    ops = 0
    for scope, named in values.items():
        name = sorted(named)[n % len(named)]
        if await km.get_secret(scope, name) != named[name]:
            raise AssertionError(f"{scope}/{name} opened to another value")
        value = f"sk-child-{n:05d}-{secrets.token_urlsafe(18)}"
        context = f"child:{scope}:{n}"
        mine.append((scope, context, await km.encrypt(scope, value, context=context), value))
        ops += 2
    if n % 5 == 0:  # a scope of its own: its first DEK is wrapped while the run goes on
        scope = f"child-{n:05d}/openai"
        value = f"sk-child-own-{secrets.token_urlsafe(18)}"
        mine.append((scope, "own", await km.encrypt(scope, value, context="own"), value))
        ops += 1
    return ops + await _reopen(km, mine[-RECHECK:])


async def _reopen(km: KeyManager, written: list[Any]) -> int:
    for scope, context, ciphertext, value in written:
        if await km.decrypt(scope, ciphertext, context=context) != value:
            raise AssertionError(f"a value of {scope} opened to another value")
    return len(written)


async def main(values_path: str, stop_path: str) -> None:
    values: dict[str, dict[str, str]] = json.loads(Path(values_path).read_text())
    stop = Path(stop_path)
    mine: list[Any] = []
    ops, rounds, errors = 0, 0, []
    km = KeyManager.from_env()
    await km.open()
    print(json.dumps({"started": True}), flush=True)
    try:
        while not stop.exists():
            try:
                ops += await _round(km, values, mine, rounds)
            except Exception as exc:  # every failure is reported, the test fails on any
                errors.append(f"round {rounds}: {type(exc).__name__}: {exc}"[:500])
            rounds += 1
            await asyncio.sleep(ROUND_PAUSE_S)
        try:
            ops += await _reopen(km, mine)
        except Exception as exc:
            errors.append(f"at the end: {type(exc).__name__}: {exc}"[:500])
    finally:
        await km.close()
    print(json.dumps({"rounds": rounds, "ops": ops, "own_values": len(mine), "errors": errors}), flush=True)


if __name__ == "__main__":
    asyncio.run(main(sys.argv[1], sys.argv[2]))
