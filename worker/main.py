"""The arq worker: settings, start-up and shutdown, job leases and run adoption.

Run it either way::

    keyrotor worker [--burst]
    arq keyrotor.worker.main.WorkerSettings

``Settings.from_env()`` runs once here; its values reach the jobs through ``ctx``
(``ctx["deps"]``, and ``engine``, ``sessionmaker``, ``kek``, ``km``, ``settings``, ``rc``).

Start-up refuses to run a worker that would do harm: the schema must be migrated, and the KEK
must unwrap the stored DEKs (a worker with the wrong ``ENCRYPTION_KEY`` says so and exits).

Crash safety:

- **SIGTERM**: a bounded stop (:mod:`keyrotor.worker.stopping`): arq cancels running jobs;
  each finishes the protected step in hand (:func:`keyrotor.rotation.context.run_to_commit`)
  within ``KEYROTOR_WORKER_STOP_GRACE_SECONDS``, after which the step is cancelled and rolls
  back; the job goes back to the queue to resume. The process is gone within the grace plus
  ``STOP_MARGIN_S``; exit 0, or 3 when steps had to be cancelled (4: the hard limit cut the
  shutdown short).
- **SIGKILL**: nothing is lost -- every batch is a transaction and the run state is in
  Postgres. arq marks a running job with an "in progress" key that expires only after the job
  timeout; here each worker holds it as a short lease (``KEYROTOR_JOB_LEASE_SECONDS``) and
  renews it while the job runs, so a killed worker's job is picked up by another worker (or its
  restart) within seconds.
- **Redis not answering**: every Redis command is bounded (``connect_queue``); a worker whose
  connection went silent exits non-zero (:meth:`LeasedWorker.main`) for its supervisor to restart.
- **Redis losing jobs**: at start-up and every minute a worker re-enqueues the driver job of
  every open run (deterministic ids make this a no-op when the job exists).
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import inspect
import signal
from collections.abc import Awaitable, Callable
from datetime import timedelta
from typing import Any

import structlog
from arq.connections import RedisSettings
from arq.constants import in_progress_key_prefix
from arq.worker import Function, Retry, Worker, func
from redis.exceptions import RedisError

from keyrotor import metrics, runs
from keyrotor.errors import KeyrotorError, QueueUnavailable
from keyrotor.jobs.common import Deps
from keyrotor.jobs.destroy_dek import destroy_dek
from keyrotor.jobs.migrate_kek import migrate_kek
from keyrotor.jobs.migrate_legacy import migrate_legacy
from keyrotor.jobs.migrate_legacy_range import migrate_legacy_range
from keyrotor.jobs.reencrypt import reencrypt_range
from keyrotor.jobs.replicas import check_replicas, replicate_keys
from keyrotor.jobs.retire_dek import retire_dek
from keyrotor.jobs.rotate_dek import rotate_dek
from keyrotor.jobs.rotate_kek import rotate_kek
from keyrotor.kek.base import KekProvider
from keyrotor.kek.budget import SharedRateBudget, kek_budget_key
from keyrotor.kek.factory import open_provider
from keyrotor.keys import KeyManager
from keyrotor.notify import Notifier
from keyrotor.queue.enqueue import connect_queue, enqueue_driver
from keyrotor.queue.serialization import ARQ_SERIALIZERS
from keyrotor.rotation.context import RotationContext
from keyrotor.settings import Settings
from keyrotor.store import db
from keyrotor.store.ops import ping
from keyrotor.worker import http as ops
from keyrotor.worker.logs import configure_logging
from keyrotor.worker.stopping import Stop

log = structlog.get_logger("keyrotor.worker")

ADOPT_EVERY_S = 60.0
# A stopping worker's last Redis command (its health key): not worth the 10 s a command may take.
STOP_REDIS_TIMEOUT_S = 2.0
HEALTH_CHECK_INTERVAL_S = 30


def functions(settings: Settings) -> list[Function]:
    """The jobs this worker runs, with their limits."""
    timeout, tries = settings.job_timeout_s, settings.job_max_tries
    return [
        func(_counted(rotate_dek), name="rotate_dek", timeout=timeout, max_tries=tries),
        # Nobody awaits a range's result; not keeping it frees its id at once.
        func(
            _counted(reencrypt_range), name="reencrypt_range", timeout=timeout, max_tries=tries, keep_result=0
        ),
        func(_counted(retire_dek), name="retire_dek", timeout=timeout, max_tries=tries),
        func(_counted(destroy_dek), name="destroy_dek", timeout=timeout, max_tries=tries),
        func(_counted(rotate_kek), name="rotate_kek", timeout=timeout, max_tries=tries),
        func(_counted(migrate_kek), name="migrate_kek", timeout=timeout, max_tries=tries),
        func(_counted(migrate_legacy), name="migrate_legacy", timeout=timeout, max_tries=tries),
        func(
            _counted(migrate_legacy_range),
            name="migrate_legacy_range",
            timeout=timeout,
            max_tries=tries,
            keep_result=0,
        ),
        func(_counted(check_replicas), name="check_replicas", timeout=timeout, max_tries=tries),
        # Each key change gets its own id; not keeping results frees them at once.
        func(
            _counted(replicate_keys), name="replicate_keys", timeout=timeout, max_tries=tries, keep_result=0
        ),
    ]


def _counted(fn: Callable[..., Awaitable[Any]]) -> Any:
    """``fn`` counting its outcomes in ``keyrotor_arq_jobs_total``, its log events carrying the
    function name and, for a job of a run (a ``run_id`` argument), its requesters' ids."""
    name = fn.__name__
    signature = inspect.signature(fn)

    @functools.wraps(fn)
    async def wrapper(ctx: dict[str, Any], *args: Any, **kwargs: Any) -> Any:
        structlog.contextvars.bind_contextvars(job=name)
        try:
            await _bind_requesters(ctx, signature, args, kwargs)
            result = await fn(ctx, *args, **kwargs)
        except Retry:
            ops.count_job(name, "retry")
            raise
        except asyncio.CancelledError:
            ops.count_job(name, "cancelled")
            raise
        except BaseException:
            ops.count_job(name, "failed")
            raise
        ops.count_job(name, "success")
        return result

    return wrapper


