"""A process of the usage-limit tests: it tries to encrypt, says how each call went, and either
closes or waits to be killed.

    python -m tests.reliability.usage_child SCOPE N [hold]

Configuration comes from the environment (``DATABASE_URL``, ``ENCRYPTION_KEY``,
``KEYROTOR_MAX_ENCRYPTIONS_PER_DEK``, ...). Prints one line a call (``call ok`` or ``call`` and
the error's class; its logs go to stdout too) and then ``done``; with ``hold`` it then sleeps
without closing its KeyManager, so a SIGKILL finds its reservation unused.
"""

from __future__ import annotations

import asyncio
import sys

from keyrotor import KeyManager
from keyrotor.errors import KeyrotorError

API_KEY = "sk-ant-api03-" + "u" * 95


async def main(scope: str, n: int, hold: bool) -> None:
    km = KeyManager.from_env()
    await km.open()
    for i in range(n):
        try:
            await km.encrypt(scope, API_KEY, context=f"usage:{i}")
            print("call ok", flush=True)
        except KeyrotorError as exc:
            print(f"call {type(exc).__name__}", flush=True)
    print("done", flush=True)
    if hold:
        await asyncio.sleep(3600)  # the test kills us long before
    await km.close()


if __name__ == "__main__":
    asyncio.run(main(sys.argv[1], int(sys.argv[2]), sys.argv[3:] == ["hold"]))
