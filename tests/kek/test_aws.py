"""AWS provider tests on a real moto server: configuration, KMS versions and key checks, Secrets
Manager rotation recovery, failover and the material cache."""

from __future__ import annotations

import base64
import json
import os
import traceback
import uuid
from collections.abc import AsyncIterator
from functools import partial
from typing import cast

import pytest
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from structlog.testing import capture_logs

from keyrotor.errors import ConfigurationError, KekError, KekUnavailable
from keyrotor.kek.aws_client import AwsConnection
from keyrotor.kek.aws_kms import AwsKmsConfig, AwsKmsKek
from keyrotor.kek.aws_secret_material import new_secret_string, rotation_token
from keyrotor.kek.aws_secrets import (
    CURRENT,
    PENDING,
    PREVIOUS,
    AwsSecretsConfig,
    AwsSecretsKek,
)
from keyrotor.kek.base import WrapContext
from keyrotor.kek.remote import open_remote_provider
from tests.kek.conftest import attempt_failures, fast_policy
from tests.servers import (
    AWS_REGION,
    ServerProcess,
    aws_client,
    aws_env,
    create_kek_secret,
    create_kms_key,
    dead_endpoint,
)

CTX = WrapContext("tenant-7/google", 2)
FAILOVER_REGION = "eu-west-1"


# --- configuration ---------------------------------------------------------------------------


def test_config_from_env_names_the_missing_variable() -> None:
    with pytest.raises(ConfigurationError, match="AWS_KMS_KEY_ID"):
        AwsKmsConfig.from_env({"AWS_SECRETS_REGION": "us-east-1"})
    with pytest.raises(ConfigurationError, match="AWS_SECRETS_REGION"):
        AwsKmsConfig.from_env({"AWS_KMS_KEY_ID": "alias/keyrotor"})
    with pytest.raises(ConfigurationError, match="AWS_SECRET_ID"):
        AwsSecretsConfig.from_env({"AWS_SECRETS_REGION": "us-east-1"})
    with pytest.raises(ConfigurationError, match="AWS_SECRET_ACCESS_KEY"):
        AwsConnection.from_env({"AWS_SECRETS_REGION": "us-east-1", "AWS_ACCESS_KEY_ID": "AKIA123"})
    with pytest.raises(ConfigurationError, match="AWS_ACCESS_KEY_ID"):
        AwsConnection.from_env({"AWS_SECRETS_REGION": "us-east-1", "AWS_SECRET_ACCESS_KEY": "s3cr3t-value"})


@pytest.mark.parametrize(
    ("variable", "env"),
    [
        ("AWS_SECRETS_REGION", {"AWS_SECRETS_REGION": "eu west 1", "AWS_KMS_KEY_ID": "alias/k"}),
        ("AWS_SECRETS_REGION", {"AWS_SECRETS_REGION": "eu-west-1/", "AWS_SECRET_ID": "s"}),
        (
            "AWS_ENDPOINT_URL",
            {"AWS_SECRETS_REGION": "eu-west-1", "AWS_KMS_KEY_ID": "alias/k", "AWS_ENDPOINT_URL": "not a url"},
        ),
        (
            "AWS_SECRETS_FAILOVER_REGIONS",
            {
                "AWS_SECRETS_REGION": "eu-west-1",
                "AWS_SECRET_ID": "s",
                "AWS_SECRETS_FAILOVER_REGIONS": "us east",
            },
        ),
    ],
)
async def test_a_malformed_region_or_endpoint_is_a_configuration_error(
    variable: str, env: dict[str, str]
) -> None:
    # botocore refuses these when the client is created, with its own InvalidRegionError or a
    # bare ValueError ("unexpected ValueError" from the CLI): one line naming the variable instead.
    creds = {"AWS_ACCESS_KEY_ID": "AKIAEXAMPLE", "AWS_SECRET_ACCESS_KEY": "very-secret-access-key"}
    with pytest.raises(ConfigurationError, match=variable) as caught:
        await open_remote_provider("aws", {**env, **creds}, policy=fast_policy())
    assert "very-secret-access-key" not in str(caught.value)