async def _bind_requesters(
    ctx: dict[str, Any], signature: inspect.Signature, args: tuple[Any, ...], kwargs: dict[str, Any]
) -> None:
    """Bind ``request_id`` (and ``request_ids``) of the job's run, read from the run row.

    Read here, once a job, rather than carried in the job's arguments: the run row holds the
    ids of the enqueuers who joined after the job was queued, job payloads (and ids) stay as
    they are, and every job of every kind of run gets them in one place.
    """
    try:
        run_id = signature.bind_partial(ctx, *args, **kwargs).arguments.get("run_id")
    except TypeError:
        return  # arguments the job will refuse itself
    if not isinstance(run_id, int) or isinstance(run_id, bool):
        return
    d: Deps | None = ctx.get("deps")
    if d is None:
        return
    try:
        async with db.transaction(d.sessions) as session:
            ids = await runs.request_ids_of(session, run_id)
    except Exception as exc:  # an outage: the job meets it too, and retries
        log.debug("request_ids_unavailable", run_id=run_id, error=type(exc).__name__)
        return
    structlog.contextvars.bind_contextvars(**runs.request_context(ids))


# Set in the worker's ctx by LeasedWorker: start-up tells a keyrotor worker from arq's CLI one.
LEASED_MARKERS = "_leased_markers"
# The worker's Stop, in its ctx: the shutdown names its stages for the stop's watchdog.
STOP = "_stop"


