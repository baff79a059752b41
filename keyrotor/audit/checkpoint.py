"""Signed checkpoints of the audit chain, delivered outside the database.

A chain shows an edited, inserted or reordered row, but not its newest rows deleted. As AWS
CloudTrail's digest files do, keyrotor regularly states the chain's head outside the log's
store: a checkpoint (head id, head hash, row count, time) MACed under a key derived from the
audit key (``keyrotor.audit.key``), so nobody without the KEK can forge one. Each is

- logged as the structured event ``audit_checkpoint`` (the log stream leaves the database host);
- appended, when ``KEYROTOR_AUDIT_CHECKPOINT_FILE`` is set, to that file as one JSON line,
  flushed and fsynced before the call returns.

:class:`Checkpointer` writes one every ``KEYROTOR_AUDIT_CHECKPOINT_INTERVAL_SECONDS`` (default an
hour) and one when it closes (each KeyManager runs one). ``keyrotor audit verify
--checkpoint-file F`` checks the latest line's signature, then that its head is still in the
chain with that hash.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import hmac
import json
import logging
import os
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import asdict, dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker

from keyrotor.audit.key import AuditKey, ensure_key
from keyrotor.audit.verify import ChainReport, verify_chain
from keyrotor.errors import InvalidInput, StoreRejected, TransientError
from keyrotor.kek.base import KekProvider
from keyrotor.settings import Settings
from keyrotor.store import audit as store
from keyrotor.store import db

# Through the stdlib logger: the processes render it as the structured event ``audit_checkpoint``
# (keyrotor.worker.logs), and a CLI command's stdout (its values, its --json) stays clean.
log = logging.getLogger("keyrotor.audit.log")

FORMAT = "krcp1"
MAX_LINE_CHARS = 4_096


@dataclass(frozen=True, slots=True)
class Checkpoint:
    """The chain's head at a point in time, signed with the audit key ``key_id``."""

    head_id: int
    head_hash: str  # hex
    rows: int
    at: str  # ISO 8601, UTC
    key_id: int
    mac: str  # hex

    def body(self) -> bytes:
        """What the MAC covers."""
        return f"{FORMAT}\t{self.head_id}\t{self.head_hash}\t{self.rows}\t{self.at}\t{self.key_id}".encode()

    def as_dict(self) -> dict[str, Any]:
        return {"format": FORMAT, **asdict(self)}

    def signed_by(self, key: AuditKey) -> bool:
        """Whether ``key`` made this checkpoint's MAC."""
        if key.key_id != self.key_id:
            return False
        return hmac.compare_digest(key.checkpoint_mac(self.body()).hex(), self.mac)

    @classmethod
    def parse(cls, line: str) -> Checkpoint:
        """A checkpoint from its JSON line.

        Raises:
            InvalidInput: not a checkpoint.
        """
        try:
            data = json.loads(line)
            if not isinstance(data, dict) or data.get("format") != FORMAT:
                raise ValueError
            cp = cls(
                int(data["head_id"]),
                str(data["head_hash"]),
                int(data["rows"]),
                str(data["at"]),
                int(data["key_id"]),
                str(data["mac"]),
            )
            if len(bytes.fromhex(cp.head_hash)) not in (0, 32):
                raise ValueError
        except (ValueError, KeyError, TypeError, OverflowError):  # OverflowError: int(1e999)
            raise InvalidInput("not an audit checkpoint line (krcp1 JSON)") from None
        return cp


async def make_checkpoint(session: AsyncSession, key: AuditKey) -> Checkpoint:
    """Sign the chain's current head (an empty chain: id 0, no hash)."""
    found = await store.head_and_first_id(session)
    if found is None:
        head_id, head_hash, rows = 0, "", 0
    else:
        head_id, head_hash = found[0], found[1].hex()
        rows = head_id - found[2] + 1  # ids have no gaps
    at = datetime.now(UTC).isoformat(timespec="microseconds")
    unsigned = Checkpoint(head_id, head_hash, rows, at, key.key_id, "")
    return Checkpoint(head_id, head_hash, rows, at, key.key_id, key.checkpoint_mac(unsigned.body()).hex())


def _append(path: Path, line: str) -> None:
    # O_APPEND: concurrent writers (several processes) never interleave within a line this short.
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o640)
    try:
        os.write(fd, line.encode())
        os.fsync(fd)
    finally:
        os.close(fd)


async def emit(checkpoint: Checkpoint, path: str | None) -> None:
    """Deliver a checkpoint: the ``audit_checkpoint`` log event, and the file sink if set."""
    log.info("audit_checkpoint", extra=checkpoint.as_dict())
    if path:
        line = json.dumps(checkpoint.as_dict(), sort_keys=True, separators=(",", ":")) + "\n"
        await asyncio.to_thread(_append, Path(path), line)