def test_config_reads_exactly_its_variables_and_hides_secrets() -> None:
    config = AwsSecretsConfig.from_env(
        {
            "AWS_SECRETS_REGION": "us-east-1",
            "AWS_SECRET_ID": "prod/keyrotor/kek",
            "AWS_ENDPOINT_URL": "http://127.0.0.1:5000",
            "AWS_ACCESS_KEY_ID": "AKIAEXAMPLE",
            "AWS_SECRET_ACCESS_KEY": "very-secret-access-key",
            "AWS_SECRETS_FAILOVER_REGIONS": " eu-west-1, ,us-east-1,eu-central-1,eu-west-1",
        }
    )
    assert config.regions == ("us-east-1", "eu-west-1", "eu-central-1")
    assert config.connection.endpoint_url == "http://127.0.0.1:5000"
    assert "very-secret-access-key" not in repr(config)
    assert "AKIAEXAMPLE" not in repr(config)
    kms = AwsKmsConfig.from_env({"AWS_SECRETS_REGION": "eu-west-1", "AWS_KMS_KEY_ID": "alias/kek"})
    assert (kms.connection.region, kms.key_id, kms.connection.access_key_id) == (
        "eu-west-1",
        "alias/kek",
        None,
    )


async def test_open_remote_provider_chooses_the_mode() -> None:
    base = {"AWS_SECRETS_REGION": "us-east-1"}
    with pytest.raises(ConfigurationError, match="both"):
        await open_remote_provider("aws", {**base, "AWS_KMS_KEY_ID": "k", "AWS_SECRET_ID": "s"})
    with pytest.raises(ConfigurationError, match="AWS_KMS_KEY_ID"):
        await open_remote_provider("aws", base)
    with pytest.raises(ConfigurationError, match="unknown"):
        await open_remote_provider("gcp", base)


# --- KMS -------------------------------------------------------------------------------------


async def test_kms_kek_id_is_the_key_arn_also_through_an_alias(moto_server: ServerProcess) -> None:
    arn = create_kms_key(moto_server)
    alias = f"alias/keyrotor-{uuid.uuid4().hex[:8]}"
    aws_client(moto_server, "kms").create_alias(AliasName=alias, TargetKeyId=arn)
    provider = await open_remote_provider(
        "aws", aws_env(moto_server, AWS_KMS_KEY_ID=alias), policy=fast_policy()
    )
    try:
        assert isinstance(provider, AwsKmsKek)
        assert provider.kek_id == arn
        wrapped = await provider.wrap(os.urandom(32), CTX)
        assert wrapped.kek_id == arn
    finally:
        await provider.aclose()


async def test_kms_wrong_key_id_is_a_kek_error(moto_server: ServerProcess) -> None:
    missing = f"arn:aws:kms:{AWS_REGION}:123456789012:key/{uuid.uuid4()}"
    with pytest.raises(KekError, match="NotFoundException"):
        await open_remote_provider("aws", aws_env(moto_server, AWS_KMS_KEY_ID=missing), policy=fast_policy())

    # A DEK wrapped under key A does not unwrap with key B, even if its kek_id is forged.
    key_a, key_b = create_kms_key(moto_server), create_kms_key(moto_server)
    provider_a = await open_remote_provider(
        "aws", aws_env(moto_server, AWS_KMS_KEY_ID=key_a), policy=fast_policy()
    )
    provider_b = await open_remote_provider(
        "aws", aws_env(moto_server, AWS_KMS_KEY_ID=key_b), policy=fast_policy()
    )
    try:
        wrapped = await provider_a.wrap(os.urandom(32), CTX)
        with pytest.raises(KekError, match="another key"):
            await provider_b.unwrap(wrapped, CTX)
        forged = type(wrapped)(kek_id=key_b, kek_version=wrapped.kek_version, blob=wrapped.blob)
        with pytest.raises(KekError, match="does not unwrap"):
            await provider_b.unwrap(forged, CTX)
        with pytest.raises(KekError):
            await provider_b.rewrap([(forged, CTX)])
    finally:
        await provider_a.aclose()
        await provider_b.aclose()


