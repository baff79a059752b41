"""The scheduler process (``keyrotor scheduler``, keyrotor.worker.scheduler): when it scans for
due rotations, how it elects a leader, and how it backs off scopes that keep failing."""

from __future__ import annotations

from typing import Self

from pydantic import Field, model_validator

from keyrotor.settings.base import SettingsPart, check_backoff_cap


class SchedulerSettings(SettingsPart):
    """The leading scheduler's scans, leadership, metrics recounts and backoff."""

    scan_interval_s: float = Field(
        default=60.0, gt=0, le=86_400, validation_alias="KEYROTOR_SCAN_INTERVAL_SECONDS"
    )
    replica_check_interval_s: float = Field(
        default=3_600.0, gt=0, le=86_400, validation_alias="KEYROTOR_REPLICA_CHECK_INTERVAL_SECONDS"
    )
    # A leading scheduler that stops answering (hung, SIGSTOP) loses its lock after this long
    # without pinging it (Postgres idle_session_timeout); a standby then takes over at its next scan.
    scheduler_leader_timeout_s: float = Field(
        default=30.0, ge=2, le=3_600, validation_alias="KEYROTOR_SCHEDULER_LEADER_TIMEOUT_SECONDS"
    )
    # The leading scheduler recounts rows per DEK version (keyrotor_rows_per_dek_version) at most
    # this often: the count reads the whole secrets index.
    rows_metric_interval_s: float = Field(
        default=300.0, gt=0, le=86_400, validation_alias="KEYROTOR_ROWS_METRIC_INTERVAL_SECONDS"
    )
    # ... with a series per scope for this many scopes (those with the most rows); the rest are
    # summed per version under scope="(other)", so a scope per tenant cannot flood Prometheus.
    rows_metric_max_scopes: int = Field(
        default=200, ge=0, le=100_000, validation_alias="KEYROTOR_ROWS_METRIC_MAX_SCOPES"
    )
    # Due scopes are read and opened this many at a time, one transaction a batch.
    scan_batch_size: int = Field(default=500, ge=1, le=10_000, validation_alias="KEYROTOR_SCAN_BATCH_SIZE")
    # A scope whose last runs failed waits base * 2**(failures - 1), at most max, before the next try.
    schedule_backoff_s: float = Field(
        default=300.0, gt=0, validation_alias="KEYROTOR_SCHEDULE_BACKOFF_SECONDS"
    )
    schedule_backoff_max_s: float = Field(
        default=21_600.0, gt=0, validation_alias="KEYROTOR_SCHEDULE_BACKOFF_MAX_SECONDS"
    )
    # Redis key naming the leading scheduler (value: its instance id), for health checks.
    scheduler_leader_key: str = Field(
        default="keyrotor:scheduler:leader",
        min_length=1,
        max_length=200,
        validation_alias="KEYROTOR_SCHEDULER_LEADER_KEY",
    )
    # Dry runs estimate a rotation's duration at this re-encryption rate until rotations have been
    # measured: the low end of what one worker process re-encrypts on 2 cores (bench/bench_rotation.py),
    # so a first estimate errs long rather than short.
    estimate_rows_per_second: float = Field(
        default=20_000.0, gt=0, validation_alias="KEYROTOR_ESTIMATE_ROWS_PER_SECOND"
    )

    @model_validator(mode="after")
    def _schedule_backoff_cap(self) -> Self:
        check_backoff_cap(
            "KEYROTOR_SCHEDULE_BACKOFF_SECONDS",
            self.schedule_backoff_s,
            "KEYROTOR_SCHEDULE_BACKOFF_MAX_SECONDS",
            self.schedule_backoff_max_s,
        )
        return self
