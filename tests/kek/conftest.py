"""Fixtures for the KEK provider tests: the real servers of tests/servers.py and open providers."""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest

from keyrotor.kek.base import KekProvider
from keyrotor.kek.local import LocalKeyring
from keyrotor.kek.metrics import KEK_ATTEMPT_FAILURES, KEK_CALLS
from keyrotor.kek.remote import open_remote_provider
from keyrotor.kek.resilience import ResiliencePolicy
from tests.servers import (
    ServerProcess,
    aws_env,
    bao_server,
    create_kek_secret,
    create_kms_key,
    moto_server,
    spawn_server,
    vault_env,
)

__all__ = ["bao_server", "moto_server", "spawn_server"]

# A strong, test-only master key for the local keyring.
LOCAL_MASTER_KEY = "kek-contract-test-key-7Qz1pX9mWc4rT2vB8nL5sJ0hD6gF3kYa"

PROVIDER_KINDS = ("local", "aws-kms", "aws-sm", "vault")


def fast_policy(**overrides: float | int | None) -> ResiliencePolicy:
    """Short timeouts and backoffs, so failure tests stay fast."""
    values: dict[str, float | int | None] = {
        "timeout_s": 3.0,
        "max_attempts": 3,
        "backoff_initial_s": 0.01,
        "backoff_max_s": 0.05,
        "breaker_threshold": 5,
        "breaker_cooldown_s": 1.0,
    }
    values.update(overrides)
    return ResiliencePolicy(**values)  # type: ignore[arg-type]


def calls(provider: str, operation: str, outcome: str = "ok") -> float:
    """The current value of keyrotor_kek_calls_total for these labels."""
    return KEK_CALLS.labels(provider, operation, outcome)._value.get()


def attempt_failures(provider: str, operation: str, outcome: str) -> float:
    """The current value of keyrotor_kek_attempt_failures_total for these labels."""
    return KEK_ATTEMPT_FAILURES.labels(provider, operation, outcome)._value.get()


async def open_provider(kind: str, request: pytest.FixtureRequest) -> KekProvider:
    """A fresh provider of ``kind`` with its own key or secret."""
    if kind == "local":
        return LocalKeyring.from_keys({1: LOCAL_MASTER_KEY}, current=1)
    if kind == "aws-kms":
        moto: ServerProcess = request.getfixturevalue("moto_server")
        env = aws_env(moto, AWS_KMS_KEY_ID=create_kms_key(moto))
        return await open_remote_provider("aws", env, policy=fast_policy())
    if kind == "aws-sm":
        moto = request.getfixturevalue("moto_server")
        env = aws_env(moto, AWS_SECRET_ID=create_kek_secret(moto))
        return await open_remote_provider("aws", env, policy=fast_policy())
    if kind == "vault":
        bao: ServerProcess = request.getfixturevalue("bao_server")
        return await open_remote_provider("vault", vault_env(bao), policy=fast_policy())
    raise AssertionError(kind)


@pytest.fixture(params=PROVIDER_KINDS)
async def provider(request: pytest.FixtureRequest) -> AsyncIterator[KekProvider]:
    """Each provider in turn, open on its real server, with a key of its own."""
    opened = await open_provider(request.param, request)
    try:
        yield opened
    finally:
        await opened.aclose()