async def write_checkpoint(
    sessions: async_sessionmaker[AsyncSession], key: AuditKey, path: str | None
) -> Checkpoint:
    """Sign the current head and deliver it (see :func:`emit`)."""
    async with db.transaction(sessions) as session:
        checkpoint = await make_checkpoint(session, key)
    await emit(checkpoint, path)
    return checkpoint


def latest(path: str) -> Checkpoint:
    """The last checkpoint of a checkpoint file.

    Raises:
        InvalidInput: the file is missing, empty or its last line is not a checkpoint.
    """
    try:
        with open(path, "rb") as f:
            f.seek(0, os.SEEK_END)
            size = f.tell()
            f.seek(max(0, size - 4 * MAX_LINE_CHARS))
            tail = f.read().decode("utf-8", "replace")
    except OSError as exc:
        raise InvalidInput(f"cannot read the checkpoint file: {exc.strerror}") from None
    lines = [line for line in tail.splitlines() if line.strip()]
    if not lines:
        raise InvalidInput("the checkpoint file holds no checkpoint")
    return Checkpoint.parse(lines[-1])


async def verify_against(
    sessions: async_sessionmaker[AsyncSession],
    keys: Mapping[int, AuditKey],
    checkpoint: Checkpoint,
    *,
    on_progress: Callable[[int], None] | None = None,
) -> ChainReport:
    """Verify the chain and that the signed ``checkpoint``'s head is still in it, unchanged.

    A checkpoint whose MAC does not verify under its audit key (forged, or edited) fails the
    report without walking the chain.
    """
    key = keys.get(checkpoint.key_id)
    if key is None or not checkpoint.signed_by(key):
        return ChainReport().fail(
            checkpoint.head_id,
            "edited",
            f"the checkpoint of {checkpoint.at} is not signed by audit key {checkpoint.key_id}: "
            "it was forged or changed",
        )
    head = (checkpoint.head_id, bytes.fromhex(checkpoint.head_hash)) if checkpoint.head_id else None
    report = await verify_chain(sessions, keys=keys, checkpoint=head, on_progress=on_progress)
    report.checkpoint = f"{checkpoint.head_id}:{checkpoint.head_hash} at {checkpoint.at}"
    return report


class Checkpointer:
    """Writes a signed checkpoint every ``interval_s`` and one on :meth:`close`.

    Failures are logged and never raised: a missed checkpoint must not stop the application
    (the next one covers the same head and more).
    """

    def __init__(
        self,
        sessions: async_sessionmaker[AsyncSession],
        key: AuditKey | None,
        *,
        interval_s: float,
        path: str | None,
        key_loader: Callable[[], Awaitable[AuditKey]] | None = None,
    ) -> None:
        self._sessions = sessions
        self._key = key
        self._key_loader = key_loader
        self._interval_s = interval_s
        self._path = path
        self._task: asyncio.Task[None] | None = None

    def start(self) -> None:
        """Start the periodic task (idempotent)."""
        if self._task is None and self._interval_s > 0:
            self._task = asyncio.create_task(self._run(), name="keyrotor-audit-checkpoints")

    async def _run(self) -> None:
        while True:
            await asyncio.sleep(self._interval_s)
            await self.checkpoint()

    async def checkpoint(self) -> Checkpoint | None:
        """Write one checkpoint now; None if it failed (logged)."""
        try:
            if self._key is None and self._key_loader is not None:
                self._key = await self._key_loader()
            if self._key is None:
                return None
            return await write_checkpoint(self._sessions, self._key, self._path)
        except Exception as exc:  # the type only: a driver message may quote parameters
            log.warning("audit_checkpoint_failed", extra={"error": type(exc).__name__})
            return None

    async def close(self) -> None:
        """Stop the periodic task and write the closing checkpoint (none if the key was never
        loaded: the database or the KEK was away all along, and this process wrote nothing)."""
        task, self._task = self._task, None
        if task is not None:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
        if self._key is not None:
            await self.checkpoint()


async def open_audit_key(
    sessions: async_sessionmaker[AsyncSession], kek: KekProvider, settings: Settings
) -> tuple[AuditKey | None, Callable[[], Awaitable[AuditKey]], Checkpointer]:
    """What a KeyManager opens for its audit log: the audit key (created on first use), how to
    load it later, and a started :class:`Checkpointer`.

    A wrong KEK raises here (``AuditKeyMismatch``, ``ForeignKek``); an outage or a database not
    yet migrated leaves the key None, to be loaded by the first write (whose calls fail meanwhile).
    """
    load_key = functools.partial(ensure_key, sessions, kek)
    key: AuditKey | None = None
    try:
        key = await load_key()
    except (TransientError, StoreRejected) as exc:
        log.info("audit key not loaded yet (%s): audited calls fail until it is", type(exc).__name__)
    checkpoints = Checkpointer(
        sessions,
        key,
        interval_s=settings.audit_checkpoint_interval_s,
        path=settings.audit_checkpoint_file,
        key_loader=load_key,
    )
    checkpoints.start()
    return key, load_key, checkpoints