async def test_kms_disabled_key_is_refused(moto_server: ServerProcess) -> None:
    arn = create_kms_key(moto_server)
    aws_client(moto_server, "kms").disable_key(KeyId=arn.rsplit("/", 1)[-1])  # moto: key id, not ARN
    with pytest.raises(KekError, match="Disabled"):
        await open_remote_provider("aws", aws_env(moto_server, AWS_KMS_KEY_ID=arn), policy=fast_policy())


async def test_kms_versions_are_counted_from_list_key_rotations(moto_server: ServerProcess) -> None:
    arn = create_kms_key(moto_server)
    env = aws_env(moto_server, AWS_KMS_KEY_ID=arn)
    provider = await open_remote_provider("aws", env, policy=fast_policy())
    try:
        assert await provider.current_version() == 1
        assert await provider.rotate() == 2
        # A rotation made elsewhere (console, another worker) counts too.
        aws_client(moto_server, "kms").rotate_key_on_demand(KeyId=arn)
        rotations = aws_client(moto_server, "kms").list_key_rotations(KeyId=arn)["Rotations"]
        assert len(rotations) == 2
        assert await provider.rotate() == 4
    finally:
        await provider.aclose()
    # A fresh process derives the same number from the key's history alone.
    fresh = await open_remote_provider("aws", env, policy=fast_policy())
    try:
        assert await fresh.current_version() == 4
        assert (await fresh.wrap(os.urandom(32), CTX)).kek_version == 4
    finally:
        await fresh.aclose()


# --- Secrets Manager -------------------------------------------------------------------------


@pytest.fixture
async def secret_name(moto_server: ServerProcess) -> str:
    return create_kek_secret(moto_server)


@pytest.fixture
async def sm(moto_server: ServerProcess, secret_name: str) -> AsyncIterator[AwsSecretsKek]:
    provider = await open_remote_provider(
        "aws", aws_env(moto_server, AWS_SECRET_ID=secret_name), policy=fast_policy()
    )
    assert isinstance(provider, AwsSecretsKek)
    try:
        yield provider
    finally:
        await provider.aclose()


def stages(server: ServerProcess, name: str) -> dict[str, list[str]]:
    versions = aws_client(server, "secretsmanager").list_secret_version_ids(SecretId=name)["Versions"]
    return {v["VersionId"]: v.get("VersionStages", []) for v in versions}


def labelled(server: ServerProcess, name: str, stage: str) -> str | None:
    return next((vid for vid, labels in stages(server, name).items() if stage in labels), None)


def plant_pending(server: ServerProcess, name: str, secret_string: str) -> str:
    """What an interrupted rotation (or another tool) leaves: a version labelled AWSPENDING only."""
    token = str(uuid.uuid4())
    aws_client(server, "secretsmanager").put_secret_value(
        SecretId=name, ClientRequestToken=token, SecretString=secret_string, VersionStages=[PENDING]
    )
    return token


def key_of(secret_string: str) -> bytes:
    return base64.b64decode(json.loads(secret_string)["key"])


async def test_sm_rotation_stages_and_deterministic_token(
    moto_server: ServerProcess, secret_name: str, sm: AwsSecretsKek
) -> None:
    v1_id = labelled(moto_server, secret_name, CURRENT)
    old = await sm.wrap(os.urandom(32), CTX)
    assert await sm.rotate() == 2
    labels = stages(moto_server, secret_name)
    assert labels[rotation_token(secret_name, 2)] == [CURRENT]
    assert labels[v1_id] == [PREVIOUS]  # type: ignore[index]
    assert labelled(moto_server, secret_name, PENDING) is None
    assert (await sm.wrap(os.urandom(32), CTX)).kek_version == 2
    assert len(await sm.unwrap(old, CTX)) == 32