class LeasedWorker(Worker):
    """arq's worker, a started job's "in progress" marker living one lease from the start.

    arq sets the marker to the job timeout plus 10 s (half an hour by default) when it takes a
    job, and :func:`job_start` only then shortens it to a renewed lease. A worker killed in
    between (SIGKILL, OOM) left that job blocked for the whole timeout, and its run stalled
    with it. Started as a lease, the marker of a killed worker's job expires within
    ``KEYROTOR_JOB_LEASE_SECONDS`` wherever the kill lands.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        settings: Settings = self.ctx["settings"]
        self.in_progress_timeout_s = settings.job_lease_s
        self.ctx[LEASED_MARKERS] = True
        # Only a worker that owns its process (it handles the signals) may end it at the hard limit.
        self.stop = Stop(
            settings.worker_stop_grace_s,
            hard_exit=self._handle_signals,
            unwritten_audit=functools.partial(_unwritten_audit, self.ctx),
        )
        self.ctx[STOP] = self.stop

    async def main(self) -> None:
        """arq's main loop, on a pool whose every command is bounded (:func:`connect_queue`).

        arq's own pool has no read timeout: a Redis connection that went silent (a failover, a
        network path gone without a reset) left the worker polling it for ever, taking no job
        while its ``/healthz`` stayed green. Now the poll fails after
        ``REDIS_COMMAND_TIMEOUT_S`` and the worker exits non-zero for its supervisor to
        restart, as it does when Redis is lost.

        Raises:
            QueueUnavailable: Redis cannot be reached or stopped answering.
        """
        try:
            if self._pool is None:
                self._pool = await connect_queue(self.ctx["settings"])
            await super().main()
        except RedisError as exc:
            raise QueueUnavailable(
                f"lost Redis ({type(exc).__name__}): the worker stops for its supervisor to restart it"
            ) from exc

    def handle_sig(self, signum: signal.Signals) -> None:
        """SIGTERM/SIGINT: begin the bounded stop (:class:`Stop`); a second signal ends the grace.

        The first signal does what arq does: no new job is taken and each running job is
        cancelled once, which a protected step finishes before it obeys.
        """
        if self.stop.begin(signal.Signals(signum).name, sum(not t.done() for t in self.tasks.values())):
            super().handle_sig(signum)

    async def close(self) -> None:
        """Stop within the grace plus ``STOP_MARGIN_S``, then run ``on_shutdown`` in any case.

        arq's close waited for the cancelled jobs without a deadline (a protected step can wait
        for ever on a lock or the KEK), and gathered them without ``return_exceptions``: a job
        cancelled while it stored its result raised CancelledError out of ``close()``, so the
        worker exited 1 with a traceback and never ran ``on_shutdown`` (the KeyManager's close,
        the audit flush); so did a Redis gone before its health key could be deleted. Here the
        jobs get the grace (:meth:`Stop.drain`), the health key a short try, and ``on_shutdown``
        always runs.
        """
        try:
            if self.stop.started is None and (
                not self._handle_signals or any(not t.done() for t in self.tasks.values())
            ):
                self.handle_sig(signal.SIGUSR1)  # in-process, or main() ended (Redis lost) under running jobs
            await self.stop.drain(self.tasks, self.job_tasks)
            self.tasks.clear()
            if self._pool is None:
                return
            self.stop.stage = "shutdown: health key"
            try:
                await asyncio.wait_for(self.pool.delete(self.health_check_key), STOP_REDIS_TIMEOUT_S)
            except (RedisError, OSError, TimeoutError) as exc:  # it expires on its own
                log.warning("worker_health_key_not_deleted", error=type(exc).__name__)
            if self.on_shutdown:
                await self.on_shutdown(self.ctx)
            await self.pool.aclose(close_connection_pool=True)
            self._pool = None
        finally:
            self.stop.finish()


def _unwritten_audit(ctx: dict[str, Any]) -> int:
    """Audit events the worker's KeyManager has queued and not written (0 without one)."""
    km: KeyManager | None = ctx.get("km")
    writer = None if km is None else km.calls.writer
    return 0 if writer is None else writer.depth


def warn_unleased_markers(ctx: dict[str, Any]) -> bool:
    """Warn when the worker was not started as a :class:`LeasedWorker` (``arq`` on the command line).

    arq's own CLI builds a plain ``arq.Worker``, and nothing in the settings it reads can change
    the marker it sets when it takes a job; such a worker runs every job correctly, but a job it
    held when killed stays blocked for the job timeout. Returns whether it warned.
    """
    if ctx.get(LEASED_MARKERS):
        return False
    log.warning(
        "worker_unleased_markers",
        detail="started without `keyrotor worker`: a job held by this process when it is killed stays "
        "blocked for the job timeout (KEYROTOR_JOB_TIMEOUT_SECONDS), not one job lease",
    )
    return True


