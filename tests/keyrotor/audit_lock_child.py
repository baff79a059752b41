"""A process the chain-lock tests freeze: it writes an audit event the way the jobs do, then stops.

    python -m tests.keyrotor.audit_lock_child ACTOR

Configuration comes from the environment (``DATABASE_URL``, ``ENCRYPTION_KEY``, ...). It opens a
KeyManager (so its audit key is loaded, as a worker's is), opens a transaction, appends one
``config_change`` event through :func:`keyrotor.audit.log.write_event` (which takes the chain
lock), prints ``locked`` and then waits without committing: the test SIGSTOPs it there, between
taking the chain lock and committing.
"""

from __future__ import annotations

import asyncio
import sys

from keyrotor import KeyManager
from keyrotor.audit.log import AuditEvent, write_event
from keyrotor.store import db


async def main(actor: str) -> None:
    km = KeyManager.from_env()
    await km.open()
    async with db.transaction(km.sessions) as session:
        await write_event(session, AuditEvent("config_change", actor=actor, metadata={"what": "frozen"}))
        print("locked", flush=True)
        await asyncio.sleep(3600)  # the test stops, then kills, us long before


if __name__ == "__main__":
    asyncio.run(main(sys.argv[1]))
