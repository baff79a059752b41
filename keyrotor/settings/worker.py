"""The worker process (``keyrotor worker``): its jobs' limits and budgets, re-encryption and
legacy migration sizes, and the operations server and logging it shares with the scheduler.

Not to be confused with ``keyrotor.worker.main.WorkerSettings``, the class arq reads.
"""

from __future__ import annotations

from typing import Literal, Self

from pydantic import Field, field_validator, model_validator

from keyrotor.settings.base import SettingsPart, check_backoff_cap

# KEYROTOR_LOG_LEVEL's values (any case).
LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL")


class WorkerSettings(SettingsPart):
    """How the rotation worker runs its jobs, and how its process reports (metrics, logs)."""

    # Below this many rows a scope rotates in one transaction; above, it fans out into id ranges.
    small_scope_rows: int = Field(default=1_000, ge=0, validation_alias="KEYROTOR_SMALL_SCOPE_ROWS")
    reencrypt_batch_rows: int = Field(
        default=2_000, ge=1, le=50_000, validation_alias="KEYROTOR_REENCRYPT_BATCH_ROWS"
    )
    reencrypt_range_rows: int = Field(default=10_000, ge=1, validation_alias="KEYROTOR_REENCRYPT_RANGE_ROWS")
    # Budgets; 0 means unlimited, fractions are fine (0.5: one every 2 s), NaN/inf are refused.
    # The row budget is per worker process (it caps one worker's load on the database); the KEK
    # call budget is one for all the workers of a queue on a Redis (keyrotor/kek/budget.py), because
    # a KMS quota is the account's.
    reencrypt_rows_per_second: float = Field(
        default=0,
        ge=0,
        le=1_000_000,
        allow_inf_nan=False,
        validation_alias="KEYROTOR_REENCRYPT_ROWS_PER_SECOND",
    )
    kek_calls_per_second: float = Field(
        default=0, ge=0, le=1_000_000, allow_inf_nan=False, validation_alias="KEYROTOR_KEK_CALLS_PER_SECOND"
    )
    kek_rewrap_batch: int = Field(default=100, ge=1, le=1_000, validation_alias="KEYROTOR_KEK_REWRAP_BATCH")
    worker_max_jobs: int = Field(default=4, ge=1, le=100, validation_alias="KEYROTOR_WORKER_MAX_JOBS")
    # arq waits this long between looks at the queue, also when a job has just finished: a
    # fanned-out rotation's next wave of range jobs waited up to 0.5 s a wave at arq's default.
    # A look is one Redis command (plus a few per queued job it tries to start): 20 a second
    # per idle worker is a rounding error for Redis.
    worker_poll_delay_s: float = Field(
        default=0.05, gt=0, le=60, validation_alias="KEYROTOR_WORKER_POLL_DELAY_SECONDS"
    )
    job_timeout_s: float = Field(default=1_800, gt=0, validation_alias="KEYROTOR_JOB_TIMEOUT_SECONDS")
    job_max_tries: int = Field(default=20, ge=1, validation_alias="KEYROTOR_JOB_MAX_TRIES")
    # A running job's arq "in progress" key lives this long unless its worker renews it, so the
    # job of a killed worker is picked up again after at most this long.
    job_lease_s: float = Field(default=15, ge=1, validation_alias="KEYROTOR_JOB_LEASE_SECONDS")
    # After SIGTERM, how long running jobs have to finish the protected step in hand (a batch,
    # a commit) before it is cancelled and rolls back (keyrotor.worker.main.LeasedWorker). The
    # whole stop takes at most this plus STOP_MARGIN_S (10 s): keep the sum under the
    # supervisor's kill timeout (Kubernetes' terminationGracePeriodSeconds, 30 s by default).
    worker_stop_grace_s: float = Field(
        default=10.0, ge=0, le=600, allow_inf_nan=False, validation_alias="KEYROTOR_WORKER_STOP_GRACE_SECONDS"
    )
    retry_backoff_s: float = Field(default=1.0, gt=0, validation_alias="KEYROTOR_RETRY_BACKOFF_SECONDS")
    retry_backoff_max_s: float = Field(
        default=60.0, gt=0, validation_alias="KEYROTOR_RETRY_BACKOFF_MAX_SECONDS"
    )
    # legacy migration (keyrotor legacy migrate): rows a batch (one transaction, one round of the
    # scrypt pool: ~50 ms a value, so 64 rows take ~1.6 s on 2 cores) and pool processes (0: a core each).
    legacy_batch_rows: int = Field(default=64, ge=1, le=10_000, validation_alias="KEYROTOR_LEGACY_BATCH_ROWS")
    legacy_workers: int = Field(default=0, ge=0, le=256, validation_alias="KEYROTOR_LEGACY_WORKERS")
    # A migration of at least twice this many legacy values is split into id ranges of about
    # this many, one migrate_legacy_range job each, so every worker's pool takes part (0: never).
    legacy_range_rows: int = Field(
        default=2_000, ge=0, le=10_000_000, validation_alias="KEYROTOR_LEGACY_RANGE_ROWS"
    )
    # Test only: sleep between re-encryption batches, to open a window for crash tests.
    test_batch_delay_s: float = Field(default=0, ge=0, le=60, validation_alias="KEYROTOR_TEST_BATCH_DELAY_S")

    # /metrics, /healthz, /readyz of the worker and the scheduler (worker/http.py); port 0: off.
    metrics_port: int = Field(default=9108, ge=0, le=65_535, validation_alias="KEYROTOR_METRICS_PORT")
    # Loopback by default: /metrics has no authentication and its labels name scopes (tenants).
    # Deployments that scrape from another host or probe over the pod network bind 0.0.0.0.
    metrics_host: str = Field(default="127.0.0.1", validation_alias="KEYROTOR_METRICS_HOST")
    metrics_scope_labels: Literal["plain", "hashed", "off"] = Field(
        default="plain", validation_alias="KEYROTOR_METRICS_SCOPE_LABELS"
    )
    # How long /readyz trusts its last KEK provider check.
    kek_check_ttl_s: float = Field(
        default=30.0, gt=0, le=30.0, validation_alias="KEYROTOR_KEK_CHECK_TTL_SECONDS"
    )

    # logging of keyrotor's processes (keyrotor.worker.logs)
    log_level: str = Field(default="INFO", validation_alias="KEYROTOR_LOG_LEVEL")
    log_format: Literal["auto", "json", "console"] = Field(
        default="auto", validation_alias="KEYROTOR_LOG_FORMAT"
    )

    @model_validator(mode="after")
    def _retry_backoff_cap(self) -> Self:
        check_backoff_cap(
            "KEYROTOR_RETRY_BACKOFF_SECONDS",
            self.retry_backoff_s,
            "KEYROTOR_RETRY_BACKOFF_MAX_SECONDS",
            self.retry_backoff_max_s,
        )
        return self

    @field_validator("log_level")
    @classmethod
    def _log_level(cls, value: str) -> str:
        # Refused rather than taken as INFO: an operator asking for DEBUG must not get INFO silently.
        level = value.strip().upper()
        if level not in LOG_LEVELS:
            raise ValueError(f"must be one of {', '.join(LOG_LEVELS)}")
        return level