async def test_sm_rotation_whose_last_answer_was_lost_is_not_repeated(
    moto_server: ServerProcess, secret_name: str, sm: AwsSecretsKek
) -> None:
    # An attempt rotated v1 -> v2, but its caller saw a timeout (say, on the final label move):
    # the retry, from the same recorded version, adopts v2 and writes nothing.
    assert await sm.latest_version() == 1
    assert await sm.rotate() == 2
    before = stages(moto_server, secret_name)
    assert await sm.rotate_from(1) == 2
    assert stages(moto_server, secret_name) == before
    assert rotation_token(secret_name, 3) not in before
    assert await sm.rotate_from(2) == 3  # from the latest version, it does rotate


async def test_sm_stuck_pending_of_the_next_version_is_finished(
    moto_server: ServerProcess, secret_name: str, sm: AwsSecretsKek
) -> None:
    planted_value = new_secret_string(2)
    planted = plant_pending(moto_server, secret_name, planted_value)
    assert await sm.rotate() == 2
    assert labelled(moto_server, secret_name, CURRENT) == planted
    assert labelled(moto_server, secret_name, PENDING) is None
    # New DEKs are wrapped under the planted material: open one by hand with it.
    dek = os.urandom(32)
    wrapped = await sm.wrap(dek, CTX)
    assert wrapped.kek_version == 2
    nonce, body = wrapped.blob[:12], wrapped.blob[12:]
    assert AESGCM(key_of(planted_value)).decrypt(nonce, body, CTX.as_aad()) == dek


@pytest.mark.parametrize(
    "garbage",
    ["not json at all", new_secret_string(7), '{"version": 2, "key": "c2hvcnQ="}'],
    # Fixed ids: the second value is random, and parallel test processes must collect the same names.
    ids=["not-json", "wrong-version", "short-key"],
)
async def test_sm_stuck_pending_that_is_unusable_is_rolled_back(
    moto_server: ServerProcess, secret_name: str, sm: AwsSecretsKek, garbage: str
) -> None:
    planted = plant_pending(moto_server, secret_name, garbage)
    with capture_logs() as logs:
        assert await sm.rotate() == 2
    assert stages(moto_server, secret_name)[planted] == []  # rolled back: label removed
    assert labelled(moto_server, secret_name, CURRENT) == rotation_token(secret_name, 2)
    assert any(entry["event"] == "kek_pending_rolled_back" for entry in logs)
    assert garbage not in repr(logs)


async def test_sm_run_interrupted_after_promotion_is_completed(
    moto_server: ServerProcess, secret_name: str, sm: AwsSecretsKek
) -> None:
    client = aws_client(moto_server, "secretsmanager")
    v1_id = labelled(moto_server, secret_name, CURRENT)
    token = rotation_token(secret_name, 2)
    client.put_secret_value(
        SecretId=secret_name,
        ClientRequestToken=token,
        SecretString=new_secret_string(2),
        VersionStages=[PENDING],
    )
    client.update_secret_version_stage(
        SecretId=secret_name, VersionStage=CURRENT, MoveToVersionId=token, RemoveFromVersionId=v1_id
    )
    # ... and the run died before removing AWSPENDING.
    assert stages(moto_server, secret_name)[token] == [PENDING, CURRENT]
    assert await sm.rotate() == 2  # the same rotation, completed; not a second one
    assert stages(moto_server, secret_name)[token] == [CURRENT]
    assert await sm.rotate() == 3


async def test_sm_repeated_put_with_the_same_token_reuses_the_version(
    moto_server: ServerProcess, secret_name: str, sm: AwsSecretsKek
) -> None:
    """A run died after its PutSecretValue, and the AWSPENDING label was removed since: the next
    run's put with the same ClientRequestToken is refused (ResourceExistsException), and the
    version the token made is tested and promoted -- no second version n+1 with other material."""
    client = aws_client(moto_server, "secretsmanager")
    token = rotation_token(secret_name, 2)
    first = new_secret_string(2)
    client.put_secret_value(
        SecretId=secret_name, ClientRequestToken=token, SecretString=first, VersionStages=[PENDING]
    )
    client.update_secret_version_stage(SecretId=secret_name, VersionStage=PENDING, RemoveFromVersionId=token)
    versions_before = set(stages(moto_server, secret_name))
    assert await sm.rotate() == 2
    assert set(stages(moto_server, secret_name)) == versions_before  # no new version
    assert stages(moto_server, secret_name)[token] == [CURRENT]
    dek = os.urandom(32)
    wrapped = await sm.wrap(dek, CTX)
    assert wrapped.kek_version == 2
    assert AESGCM(key_of(first)).decrypt(wrapped.blob[:12], wrapped.blob[12:], CTX.as_aad()) == dek