def worker_settings(settings: Settings) -> dict[str, Any]:
    """Keyword arguments for ``arq.Worker`` (also the attributes of :data:`WorkerSettings`)."""
    return {
        "functions": functions(settings),
        "queue_name": settings.queue_name,
        "redis_settings": RedisSettings.from_dsn(settings.redis_url),
        "on_startup": startup,
        "on_shutdown": shutdown,
        "on_job_start": job_start,
        "on_job_end": job_end,
        "max_jobs": settings.worker_max_jobs,
        "job_timeout": settings.job_timeout_s,
        "max_tries": settings.job_max_tries,
        "poll_delay": settings.worker_poll_delay_s,
        "health_check_interval": HEALTH_CHECK_INTERVAL_S,
        "keep_result": 3600,
        **ARQ_SERIALIZERS,
        "ctx": {"settings": settings},
    }


def __getattr__(name: str) -> Any:
    # `arq keyrotor.worker.main.WorkerSettings` reads the environment when arq imports the name, not
    # when this module is imported.
    if name == "WorkerSettings":
        return type("WorkerSettings", (), worker_settings(Settings.from_env()))
    raise AttributeError(name)


async def startup(ctx: dict[str, Any]) -> None:
    """Open the engine, the KEK provider and the KeyManager; refuse a harmful configuration."""
    settings: Settings = ctx.get("settings") or Settings.from_env()
    ctx["settings"] = settings
    if ctx.get("configure_logging", True):  # in-process test workers keep pytest's logging
        configure_logging(settings)
    engine = db.create_engine(settings.database_url, pool_size=settings.worker_max_jobs + 2)
    ctx["engine"] = engine
    await db.require_schema(engine)
    budget = None
    if settings.kek_calls_per_second > 0:  # one budget for every worker of this queue on this Redis
        budget = SharedRateBudget(
            ctx["redis"], kek_budget_key(settings.queue_name), settings.kek_calls_per_second
        )
    kek: KekProvider = await open_provider(settings, budget=budget)
    ctx["kek"] = kek
    km = KeyManager(settings, kek=kek, engine=engine)
    await km.open()
    ctx["km"] = km
    if km.replication is not None:  # /metrics shows the regions' last recorded status at once
        try:
            await km.replication.publish_stored()
        except KeyrotorError as exc:
            log.warning("replica_status_unavailable", error=f"{type(exc).__name__}: {exc}")
    rc = RotationContext(km.sessions, kek, settings, notifier=Notifier(ctx["redis"], settings.notify_channel))
    checked = await rc.check_kek()
    ctx.update(sessionmaker=km.sessions, rc=rc, deps=Deps(settings, engine, km.sessions, kek, km, rc))
    ctx["_running"] = set()
    adopted = await adopt_open_runs(ctx)
    ctx["_background"] = asyncio.get_running_loop().create_task(_background(ctx), name="keyrotor-leases")
    if settings.metrics_port:
        ctx["_ops"] = await start_ops_server(ctx)
    warn_unleased_markers(ctx)
    log.info(
        "worker_started",
        queue=settings.queue_name,
        kek_provider=kek.name,
        deks_checked=checked,
        max_jobs=settings.worker_max_jobs,
        open_runs=adopted,
    )


async def shutdown(ctx: dict[str, Any]) -> None:
    """Close what start-up opened (tolerates a start-up that failed halfway)."""
    stop: Stop | None = ctx.get(STOP)

    def stage(name: str) -> None:
        if stop is not None:  # arq's CLI builds a plain Worker: no stop to report to
            stop.stage = f"shutdown: {name}"

    server: ops.OpsServer | None = ctx.pop("_ops", None)
    if server is not None:
        stage("metrics server")
        await server.stop()
    task = ctx.pop("_background", None)
    if task is not None:
        task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await task
    km: KeyManager | None = ctx.get("km")
    if km is not None:
        stage("KeyManager (usage counts, audit writer)")
        await km.close()  # kept in ctx meanwhile: the watchdog counts its unwritten events
        ctx.pop("km", None)
    kek: KekProvider | None = ctx.pop("kek", None)
    if kek is not None:
        stage("KEK provider")
        await kek.aclose()
    engine = ctx.pop("engine", None)
    if engine is not None:
        stage("database connections")
        await engine.dispose()
    log.info("worker_stopped", exit_code=0 if stop is None else stop.code)


