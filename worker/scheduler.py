"""The scheduler process: a clock that opens due runs and enqueues their jobs by name.

::

    keyrotor scheduler              # leader or hot standby, until SIGTERM/SIGINT
    keyrotor scheduler --once       # one scan now (cron-style), then exit
    keyrotor scheduler --dry-run    # what one scan would enqueue; writes nothing

Every ``KEYROTOR_SCAN_INTERVAL_SECONDS`` (APScheduler ``IntervalTrigger``) the leader scans
(:mod:`keyrotor.schedule.scan`): a ``rotate_dek`` run for each scope whose rotation is due, a
``retire_dek`` run for each DEK whose grace period is over. Each run is opened in Postgres, then
its driver job is enqueued with :func:`keyrotor.queue.enqueue.enqueue_driver` -- the same deterministic id
(``<queue>:rotate_dek:<scope>:<run id>``) an on-demand request for that run would use, so a
duplicate enqueue is a no-op in arq and a duplicate run is impossible in Postgres. Every
``KEYROTOR_REPLICA_CHECK_INTERVAL_SECONDS`` (an hour) it enqueues ``check_replicas`` under
``<queue>:check_replicas:<slot start>``: one job per hour, however many schedulers fire.

Leadership: one scheduler scans at a time. It holds a session-level ``pg_try_advisory_lock`` on
a dedicated connection; the others are hot standbys that try the lock every interval. The lock
dies with its connection, so when the leader dies (even SIGKILL) a standby takes over within
one scan interval; a leader that hangs (SIGSTOP, a wedged event loop) loses it after
``KEYROTOR_SCHEDULER_LEADER_TIMEOUT_SECONDS`` without a ping
(:class:`keyrotor.worker.leadership.Leadership`). A leader that stops cleanly (SIGTERM) hands
over: it gives the lock up and notifies the standbys, and one of them takes the lead at once.
The leader also writes its instance id to the Redis key ``KEYROTOR_SCHEDULER_LEADER_KEY`` with
an expiry (for health checks); stopping cleanly, it marks its id there as stepping down, for
one scan interval or until the new leader writes its own. The lock is an economy, not the
safety: two schedulers scanning at once (a split brain, ``--once`` next to a leader) still open
and enqueue every run exactly once.

After downtime the first scan catches up: everything that came due meanwhile is due now, and is
opened once. The scheduler never touches a key, a ciphertext or a secret row.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import os
import signal
import socket
import time
import uuid
from collections.abc import Awaitable
from datetime import UTC, datetime, timedelta
from types import TracebackType
from typing import Any, Self, TypeVar, cast

import structlog
from apscheduler.schedulers.asyncio import AsyncIOScheduler
from apscheduler.triggers.interval import IntervalTrigger
from arq.connections import ArqRedis
from redis.exceptions import RedisError
from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession, async_sessionmaker

from keyrotor import metrics
from keyrotor.audit import lockdown
from keyrotor.census.columns import load_targets
from keyrotor.errors import ConfigurationError, KeyrotorError, QueueUnavailable
from keyrotor.queue.enqueue import connect_queue, enqueue_driver, job_id
from keyrotor.runs import RunInfo
from keyrotor.schedule import scan as schedule
from keyrotor.schedule.plan import ScanPlan, plan_scan
from keyrotor.schedule.scan import ScanConfig, ScanReport
from keyrotor.settings import Settings
from keyrotor.store import db
from keyrotor.store import schedule as store
from keyrotor.store.runs import last_retire_errors
from keyrotor.worker import http as ops
from keyrotor.worker.leadership import STEPPING_DOWN, Leadership

log = structlog.get_logger("keyrotor.scheduler")
T = TypeVar("T")

REPLICA_JOB = "check_replicas"
# The leader key, if it still names this leader: marked as stepping down, with a short expiry.
_STEP_DOWN_IF_OURS = (
    "if redis.call('get', KEYS[1]) == ARGV[1] then "
    "return redis.call('set', KEYS[1], ARGV[2], 'PX', ARGV[3]) end return 0"
)
# Enqueues in flight at once while a scan hands its runs to Redis.
ENQUEUE_CONCURRENCY = 32


def scan_config(settings: Settings) -> ScanConfig:
    """The scan knobs from the settings."""
    return ScanConfig(
        batch=settings.scan_batch_size,
        backoff_s=settings.schedule_backoff_s,
        backoff_max_s=settings.schedule_backoff_max_s,
        default_max_encryptions=settings.max_encryptions_per_dek,
    )


def replica_slot(now: datetime, interval_s: float) -> datetime:
    """The start of the replica-check slot ``now`` falls in (the hour, by default)."""
    step = max(1, int(interval_s))
    epoch = int(now.timestamp())
    return datetime.fromtimestamp(epoch - epoch % step, UTC)


def replica_job_id(settings: Settings, now: datetime) -> str:
    """``<queue>:check_replicas:<slot start, UTC>``: one id per slot, whoever enqueues it."""
    slot = replica_slot(now, settings.replica_check_interval_s)
    return job_id(settings, REPLICA_JOB, slot.strftime("%Y%m%dT%H%M%SZ"))


# New scopes followed to the regions one job each, up to this many a scan; more: one full pass.
FOLLOW_MAX_SCOPES = 100


class Scheduler:
    """Scans policies and enqueues due jobs; see the module docstring.

    Args:
        settings: ``DATABASE_URL``, ``REDIS_URL``, ``KEYROTOR_QUEUE_NAME`` and the scheduler knobs.
        instance_id: this process's name in the leader key (default: host, pid, random suffix).
        redis, engine: clients to use (not closed by the scheduler).
    """

    def __init__(
        self,
        settings: Settings,
        *,
        instance_id: str | None = None,
        redis: ArqRedis | None = None,
        engine: AsyncEngine | None = None,
    ) -> None:
        self.settings = settings
        self.instance_id = instance_id or f"{socket.gethostname()}:{os.getpid()}:{uuid.uuid4().hex[:6]}"
        self.cfg = scan_config(settings)
        self._redis = redis
        self._engine = engine
        self._owned = contextlib.AsyncExitStack()  # closes the clients this scheduler opened
        self._sessions: async_sessionmaker[AsyncSession] | None = None
        self.leadership = Leadership(
            settings.database_url, timeout_s=settings.scheduler_leader_timeout_s, on_free=self._wake
        )
        self._lock = asyncio.Lock()
        self._running = False  # run() is scanning on its clock: a handover notice may wake it
        self._woken: asyncio.Task[None] | None = None
        self._rows_counted_at = -math.inf
        self._dek_watermark: int | None = None  # the newest DEK id already followed to the regions

    async def open(self) -> None:
        """Connect to Redis and Postgres."""
        if self._redis is None:
            self._redis = await connect_queue(self.settings)
            self._owned.push_async_callback(self._redis.aclose, close_connection_pool=True)
        if self._engine is None:
            self._engine = db.create_engine(self.settings.database_url, pool_size=2, max_overflow=2)
            self._owned.push_async_callback(self._engine.dispose)
        self._sessions = db.sessionmaker(self._engine)
        if await lockdown.still_open(self._sessions):
            log.warning("open_default_grant", detail=lockdown.OPEN_GRANT_WARNING)

    async def close(self) -> None:
        """Step down (mark the leader key, if it is ours, as stepping down; release the lock and
        wake the standbys) and disconnect."""
        if self.leadership.leading and self._redis is not None:
            # Before the lock goes: the new leader's heartbeat must come after this, never before.
            with contextlib.suppress(RedisError, OSError):
                await cast(
                    Awaitable[Any],
                    self._redis.eval(
                        _STEP_DOWN_IF_OURS,
                        1,
                        self.settings.scheduler_leader_key,
                        self.instance_id,
                        self.instance_id + STEPPING_DOWN,
                        str(max(5_000, math.ceil(1_000 * self.settings.scan_interval_s))),
                    ),
                )
        await self.leadership.release()
        self._redis, self._engine = None, None
        await self._owned.aclose()

    async def __aenter__(self) -> Self:
        await self.open()
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.close()

    @property
    def redis(self) -> ArqRedis:
        return _opened(self._redis)

    @property
    def sessions(self) -> async_sessionmaker[AsyncSession]:
        return _opened(self._sessions)

    # --- one scan -------------------------------------------------------------------------

    async def scan(self, now: datetime | None = None) -> ScanReport:
        """Open a run for everything due at ``now`` and enqueue its job. Safe to run
        concurrently with itself, other schedulers and on-demand requests.

        Raises:
            StoreUnavailable, QueueUnavailable: an outage (what was opened stays open; the
                workers adopt runs whose job never reached the queue).
        """
        now = now or datetime.now(UTC)
        started = time.perf_counter()
        report = ScanReport(now)
        async for batch in schedule.open_due_rotations(self.sessions, now, self.cfg):
            report.add(batch, "dek")
            report.enqueued += await self._enqueue(batch.opened)
        waiting: list[schedule.DueRetirement] = []
        async for batch in schedule.open_due_retirements(self.sessions, now, self.cfg):
            report.add(batch, "retire")
            report.enqueued += await self._enqueue(batch.opened)
            waiting += [
                d for d in batch.skipped if isinstance(d, schedule.DueRetirement) and d.skip == "backoff"
            ]
        async for batch in schedule.open_due_destructions(self.sessions, now, self.cfg):
            report.add(batch, "destroy")
            report.enqueued += await self._enqueue(batch.opened)
        await self._log_refusals(waiting)
        report.duration_s = time.perf_counter() - started
        if report.rotations or report.retirements or report.destructions or report.skipped:
            log.info(
                "scan_done",
                rotations=len(report.rotations),
                retirements=len(report.retirements),
                destructions=len(report.destructions),
                skipped=report.skipped,
                duration_s=round(report.duration_s, 3),
            )
        return report

    async def _log_refusals(self, waiting: list[schedule.DueRetirement]) -> None:
        """Say why each retirement backing off failed (a refusal waits for an operator)."""
        if not waiting:
            return
        async with db.transaction(self.sessions) as session:
            errors = await last_retire_errors(session, [d.scope_id for d in waiting])
        for d in waiting:
            log.warning(
                "retirement_backing_off",
                scope=d.scope,
                version=d.version,
                failures=d.failures,
                retry_at=d.retry_at.isoformat() if d.retry_at else None,
                error=errors.get(d.scope_id),
            )

    async def _enqueue(self, opened: list[RunInfo]) -> list[str]:
        if not opened:
            return []
        gate = asyncio.Semaphore(ENQUEUE_CONCURRENCY)
        # A job that has finished while its run is still open (fanned out) is left to the
        # workers' adoption rather than re-driven by every scan.
        redrive_after = timedelta(seconds=max(60.0, 4 * self.settings.job_lease_s))

        async def one(run: RunInfo) -> str:
            async with gate:
                job = await enqueue_driver(self.redis, self.settings, run, redrive_after=redrive_after)
            log.info(
                "run_enqueued",
                kind=run.kind,
                scope=run.scope,
                run_id=run.id,
                job_id=job.job_id,
                version=run.detail.get("due_version", run.from_version),
            )
            return job.job_id

        return list(await asyncio.gather(*(one(r) for r in opened)))

    async def plan(self, now: datetime | None = None) -> ScanPlan:
        """What :meth:`scan` would do at ``now``; writes nothing."""
        when, managed = now or datetime.now(UTC), await load_targets(self.sessions)
        rate = self.settings.estimate_rows_per_second
        return await plan_scan(self.sessions, when, self.cfg, rows_per_second=rate, managed=managed)

    async def enqueue_replica_check(self, now: datetime | None = None) -> str | None:
        """Enqueue ``check_replicas`` for the slot of ``now``. Returns its id if this call queued it.

        Raises:
            QueueUnavailable: Redis cannot be reached.
        """
        jid = replica_job_id(self.settings, now or datetime.now(UTC))
        try:
            job = await self.redis.enqueue_job(REPLICA_JOB, _job_id=jid, _queue_name=self.settings.queue_name)
        except (RedisError, OSError) as exc:
            raise QueueUnavailable(f"cannot enqueue on Redis: {type(exc).__name__}") from exc
        if job is not None:
            log.info("replica_check_enqueued", job_id=jid)
        return jid if job is not None else None

    # --- the long-running process -----------------------------------------------------------

    async def heartbeat(self) -> None:
        """Write this leader's id to the leader key, expiring after three scan intervals."""
        ttl_ms = max(5_000, math.ceil(3_000 * self.settings.scan_interval_s))
        try:
            await self.redis.set(self.settings.scheduler_leader_key, self.instance_id, px=ttl_ms)
        except (RedisError, OSError) as exc:
            log.warning("scheduler_heartbeat_failed", error=f"{type(exc).__name__}: {exc}")

    async def tick(self, now: datetime | None = None) -> ScanReport | None:
        """One scan if this process leads (taking the lead if it is free); None as a standby."""
        async with self._lock:
            was_leading = self.leadership.leading
            if not await self.leadership.ensure():
                return None
            await self.heartbeat()
            if not was_leading:
                log.info("scheduler_became_leader", instance=self.instance_id)
                # The hour's replica check may have died with the previous leader.
                await self.enqueue_replica_check(now)
                self._dek_watermark = None  # that check covers what came before this lead
            report = await self.scan(now)
            await self.follow_new_deks()
            return report

    async def follow_new_deks(self) -> list[str]:
        """Enqueue ``replicate_keys`` for the scopes whose DEKs appeared since the last scan.

        An application creates a scope's first DEK itself and copies it to the regions if it can;
        under least-privilege roles (or when a region was down) it cannot, and the copy would wait
        for the hourly check. This bounds that wait to one scan interval: one job a new scope
        (``<queue>:replicate_keys:new_dek:<scope>:<dek id>``, so concurrent leaders queue it once),
        or a single full pass when more than :data:`FOLLOW_MAX_SCOPES` appeared. A DEK committed
        after a newer one was seen is left to the hourly check. A no-op without regions; never
        fails the scan. Returns the ids of the jobs this call queued.
        """
        if not self.settings.regions:
            return []
        try:
            calls = await self._new_dek_calls()
            queued = []
            for scope, dek_id in calls:
                jid = job_id(self.settings, "replicate_keys", "new_dek", scope or "-", dek_id)
                job = await self.redis.enqueue_job(
                    "replicate_keys",
                    scope,
                    reason="new_dek",
                    _job_id=jid,
                    _queue_name=self.settings.queue_name,
                )
                if job is not None:
                    queued.append(jid)
            if calls:
                self._dek_watermark = max(dek_id for _, dek_id in calls)
        except (KeyrotorError, RedisError, OSError) as exc:  # the next scan tries again
            log.warning("follow_new_deks_failed", error=type(exc).__name__)
            return []
        if queued:
            log.info("new_deks_followed", jobs=len(queued))
        return queued

    async def _new_dek_calls(self) -> list[tuple[str | None, int]]:
        """``(scope, newest DEK id)`` a new scope since the watermark; ``(None, newest id)`` for a
        full pass when too many appeared. The first call of a lead only sets the watermark."""
        async with db.transaction(self.sessions) as session:
            if self._dek_watermark is None:
                self._dek_watermark = await store.newest_dek_id(session)
                return []
            rows = await store.deks_after(session, self._dek_watermark, limit=FOLLOW_MAX_SCOPES + 1)
            if len(rows) > FOLLOW_MAX_SCOPES:
                return [(None, await store.newest_dek_id(session))]
        last: dict[str, int] = {}
        for dek_id, scope in rows:
            last[scope] = dek_id
        return list(last.items())

    def _wake(self) -> None:
        """A leader handed over: try the lock now rather than at the next scan (see Leadership)."""
        if self._running and (self._woken is None or self._woken.done()):
            self._woken = asyncio.get_running_loop().create_task(self._tick_job(), name="scheduler-wake")

    async def _tick_job(self) -> None:
        try:
            if await self.tick() is not None:
                await self.refresh_metrics()
        except KeyrotorError as exc:  # an outage: the next tick tries again
            log.warning("scan_failed", error=f"{type(exc).__name__}: {exc}")
        except Exception as exc:
            log.exception("scan_crashed", error=type(exc).__name__)

    async def refresh_metrics(self) -> None:
        """Recount rows per DEK version for ``keyrotor_rows_per_dek_version`` and the census's
        ``keyrotor_unregistered_locations`` (leader only), at most every
        ``KEYROTOR_ROWS_METRIC_INTERVAL_SECONDS``: the count reads the whole index."""
        now = time.monotonic()
        if now - self._rows_counted_at < self.settings.rows_metric_interval_s:
            return
        self._rows_counted_at = now
        try:
            await metrics.refresh_rows_per_version(
                self.sessions, max_scopes=self.settings.rows_metric_max_scopes
            )
        except Exception as exc:  # metrics never stop the scan
            log.warning("rows_per_version_failed", error=type(exc).__name__)
        try:
            await metrics.refresh_unregistered_locations(self.sessions)
        except Exception as exc:
            log.warning("unregistered_locations_failed", error=type(exc).__name__)

    def ops_server(self) -> ops.OpsServer:
        """/metrics, /healthz and /readyz of this scheduler (ready as leader or standby)."""
        engine = self._engine

        async def postgres() -> None:
            assert engine is not None
            await store.ping_engine(engine)

        async def redis_ping() -> None:
            await self.redis.ping()

        metrics.configure_scope_labels(self.settings.metrics_scope_labels)
        return ops.OpsServer(
            role="scheduler",
            host=self.settings.metrics_host,
            port=self.settings.metrics_port,
            checks={"postgres": postgres, "redis": redis_ping},
            info=lambda: {
                "leader": self.leadership.leading,
                "scheduler_role": "leader" if self.leadership.leading else "standby",
                "instance": self.instance_id,
            },
            before_scrape=ops.queue_depth_refresher(self.redis, self.settings.queue_name),
        )

    async def _replica_job(self) -> None:
        if not self.leadership.leading:
            return
        try:
            await self.enqueue_replica_check()
        except KeyrotorError as exc:
            log.warning("replica_check_enqueue_failed", error=f"{type(exc).__name__}: {exc}")

    async def run(self, stop: asyncio.Event | None = None) -> None:
        """Scan every interval until ``stop`` is set (or SIGTERM/SIGINT, when ``stop`` is None)."""
        loop = asyncio.get_running_loop()
        if stop is None:
            stop = asyncio.Event()
            for sig in (signal.SIGTERM, signal.SIGINT):
                loop.add_signal_handler(sig, stop.set)
        interval = self.settings.scan_interval_s
        aps = AsyncIOScheduler(timezone=UTC)
        now = datetime.now(UTC)
        aps.add_job(
            self._tick_job,
            IntervalTrigger(seconds=interval, timezone=UTC),
            id="scan",
            next_run_time=now,  # at once: catch up on what came due while nobody scanned
            max_instances=1,  # a scan longer than the interval delays the next; never overlaps it
            coalesce=True,  # missed runs (a busy loop, a suspended host) become one
            misfire_grace_time=max(1, math.ceil(interval)),
        )
        aps.add_job(
            self._replica_job,
            IntervalTrigger(seconds=self.settings.replica_check_interval_s, timezone=UTC),
            id="check_replicas",
            next_run_time=now + timedelta(seconds=min(5.0, interval)),
            max_instances=1,
            coalesce=True,
            misfire_grace_time=max(1, math.ceil(self.settings.replica_check_interval_s / 2)),
        )
        log.info(
            "scheduler_started",
            instance=self.instance_id,
            queue=self.settings.queue_name,
            scan_interval_s=interval,
            replica_check_interval_s=self.settings.replica_check_interval_s,
        )
        server = self.ops_server() if self.settings.metrics_port else None
        if server is not None:
            await server.start()
        aps.start()
        self._running = True
        try:
            await stop.wait()
        finally:
            self._running = False
            aps.shutdown(wait=False)
            if server is not None:
                await server.stop()
            # Let a scan in progress finish its batch and enqueues (each batch commits alone).
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(30):
                    if self._woken is not None:
                        await asyncio.wait([self._woken])
                    await self._lock.acquire()
                    self._lock.release()
            log.info("scheduler_stopped", instance=self.instance_id, was_leader=self.leadership.leading)


def _opened(client: T | None) -> T:
    if client is None:
        raise ConfigurationError("Scheduler is not open: use `async with Scheduler(...)`")
    return client