async def test_sm_versions_older_than_previous_still_unwrap(sm: AwsSecretsKek) -> None:
    dek = os.urandom(32)
    v1 = await sm.wrap(dek, CTX)
    await sm.rotate()
    v2 = await sm.wrap(dek, CTX)
    await sm.rotate()
    await sm.rotate()
    sm._materials.clear()  # forget the cache: fetch v1 and v2 by their VersionId
    assert await sm.unwrap(v1, CTX) == dek
    assert await sm.unwrap(v2, CTX) == dek
    with pytest.raises(KekError, match="no longer available"):
        await sm.unwrap(type(v1)(kek_id=v1.kek_id, kek_version=9, blob=v1.blob), CTX)


async def test_sm_material_cache_expires(moto_server: ServerProcess, secret_name: str) -> None:
    now = [0.0]
    env = aws_env(moto_server, AWS_SECRET_ID=secret_name)
    config = AwsSecretsConfig(connection=AwsConnection.from_env(env), secret_id=secret_name, cache_ttl_s=300)
    reader = await AwsSecretsKek.open(config, policy=fast_policy(), clock=lambda: now[0])
    rotator = await open_remote_provider("aws", env, policy=fast_policy())
    try:
        assert await reader.current_version() == 1
        assert await rotator.rotate() == 2
        now[0] += 299
        assert await reader.current_version() == 1  # cached
        assert (await reader.wrap(os.urandom(32), CTX)).kek_version == 1  # still unwraps: AWSPREVIOUS
        now[0] += 1
        assert await reader.current_version() == 2
    finally:
        await reader.aclose()
        await rotator.aclose()


async def test_sm_malformed_secret_names_the_shape_not_the_content(moto_server: ServerProcess) -> None:
    name = f"keyrotor-bad-{uuid.uuid4().hex[:8]}"
    content = "hunter2-is-not-a-kek"
    aws_client(moto_server, "secretsmanager").create_secret(Name=name, SecretString=content)
    with pytest.raises(KekError, match="not keyrotor KEK material") as info:
        await open_remote_provider("aws", aws_env(moto_server, AWS_SECRET_ID=name), policy=fast_policy())
    assert content not in str(info.value)
    # Nor anywhere in the chain of exceptions behind it, attributes included: a JSONDecodeError
    # keeps the whole document it failed on (``doc``), and error trackers record the chain.
    seen: list[BaseException] = []
    pending: list[BaseException | None] = [info.value]
    while pending:
        exc = pending.pop()
        if exc is None or any(exc is s for s in seen):
            continue
        seen.append(exc)
        assert all(content not in repr(v) for v in vars(exc).values()), type(exc).__name__
        assert content not in repr(exc.args)
        pending += [exc.__cause__, exc.__context__]


@pytest.mark.parametrize(
    "content",
    [
        # Nested past the parser's recursion limit (the secret may hold 64 KB): RecursionError.
        "[" * 30_000 + "]" * 30_000,
        '{"version": 1, "key": ' + "[" * 20_000 + "]" * 20_000 + "}",
    ],
)
async def test_sm_deeply_nested_secret_is_a_kek_error(moto_server: ServerProcess, content: str) -> None:
    name = f"keyrotor-deep-{uuid.uuid4().hex[:8]}"
    aws_client(moto_server, "secretsmanager").create_secret(Name=name, SecretString=content)
    with pytest.raises(KekError, match="not keyrotor KEK material") as info:
        await open_remote_provider("aws", aws_env(moto_server, AWS_SECRET_ID=name), policy=fast_policy())
    assert info.value.__cause__ is None and info.value.__context__ is None


