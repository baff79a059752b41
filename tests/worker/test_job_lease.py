"""A started job's arq "in progress" marker is a lease from the first moment, not the job timeout."""

from __future__ import annotations

from arq.worker import Worker

from keyrotor import Settings
from keyrotor.worker.main import LeasedWorker, worker_settings


def test_a_taken_jobs_marker_starts_as_the_lease(env: dict[str, str]) -> None:
    settings = Settings.from_env({**env, "KEYROTOR_JOB_LEASE_SECONDS": "7"})
    # arq alone marks a taken job for the job timeout plus 10 s: a worker killed before its
    # on_job_start renewed the marker as a lease blocked the job (and its run) that long.
    assert Worker(**worker_settings(settings)).in_progress_timeout_s == settings.job_timeout_s + 10
    # keyrotor's worker marks it for one lease, which job_start then keeps renewing.
    assert LeasedWorker(**worker_settings(settings)).in_progress_timeout_s == 7
