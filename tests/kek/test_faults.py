"""Faults the issue names, on the real servers: wrong credentials, a revoked token, a deleted or
disabled KEK, and a throttling storm. Each gives a typed error that names the provider and the
cause (and never a credential); permanent refusals are not retried.

AWS credentials are checked by a dedicated moto server with IAM authentication switched on
(``INITIAL_NO_AUTH_ACTION_COUNT``: the first requests set up a user, every later one is
authenticated). Throttling is a real OpenBao rate-limit quota on the test key's encrypt path.
"""

from __future__ import annotations

import asyncio
import json
import os
import time
import uuid
from collections.abc import Callable
from dataclasses import replace
from typing import Any, Literal

import boto3
import pytest

from keyrotor.errors import KekError, KekUnavailable
from keyrotor.kek.aws_secrets import AwsSecretsConfig, AwsSecretsKek
from keyrotor.kek.base import WrapContext
from keyrotor.kek.remote import open_remote_provider
from keyrotor.kek.resilience import CircuitOpen, Throttled
from keyrotor.rotation.kek import preflight
from tests.kek.conftest import attempt_failures, fast_policy
from tests.servers import (
    AWS_REGION,
    BAO_POLICY,
    ServerProcess,
    aws_client,
    aws_env,
    bao_root,
    create_kek_secret,
    create_kms_key,
    vault_env,
)

CTX = WrapContext("tenant-3/openai", 1)
Spawn = Callable[[Literal["moto", "bao"]], ServerProcess]


# --- AWS: credentials ------------------------------------------------------------------------


def _authenticating_moto(
    spawn: Spawn, monkeypatch: pytest.MonkeyPatch
) -> tuple[ServerProcess, dict[str, str]]:
    """A moto server that authenticates every request after the three that create a user.

    Returns the server and that user's (valid) credentials.
    """
    monkeypatch.setenv("INITIAL_NO_AUTH_ACTION_COUNT", "3")
    server = spawn("moto")
    monkeypatch.delenv("INITIAL_NO_AUTH_ACTION_COUNT")
    iam = aws_client(server, "iam")
    iam.create_user(UserName="keyrotor")
    iam.put_user_policy(
        UserName="keyrotor",
        PolicyName="kek",
        PolicyDocument=json.dumps(
            {"Version": "2012-10-17", "Statement": [{"Effect": "Allow", "Action": "*", "Resource": "*"}]}
        ),
    )
    key = iam.create_access_key(UserName="keyrotor")["AccessKey"]
    return server, {"AWS_ACCESS_KEY_ID": key["AccessKeyId"], "AWS_SECRET_ACCESS_KEY": key["SecretAccessKey"]}


def _client(server: ServerProcess, service: str, creds: dict[str, str]) -> Any:
    return boto3.client(
        service,
        region_name=AWS_REGION,
        endpoint_url=server.url,
        aws_access_key_id=creds["AWS_ACCESS_KEY_ID"],
        aws_secret_access_key=creds["AWS_SECRET_ACCESS_KEY"],
    )


async def test_aws_wrong_credentials_are_a_typed_error_naming_the_provider(
    spawn_server: Spawn, monkeypatch: pytest.MonkeyPatch
) -> None:
    server, good = _authenticating_moto(spawn_server, monkeypatch)
    arn = str(_client(server, "kms", good).create_key()["KeyMetadata"]["Arn"])
    secret = f"keyrotor-kek-{uuid.uuid4().hex[:8]}"
    _client(server, "secretsmanager", good).create_secret(
        Name=secret, SecretString=json.dumps({"version": 1, "key": "A" * 43 + "="})
    )
    kms_env = {**aws_env(server, AWS_KMS_KEY_ID=arn), **good}
    sm_env = {**aws_env(server, AWS_SECRET_ID=secret), **good}

    # The right credentials work: authentication is really on, and they pass it.
    for env in (kms_env, sm_env):
        provider = await open_remote_provider("aws", env, policy=fast_policy())
        await provider.check()
        await provider.aclose()

    wrong_secret = "wrong-secret-access-key-0123456789abcdef"
    cases = [
        (
            "aws-kms",
            {**kms_env, "AWS_SECRET_ACCESS_KEY": wrong_secret},
            "describe_key",
            "SignatureDoesNotMatch",
        ),
        (
            "aws-kms",
            {**kms_env, "AWS_ACCESS_KEY_ID": "AKIAUNKNOWN000000000"},
            "describe_key",
            "InvalidClientTokenId",
        ),
        (
            "aws-sm",
            {**sm_env, "AWS_SECRET_ACCESS_KEY": wrong_secret},
            "get_secret_value",
            "SignatureDoesNotMatch",
        ),
    ]
    for provider_name, env, operation, code in cases:
        before = attempt_failures(provider_name, operation, "error")
        with pytest.raises(KekError) as caught:
            await open_remote_provider("aws", env, policy=fast_policy())
        message = str(caught.value)
        assert isinstance(caught.value, KekError) and not isinstance(caught.value, KekUnavailable)
        assert message.startswith(f"{provider_name} ({AWS_REGION}) {operation}: {code}"), message
        assert "AWS refused the credentials" in message
        assert wrong_secret not in message and good["AWS_SECRET_ACCESS_KEY"] not in message
        # A refusal is permanent: one attempt, no retries.
        assert attempt_failures(provider_name, operation, "error") == before + 1


