"""A process the crash tests SIGKILL: it encrypts and decrypts, says so, then waits to die.

    python -m tests.keyrotor.audit_crash_child ACTOR N_DECRYPTS N_ENCRYPTS

Configuration comes from the environment (``DATABASE_URL``, ``ENCRYPTION_KEY``,
``KEYROTOR_AUDIT``, ...). After the last call has returned it prints ``returned N`` and sleeps
without closing the KeyManager, so nothing after that line can write an event: what is in the
log is what the mode promised by the time the calls returned.
"""

from __future__ import annotations

import asyncio
import sys

from keyrotor import KeyManager

API_KEY = "sk-ant-api03-" + "c" * 95


async def main(actor: str, decrypts: int, encrypts: int) -> None:
    km = KeyManager.from_env()
    await km.open()
    token = await km.encrypt("anthropic", API_KEY, context="crash:0", actor=actor)
    for i in range(encrypts - 1):
        await km.encrypt("anthropic", API_KEY, context=f"crash:{i + 1}", actor=actor)
    for _ in range(decrypts):
        await km.decrypt("anthropic", token, context="crash:0", actor=actor)
    print(f"returned {encrypts + decrypts}", flush=True)
    await asyncio.sleep(3600)  # the test kills us long before


if __name__ == "__main__":
    asyncio.run(main(sys.argv[1], int(sys.argv[2]), int(sys.argv[3])))