async def test_sm_fails_over_to_the_replica_region(moto_server: ServerProcess) -> None:
    name = create_kek_secret(moto_server, replica_regions=(FAILOVER_REGION,))
    env = aws_env(moto_server, AWS_SECRET_ID=name, AWS_SECRETS_FAILOVER_REGIONS=FAILOVER_REGION)
    # Live provider on the primary: wrap a DEK there.
    primary = await open_remote_provider("aws", env, policy=fast_policy())
    dek = os.urandom(32)
    try:
        wrapped = await primary.wrap(dek, CTX)
    finally:
        await primary.aclose()

    # The primary region's endpoint is dead; the failover region is the live moto.
    config = AwsSecretsConfig.from_env(env)
    config = AwsSecretsConfig(
        connection=config.connection,
        secret_id=config.secret_id,
        failover_regions=config.failover_regions,
        region_endpoint_urls={AWS_REGION: dead_endpoint()},
    )
    before = attempt_failures("aws-sm", "get_secret_value", "unavailable")
    with capture_logs() as logs:
        degraded = await AwsSecretsKek.open(
            config, policy=fast_policy(breaker_threshold=2, breaker_cooldown_s=30)
        )
    try:
        assert await degraded.unwrap(wrapped, CTX) == dek
        assert degraded.kek_id == wrapped.kek_id
        again = await degraded.wrap(dek, CTX)
        assert await degraded.unwrap(again, CTX) == dek
        assert attempt_failures("aws-sm", "get_secret_value", "unavailable") > before
        assert any(e["event"] == "kek_failover" and e["region"] == FAILOVER_REGION for e in logs)
        assert degraded.primary.resilience.breaker.state == "open"
        with pytest.raises(KekUnavailable):  # writes never fail over: replicas are read-only
            await degraded.rotate()
    finally:
        await degraded.aclose()


def test_new_secret_string_is_fresh_material() -> None:
    one, two = json.loads(new_secret_string()), json.loads(new_secret_string(5))
    assert one["version"] == 1 and two["version"] == 5
    assert len(base64.b64decode(one["key"])) == 32
    assert one["key"] != two["key"]
    assert rotation_token("a", 2) == rotation_token("a", 2) != rotation_token("a", 3)
    assert len(rotation_token("a", 2)) == 36


# --- botocore's parameter validation echoes values: none may reach the error ------------------


def _rendered(err: BaseException) -> str:
    """Everything an error shows: its text, its repr and its traceback with every cause."""
    return str(err) + repr(err) + "".join(traceback.format_exception(err))


async def test_a_dek_that_is_not_bytes_is_refused_without_showing_it(moto_server: ServerProcess) -> None:
    kms = await open_remote_provider(
        "aws", aws_env(moto_server, AWS_KMS_KEY_ID=create_kms_key(moto_server)), policy=fast_policy()
    )
    material = os.urandom(32)
    try:
        for dek in (list(material), material.hex()[:32]):
            with pytest.raises(KekError) as refused:
                await kms.wrap(cast(bytes, dek), CTX)
            shown = _rendered(refused.value)
            assert str(dek) not in shown and str(list(material)[:8])[1:-1] not in shown, shown
            assert "Plaintext" not in shown
    finally:
        await kms.aclose()


async def test_a_parameter_validation_error_leaves_no_cause_behind(moto_server: ServerProcess) -> None:
    # The translation itself: botocore's error quotes the parameter (here, key bytes as a list)
    # and must be neither the cause nor the context of the KekError raised in its place.
    kms = await open_remote_provider(
        "aws", aws_env(moto_server, AWS_KMS_KEY_ID=create_kms_key(moto_server)), policy=fast_policy()
    )
    assert isinstance(kms, AwsKmsKek)
    secret = list(os.urandom(32))
    request = partial(kms._client.encrypt, KeyId=kms.kek_id, Plaintext=secret)
    try:
        with pytest.raises(KekError, match="parameter validation") as refused:
            await kms.resilience.call("encrypt", request)
    finally:
        await kms.aclose()
    err = refused.value
    assert err.__cause__ is None and err.__context__ is None
    assert str(secret)[1:-1] not in _rendered(err)
