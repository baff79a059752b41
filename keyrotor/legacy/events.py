"""The audit record of a legacy migration run: its end, completed or failed, in the audit chain.

A run re-encrypts every legacy value under the scopes' DEKs, so it is recorded as a rotation is:
one ``rotate`` event when it ends, in the transaction that ends it, with ``metadata.kind``
``legacy``, the run id and counts. Never a value, a row id or the master key: the run's report
(``keyrotor legacy migrate``, the ``rotations`` row) names the rows.
"""

from __future__ import annotations

from collections.abc import Iterable

from sqlalchemy.ext.asyncio import AsyncSession

from keyrotor import runs
from keyrotor.audit.log import MAX_ERROR_CHARS, AuditEvent, write_event
from keyrotor.errors import KeyrotorError
from keyrotor.legacy.report import ColumnReport

KIND = "legacy"


async def complete(session: AsyncSession, run_id: int, columns: Iterable[ColumnReport]) -> None:
    """Complete the run and audit it, in the caller's transaction; a run completed already (by
    a second driver of the same run, as arq may start) is left as it is, and audited once."""
    if (await runs.require_run(session, run_id, for_update=True)).state == "completed":
        return
    cols = list(columns)
    await _audit(
        session,
        run_id,
        success=True,
        error=None,
        counts={
            "rows": sum(c.migrated for c in cols),
            "changed": sum(len(c.changed) for c in cols),
            "failed": sum(c.failed_count for c in cols),
        },
    )
    await runs.complete_run(session, run_id)


async def fail(session: AsyncSession, run_id: int, error: KeyrotorError) -> None:
    """Fail the run with ``error`` and audit it, in the caller's transaction; a run that has
    ended already (another range failed it first) is left as it is, and audited once.

    keyrotor's errors never carry a value or a key, so the message is recorded as the run's is.
    """
    if (await runs.require_run(session, run_id, for_update=True)).terminal:
        return
    await runs.fail_run(session, run_id, error)
    await _audit(session, run_id, success=False, error=f"{type(error).__name__}: {error}", counts={})


async def _audit(
    session: AsyncSession, run_id: int, *, success: bool, error: str | None, counts: dict[str, int]
) -> None:
    run = await runs.require_run(session, run_id)
    await write_event(
        session,
        AuditEvent(
            event_type="rotate",
            success=success,
            error_message=None if error is None else error[:MAX_ERROR_CHARS],
            metadata={
                "kind": KIND,
                "run_id": run.id,
                "trigger": run.trigger,
                "attempts": run.attempts,
                **counts,
                **runs.request_context(run.request_ids),
            },
        ),
    )