async def test_kms_key_pending_deletion_is_refused(moto_server: ServerProcess) -> None:
    arn = create_kms_key(moto_server)
    aws_client(moto_server, "kms").schedule_key_deletion(KeyId=arn.rsplit("/", 1)[-1], PendingWindowInDays=7)
    with pytest.raises(KekError, match=r"aws-kms \(us-east-1\): key arn:.* is PendingDeletion, not Enabled"):
        await open_remote_provider("aws", aws_env(moto_server, AWS_KMS_KEY_ID=arn), policy=fast_policy())


async def test_sm_secret_deleted_under_a_running_provider(moto_server: ServerProcess) -> None:
    name = create_kek_secret(moto_server)
    config = replace(AwsSecretsConfig.from_env(aws_env(moto_server, AWS_SECRET_ID=name)), cache_ttl_s=0.001)
    provider = await AwsSecretsKek.open(config, policy=fast_policy())
    try:
        dek = os.urandom(32)
        wrapped = await provider.wrap(dek, CTX)
        aws_client(moto_server, "secretsmanager").delete_secret(SecretId=name, RecoveryWindowInDays=7)
        await asyncio.sleep(0.01)  # past the material cache
        with pytest.raises(KekError, match=r"aws-sm \(us-east-1\) get_secret_value: InvalidRequestException"):
            await provider.unwrap(wrapped, CTX)
        with pytest.raises(KekError, match="aws-sm"):
            await provider.check()
    finally:
        await provider.aclose()


# --- Vault: token, key ---------------------------------------------------------------------------


async def test_vault_revoked_token_is_a_typed_error(bao_server: ServerProcess) -> None:
    root = bao_root(bao_server)
    token = root.auth.token.create(policies=[BAO_POLICY], ttl="10m")["auth"]["client_token"]
    provider = await open_remote_provider(
        "vault", vault_env(bao_server, VAULT_TOKEN=token), policy=fast_policy()
    )
    try:
        wrapped = await provider.wrap(os.urandom(32), CTX)
        root.auth.token.revoke(token)
        before = attempt_failures("vault", "decrypt", "error")
        with pytest.raises(
            KekError, match=r"vault \(http://127\.0\.0\.1:\d+\) decrypt: Forbidden.*revoked"
        ) as caught:
            await provider.unwrap(wrapped, CTX)
        assert not isinstance(caught.value, KekUnavailable)
        assert token not in str(caught.value)
        assert attempt_failures("vault", "decrypt", "error") == before + 1  # not retried
    finally:
        await provider.aclose()


async def test_vault_deleted_key_is_a_typed_error_and_stops_a_rotation(bao_server: ServerProcess) -> None:
    # The documented policy (update, not create, on transit/encrypt): with `create` there, transit
    # would silently make a new key of the same name on the next encrypt ("upsert").
    root = bao_root(bao_server)
    token = root.auth.token.create(policies=[BAO_POLICY], ttl="10m")["auth"]["client_token"]
    env = vault_env(bao_server, VAULT_TOKEN=token)
    provider = await open_remote_provider("vault", env, policy=fast_policy())
    transit = bao_root(bao_server).secrets.transit
    try:
        wrapped = await provider.wrap(os.urandom(32), CTX)
        transit.update_key_configuration(env["VAULT_TRANSIT_KEY"], deletion_allowed=True)
        transit.delete_key(env["VAULT_TRANSIT_KEY"])
        with pytest.raises(
            KekError, match=r"vault: wrapped DEK for tenant-3/openai v1 does not unwrap.*vault \("
        ):
            await provider.unwrap(wrapped, CTX)
        with pytest.raises(KekError, match="vault: refusing to rotate the KEK"):
            await preflight(provider)
    finally:
        await provider.aclose()


# --- throttling --------------------------------------------------------------------------------


async def test_vault_throttling_storm(bao_server: ServerProcess) -> None:
    """A rate-limit quota of 1 request/s on the key's encrypt path: a burst is retried with
    backoff, then fails as Throttled naming the provider; a storm opens the circuit breaker, so
    further calls fail fast without a request; decrypts (another path) are untouched."""
    env = vault_env(bao_server)
    key = env["VAULT_TRANSIT_KEY"]
    provider = await open_remote_provider(
        "vault", env, policy=fast_policy(max_attempts=2, breaker_threshold=4, breaker_cooldown_s=30)
    )
    root = bao_root(bao_server)
    quota = f"storm-{key}"
    try:
        wrapped = await provider.wrap(os.urandom(32), CTX)
        root.sys.create_or_update_quota(quota, rate=1, path=f"transit/encrypt/{key}", interval="10s")
        throttled_before = attempt_failures("vault", "encrypt", "throttled")
        outcomes: list[BaseException | None] = []
        for _ in range(6):
            try:
                await provider.wrap(os.urandom(32), CTX)
                outcomes.append(None)
            except KekUnavailable as exc:
                outcomes.append(exc)
        throttled = [e for e in outcomes if isinstance(e, Throttled)]
        assert throttled, outcomes
        assert str(throttled[0]).startswith(f"vault ({bao_server.url}) encrypt: RateLimitExceeded")
        assert attempt_failures("vault", "encrypt", "throttled") >= throttled_before + 4
        # The storm opened the breaker: the last calls failed fast, without a request.
        assert isinstance(outcomes[-1], CircuitOpen)
        started = time.monotonic()
        with pytest.raises(CircuitOpen, match=r"vault \(.*\): circuit open"):
            await provider.wrap(os.urandom(32), CTX)
        assert time.monotonic() - started < 0.5
    finally:
        root.sys.delete_quota(quota)
        await provider.aclose()
    # The throttled path was the only one affected: a fresh process decrypts.
    fresh = await open_remote_provider("vault", env, policy=fast_policy())
    try:
        assert len(await fresh.unwrap(wrapped, CTX)) == 32
    finally:
        await fresh.aclose()