async def start_ops_server(ctx: dict[str, Any]) -> ops.OpsServer:
    """Serve /metrics, /healthz and /readyz for this worker (``KEYROTOR_METRICS_PORT``)."""
    settings: Settings = ctx["settings"]
    engine = ctx["engine"]
    redis = ctx["redis"]

    async def postgres() -> None:
        async with engine.connect() as conn:
            await ping(conn)

    async def redis_ping() -> None:
        await redis.ping()

    metrics.configure_scope_labels(settings.metrics_scope_labels)
    server = ops.OpsServer(
        role="worker",
        host=settings.metrics_host,
        port=settings.metrics_port,
        checks={
            "postgres": postgres,
            "redis": redis_ping,
            "kek": ops.KekCheckCache(ctx["kek"].check, settings.kek_check_ttl_s),
        },
        before_scrape=ops.queue_depth_refresher(redis, settings.queue_name),
    )
    await server.start()
    return server


async def job_start(ctx: dict[str, Any]) -> None:
    """Bind the job's log context and take its lease."""
    structlog.contextvars.clear_contextvars()
    structlog.contextvars.bind_contextvars(job_id=ctx["job_id"], job_try=ctx["job_try"])
    running: set[str] | None = ctx.get("_running")
    if running is not None:
        running.add(ctx["job_id"])
        await _renew(ctx, [ctx["job_id"]])


async def job_end(ctx: dict[str, Any]) -> None:
    """Stop renewing the job's lease (arq deletes the key when it records the outcome)."""
    running: set[str] | None = ctx.get("_running")
    if running is not None:
        running.discard(ctx["job_id"])


async def _renew(ctx: dict[str, Any], job_ids: list[str]) -> None:
    lease_ms = int(ctx["settings"].job_lease_s * 1000)
    async with ctx["redis"].pipeline(transaction=False) as pipe:
        for jid in job_ids:
            pipe.pexpire(in_progress_key_prefix + jid, lease_ms)  # no-op once arq deleted it
        await pipe.execute()


async def _background(ctx: dict[str, Any]) -> None:
    """Renew leases every third of a lease; adopt open runs at start and every minute."""
    settings: Settings = ctx["settings"]
    loop = asyncio.get_running_loop()
    next_adopt = loop.time() + ADOPT_EVERY_S  # start-up adopted already
    while True:
        try:
            running = list(ctx["_running"])
            if running:
                await _renew(ctx, running)
            if loop.time() >= next_adopt:
                next_adopt = loop.time() + ADOPT_EVERY_S
                await adopt_open_runs(ctx)
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # an outage: the next round tries again
            log.warning("worker_background_failed", error=f"{type(exc).__name__}: {exc}")
        await asyncio.sleep(settings.job_lease_s / 3)


async def adopt_open_runs(ctx: dict[str, Any]) -> int:
    """Make sure every open run has a driver job in the queue. Returns how many were enqueued."""
    settings: Settings = ctx["settings"]
    async with db.transaction(ctx["sessionmaker"]) as session:
        open_runs = await runs.list_runs(session, limit=1000, open_only=True)
    adopted = 0
    for run in open_runs:
        try:
            job = await enqueue_driver(
                ctx["redis"],
                settings,
                run,
                redrive_after=timedelta(seconds=max(60.0, 4 * settings.job_lease_s)),
            )
        except KeyrotorError as exc:
            log.warning("adopt_failed", run_id=run.id, error=str(exc))
            continue
        adopted += 1
        log.debug("run_adopted", run_id=run.id, job_id=job.job_id)
    return adopted
