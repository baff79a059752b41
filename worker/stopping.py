"""The worker's bounded stop: SIGTERM to exit within ``KEYROTOR_WORKER_STOP_GRACE_SECONDS`` plus
:data:`STOP_MARGIN_S`, whatever its jobs wait on.

1. **The grace.** The signal cancels every job once (arq's own handling): a job outside a
   protected step stops at once; one inside (:func:`keyrotor.rotation.context.run_to_commit`: a
   batch, a promotion, a completion, each one transaction) finishes that step first. No new job
   is taken. The worker waits up to the grace for the jobs to end.
2. **Past the grace** the protected steps still running are cancelled too (logged as
   ``worker_stop_grace_expired``, then a ``protected_step_cancelled`` line per step, with its
   job, run and step). Such a step may wait without limit (a row lock another transaction
   holds, the KEK call budget, a provider's retries); cancelled, it rolls back, or, if its COMMIT
   had already gone out, may have committed (``outcome: unknown``). Either way its job goes back
   to the queue and resumes from the run's last commit. The worker waits
   :data:`STEP_CANCEL_WAIT_S` for that, then abandons what is left (its transactions end with
   the process's connections).
3. **The shutdown** (``worker.main.shutdown``): the metrics server (its requests in flight get
   ``OPS_SHUTDOWN_TIMEOUT_S``), the KeyManager (usage counts flushed, the audit writer flushed
   or its callers failed, both bounded), the KEK provider, the engine.
4. **The hard limit.** If all that is not over :data:`STOP_MARGIN_S` after the grace (a silent
   database under the audit flush, a blocking call), a watchdog thread logs
   ``worker_stop_overdue`` with the stage it was in and the audit events still unwritten, and
   exits the process at once: what SIGKILL would do a few seconds later, which loses nothing a
   job committed (every step is a transaction, the run's state is in Postgres, the job's lease
   expires within ``KEYROTOR_JOB_LEASE_SECONDS``).

Exit status: 0 when every job ended within the grace; :data:`EXIT_STEPS_CANCELLED` when the
grace ran out and protected steps were cancelled; :data:`EXIT_STOP_OVERDUE` when the hard limit
cut the shutdown short. Non-zero says the stop was forced and its log is worth a look; nothing
is lost either way.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import sys
import threading
import time
from collections.abc import Callable, Mapping

import structlog

log = structlog.get_logger("keyrotor.worker")

# After the grace: how long cancelled protected steps get to roll back.
STEP_CANCEL_WAIT_S = 3.0
# After the grace: the hard limit of everything the stop still does (the step cancellation
# above, the shutdown: metrics server, usage and audit flush, connections).
STOP_MARGIN_S = 10.0
EXIT_STEPS_CANCELLED = 3
EXIT_STOP_OVERDUE = 4


class Stop:
    """One worker's stop: its clock, its stage, its exit status and its watchdog.

    Args:
        grace_s: ``KEYROTOR_WORKER_STOP_GRACE_SECONDS``.
        hard_exit: whether the watchdog may end the process (a real worker process; never an
            in-process worker of the test suite).
        unwritten_audit: how many audit events are queued and not yet written (for the
            watchdog's line).
    """

    def __init__(self, grace_s: float, *, hard_exit: bool, unwritten_audit: Callable[[], int]) -> None:
        self.grace_s = grace_s
        self.hard_exit = hard_exit
        self.unwritten_audit = unwritten_audit
        self.code = 0
        self.stage = "running"
        self.started: float | None = None
        self._forced = asyncio.Event()
        self._watchdog: threading.Timer | None = None

    def begin(self, reason: str, jobs: int) -> bool:
        """Start the clock (and the watchdog) on the first call; a later one ends the grace now.

        Returns whether this call began the stop.
        """
        if self.started is not None:
            if not self._forced.is_set():
                log.warning("worker_stop_hurried", reason=reason, detail="a second signal ends the grace now")
                self._forced.set()
            return False
        self.started = time.monotonic()
        self.stage = "jobs finishing their protected step"
        log.info("worker_stopping", reason=reason, jobs=jobs, grace_s=self.grace_s, margin_s=STOP_MARGIN_S)
        if self.hard_exit:
            self._watchdog = threading.Timer(self.grace_s + STOP_MARGIN_S, self._overdue)
            self._watchdog.daemon = True
            self._watchdog.start()
        return True

    async def drain(
        self, tasks: Mapping[str, asyncio.Task[None]], job_tasks: Mapping[str, asyncio.Task[object]]
    ) -> None:
        """Wait out the grace for ``tasks`` (arq's, one a job), then cancel the steps still running.

        ``job_tasks`` are the job functions' own tasks (arq's ``job_tasks``): cancelling those,
        not arq's wrappers, leaves arq to record each job's outcome (a cancelled job is retried).
        """
        started = self.started if self.started is not None else time.monotonic()
        left = await self._wait(tasks, started + self.grace_s - time.monotonic())
        if not left:
            return
        self.code = EXIT_STEPS_CANCELLED
        self.stage = "cancelled protected steps rolling back"
        log.warning(
            "worker_stop_grace_expired",
            grace_s=self.grace_s,
            jobs=sorted(left),
            detail="cancelling their protected steps: each rolls back (or, if its COMMIT was sent, may "
            "have committed) and its job resumes from the run's last commit",
        )
        for job_id in left:
            task = job_tasks.get(job_id)
            if task is not None:
                task.cancel()
        left = await self._wait({j: tasks[j] for j in left}, STEP_CANCEL_WAIT_S, forced_ends=False)
        if left:
            log.error(
                "worker_stop_jobs_abandoned",
                jobs=sorted(left),
                detail="still running after their cancellation: their transactions end with this process's "
                "connections, and their jobs are taken again once their leases expire",
            )
            for job_id in left:
                tasks[job_id].cancel()

    async def _wait(
        self, tasks: Mapping[str, asyncio.Task[None]], timeout_s: float, *, forced_ends: bool = True
    ) -> set[str]:
        """Wait up to ``timeout_s`` (or a second signal) for ``tasks``; the job ids still running."""
        deadline = time.monotonic() + timeout_s
        forced = asyncio.ensure_future(self._forced.wait())
        try:
            while True:
                left = {job_id for job_id, task in tasks.items() if not task.done()}
                remaining = deadline - time.monotonic()
                if not left or remaining <= 0 or (forced_ends and forced.done()):
                    return left
                waiting = {tasks[j] for j in left} | ({forced} if forced_ends else set())
                await asyncio.wait(waiting, timeout=remaining, return_when=asyncio.FIRST_COMPLETED)
        finally:
            forced.cancel()

    def finish(self) -> None:
        """The stop is over: the watchdog stands down."""
        if self._watchdog is not None:
            self._watchdog.cancel()
            self._watchdog = None

    def _overdue(self) -> None:
        # The watchdog's thread: the event loop may be the thing that is stuck.
        try:
            unwritten = self.unwritten_audit()
        except Exception:  # read from another thread: a number at best, never a reason to stay
            unwritten = -1
        log.error(
            "worker_stop_overdue",
            stage=self.stage,
            after_s=round(self.grace_s + STOP_MARGIN_S, 1),
            audit_events_unwritten=unwritten,
            detail="exiting now, as SIGKILL would: committed work is kept, open steps roll back, and "
            "jobs are taken again once their leases expire",
        )
        for stream in (sys.stdout, sys.stderr):
            with contextlib.suppress(Exception):  # a closed stream: nothing more to say
                stream.flush()
        os._exit(EXIT_STOP_OVERDUE)
