"""Job ids and enqueueing: how a run's driver and a range's job reach the queue.

Job ids are deterministic, so a duplicate enqueue (two clients, a client and the scheduler, a
driver re-run after a crash) is a no-op: ``enqueue_job`` returns None while a job with that id
is queued, running, or has its result kept. They start with the queue name, so deployments
sharing one Redis (different ``KEYROTOR_QUEUE_NAME``) never collide.
"""

from __future__ import annotations

import asyncio
from datetime import UTC, datetime, timedelta
from typing import Any, cast

from arq.connections import ArqRedis
from arq.jobs import Job, JobStatus
from redis.exceptions import RedisError

from keyrotor.errors import QueueUnavailable
from keyrotor.legacy.ranges import LegacyRange
from keyrotor.queue.serialization import deserialize, serialize
from keyrotor.rotation.dek import RangeJob
from keyrotor.runs import RunInfo
from keyrotor.settings import Settings


def job_id(settings: Settings, *parts: object) -> str:
    """``<queue>:<part>:<part>...``"""
    return ":".join([settings.queue_name, *(str(p) for p in parts)])


def driver_call(run: RunInfo) -> tuple[str, tuple[Any, ...], dict[str, Any]]:
    """The job (name, args, kwargs) that drives a run forward."""
    if run.kind == "dek":
        return "rotate_dek", (run.scope,), {"trigger": run.trigger, "run_id": run.id}
    if run.kind == "kek":
        return "rotate_kek", (), {"trigger": run.trigger, "run_id": run.id}
    if run.kind == "kek_migrate":
        return "migrate_kek", (), {"trigger": run.trigger, "run_id": run.id}
    if run.kind == "retire" and run.detail.get("destroy"):
        return "destroy_dek", (run.scope, run.from_version), {"trigger": run.trigger, "run_id": run.id}
    if run.kind == "retire":
        force = bool(run.detail.get("force_now", False))
        return (
            "retire_dek",
            (run.scope, run.from_version),
            {"force_now": force, "trigger": run.trigger, "run_id": run.id},
        )
    if run.kind == "legacy":
        return "migrate_legacy", (run.id,), {}
    raise ValueError(f"no job drives runs of kind {run.kind!r}")


async def enqueue_driver(
    redis: ArqRedis, settings: Settings, run: RunInfo, *, redrive_after: timedelta | None = None
) -> Job:
    """Enqueue the job that drives ``run``, or find the one already queued or running.

    If that job has finished (its result is kept) while the run is still open -- it fanned out
    into ranges, or gave up after its tries -- a new driver is enqueued (under an id of the
    current minute), unless ``redrive_after`` is given and the run made progress more recently.

    Raises:
        QueueUnavailable: Redis cannot be reached.
    """
    name, args, kwargs = driver_call(run)
    jid = job_id(settings, name, run.scope or "-", run.id)
    try:
        job = await redis.enqueue_job(name, *args, _job_id=jid, _queue_name=settings.queue_name, **kwargs)
        if job is not None:
            return job
        existing = Job(jid, redis, _queue_name=settings.queue_name, _deserializer=redis.job_deserializer)
        if await existing.status() != JobStatus.complete or run.terminal:
            return existing
        if redrive_after is not None and datetime.now(UTC) - run.updated_at < redrive_after:
            return existing
        # One re-drive a minute at most: clients asking at once share it.
        again = f"{jid}:r{int(datetime.now(UTC).timestamp() // 60)}"
        job = await redis.enqueue_job(name, *args, _job_id=again, _queue_name=settings.queue_name, **kwargs)
        return job or Job(again, redis, _queue_name=settings.queue_name, _deserializer=redis.job_deserializer)
    except (RedisError, OSError) as exc:
        raise QueueUnavailable(f"cannot enqueue on Redis: {type(exc).__name__}") from exc


async def enqueue_range(
    redis: ArqRedis,
    settings: Settings,
    r: RangeJob | LegacyRange,
    *,
    function: str = "reencrypt_range",
    tag: str = "reencrypt",
) -> bool:
    """Enqueue the job of one id range of a fanned-out run (a no-op if it is queued or running).

    ``function`` is the range job (``reencrypt_range`` or ``migrate_legacy_range``); ``tag``
    names its job ids.
    """
    job = await redis.enqueue_job(
        function,
        r.run_id,
        r.lo,
        r.hi,
        target=r.target,
        _job_id=job_id(settings, tag, r.run_id, r.target, r.lo),
        _queue_name=settings.queue_name,
    )
    return job is not None


# A command on the queue's Redis that gets no answer for this long fails (QueueUnavailable) and
# its connection is dropped, so the next command opens a new one. Without it, a connection that
# went silent (a Redis failover, a network path gone without a FIN or an RST) kept a command
# waiting for ever: the scheduler's scan never ended, and with it every later scan.
REDIS_COMMAND_TIMEOUT_S = 10.0
REDIS_CONNECT_TIMEOUT_S = 2.0
# Tries to reach Redis when connecting, a second apart (as arq's create_pool did).
CONNECT_TRIES = 5


async def connect_queue(settings: Settings) -> ArqRedis:
    """An arq pool on ``REDIS_URL`` for ``KEYROTOR_QUEUE_NAME``, with keyrotor's JSON serializer
    and a bound on every command (:data:`REDIS_COMMAND_TIMEOUT_S`).

    Raises:
        QueueUnavailable: Redis cannot be reached.
    """
    tries = 0
    while True:
        pool = cast(
            ArqRedis,
            ArqRedis.from_url(
                settings.redis_url,
                socket_connect_timeout=REDIS_CONNECT_TIMEOUT_S,
                socket_timeout=REDIS_COMMAND_TIMEOUT_S,
                socket_keepalive=True,
            ),
        )
        pool.job_serializer, pool.job_deserializer = serialize, deserialize
        pool.default_queue_name = settings.queue_name
        try:
            await pool.ping()
            return pool
        except (RedisError, OSError) as exc:
            await pool.aclose(close_connection_pool=True)
            tries += 1
            if tries >= CONNECT_TRIES:
                # The variable, never the URL: it may carry a password.
                raise QueueUnavailable(
                    f"cannot connect to Redis ({type(exc).__name__}): "
                    "check that Redis is running and REDIS_URL points at it"
                ) from exc
        await asyncio.sleep(1.0)
