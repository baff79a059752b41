"""The AWS KMS KEK provider (aiobotocore; the AWS plumbing is :mod:`keyrotor.kek.aws_client`).

The KEK is a symmetric KMS key (``AWS_KMS_KEY_ID``: key id, ARN or alias); its key material
never leaves KMS:

- ``wrap`` = ``Encrypt``, ``unwrap`` = ``Decrypt`` (with ``KeyId``, so a blob of another key is
  refused), ``rewrap`` = ``ReEncrypt`` (server side: the DEK never leaves KMS), each with the
  ``EncryptionContext`` of :meth:`WrapContext.as_encryption_context`, so a wrapped DEK copied to
  another scope or DEK version does not unwrap.
- ``kek_id`` is the key ARN (resolved with ``DescribeKey`` at start-up).
- KEK versions. KMS keeps every generation of key material of a key and picks the right one
  from the ciphertext by itself, but it does not number them, and ``Encrypt`` does not say which
  material it used. keyrotor numbers them honestly from the key's own history:
  version = 1 + the number of completed rotations listed by ``ListKeyRotations`` (automatic and
  on-demand). ``rotate()`` calls ``RotateKeyOnDemand`` (which only *starts* a rotation) and waits
  until ``ListKeyRotations`` shows it completed. A wrap records the version it read before
  calling ``Encrypt`` (cached for ``version_ttl_s``); if another process rotated meanwhile, the
  DEK is recorded one version too low, and ``rotate_kek`` merely rewraps it once more — never
  the other way round, because the count only grows.
- AWS limits on-demand rotations per key (10, later raised to 25); past that ``rotate()`` fails
  with KekError (``LimitExceededException``). Keys with automatic rotation still rotate.

moto (server mode) implements ``RotateKeyOnDemand`` and ``ListKeyRotations`` as bookkeeping
only: it records the rotation but keeps one key material, so under moto a rotation changes the
version numbers but not the ciphertexts' key. ``GetKeyRotationStatus`` under moto omits
``OnDemandRotationStartDate``, which is then treated as "no rotation in progress".
"""

from __future__ import annotations

import asyncio
import os
from collections.abc import Mapping, Sequence
from contextlib import AsyncExitStack
from dataclasses import dataclass
from functools import partial
from typing import Any

from keyrotor.errors import ConfigurationError, KekError, KekUnavailable
from keyrotor.kek.aws_client import AwsConnection, aws_error_code, aws_translator, open_aws_client
from keyrotor.kek.base import DEK_BYTES, WrapContext, WrappedDek, check_dek, foreign_kek
from keyrotor.kek.environ import env_required
from keyrotor.kek.metrics import CallObserver
from keyrotor.kek.resilience import CallBudget, Resilience, ResiliencePolicy

_PROBE_CONTEXT = WrapContext("keyrotor/health", 1)


@dataclass(frozen=True)
class AwsKmsConfig:
    """Configuration of the KMS provider.

    ``key_id`` may be a key id, key ARN, alias name (``alias/keyrotor``) or alias ARN.
    """

    connection: AwsConnection
    key_id: str

    @classmethod
    def from_env(cls, environ: Mapping[str, str]) -> AwsKmsConfig:
        """Read ``AWS_KMS_KEY_ID`` and the :class:`AwsConnection` variables.

        Raises:
            ConfigurationError: naming the missing variable.
        """
        key_id = env_required(environ, "AWS_KMS_KEY_ID")
        return cls(connection=AwsConnection.from_env(environ), key_id=key_id)


def _usable_key_arn(target: str, meta: Mapping[str, Any]) -> str:
    """The ARN of the key ``DescribeKey`` described, if it is an enabled symmetric encryption key.

    Raises:
        KekError: the key is disabled or pending deletion.
        ConfigurationError: the key is not a symmetric encryption key.
    """
    arn = str(meta["Arn"])
    state = meta.get("KeyState", "Enabled" if meta.get("Enabled", True) else "Disabled")
    if state != "Enabled":
        raise KekError(f"{target}: key {arn} is {state}, not Enabled")
    spec = meta.get("KeySpec", "SYMMETRIC_DEFAULT")
    usage = meta.get("KeyUsage", "ENCRYPT_DECRYPT")
    if spec != "SYMMETRIC_DEFAULT" or usage != "ENCRYPT_DECRYPT":
        raise ConfigurationError(
            f"{target}: key {arn} is {spec}/{usage}; AWS_KMS_KEY_ID must name a symmetric "
            "encryption key (SYMMETRIC_DEFAULT/ENCRYPT_DECRYPT)"
        )
    return arn


class AwsKmsKek:
    """KEK provider backed by a symmetric AWS KMS key. Build it with :meth:`open`."""

    def __init__(
        self,
        *,
        config: AwsKmsConfig,
        client: Any,
        key_arn: str,
        resilience: Resilience,
        stack: AsyncExitStack,
        version_ttl_s: float,
        rotate_timeout_s: float,
        rewrap_concurrency: int,
    ) -> None:
        self.config = config
        self._client = client
        self._key_arn = key_arn
        self.resilience = resilience
        self._stack = stack
        self._version_ttl_s = version_ttl_s
        self._rotate_timeout_s = rotate_timeout_s
        self._rewrap_concurrency = rewrap_concurrency
        self._version = 0
        self._version_read_at = float("-inf")

    @classmethod
    async def open(
        cls,
        config: AwsKmsConfig,
        *,
        policy: ResiliencePolicy | None = None,
        limiter: CallBudget | None = None,
        observer: CallObserver | None = None,
        version_ttl_s: float = 60.0,
        rotate_timeout_s: float = 600.0,
        rewrap_concurrency: int = 8,
    ) -> AwsKmsKek:
        """Connect, resolve the key's ARN and check that it can encrypt.

        Args:
            config: region, endpoint, credentials and key id.
            policy: timeouts, retries, breaker and rate budget (default :class:`ResiliencePolicy`).
            limiter: a rate budget shared with other providers of the same account and region.
            observer: metrics hooks.
            version_ttl_s: how long the KEK version (a ``ListKeyRotations`` count) is cached.
            rotate_timeout_s: how long :meth:`rotate` waits for KMS to complete a rotation.
            rewrap_concurrency: ``ReEncrypt`` requests in flight at once in :meth:`rewrap`.

        Raises:
            KekError: the key does not exist, is disabled or pending deletion, or access is denied.
            ConfigurationError: the key is not a symmetric encryption key.
            KekUnavailable: KMS cannot be reached.
        """
        policy = policy or ResiliencePolicy()
        target = f"aws-kms ({config.connection.region})"
        stack = AsyncExitStack()
        try:
            client = await open_aws_client(
                stack, "kms", config.connection, region=config.connection.region, timeout_s=policy.timeout_s
            )
            resilience = Resilience(
                "aws-kms", policy, aws_translator(target), target=target, limiter=limiter, observer=observer
            )
            described = await resilience.call(
                "describe_key", partial(client.describe_key, KeyId=config.key_id)
            )
            provider = cls(
                config=config,
                client=client,
                key_arn=_usable_key_arn(target, described["KeyMetadata"]),
                resilience=resilience,
                stack=stack,
                version_ttl_s=version_ttl_s,
                rotate_timeout_s=rotate_timeout_s,
                rewrap_concurrency=rewrap_concurrency,
            )
            await provider.current_version()
            return provider
        except BaseException:
            await stack.aclose()
            raise

    @property
    def name(self) -> str:
        return "aws-kms"

    @property
    def kek_id(self) -> str:
        """The KMS key ARN."""
        return self._key_arn

    async def _call(self, operation: str, request: partial[Any], *, retry: bool = True) -> Any:
        return await self.resilience.call(operation, request, retry=retry)

    async def _count_rotations(self) -> int:
        count = 0
        marker: str | None = None
        while True:
            kwargs: dict[str, Any] = {"KeyId": self._key_arn}
            if marker:
                kwargs["Marker"] = marker
            page = await self._call("list_key_rotations", partial(self._client.list_key_rotations, **kwargs))
            count += len(page.get("Rotations", []))
            marker = page.get("NextMarker")
            if not page.get("Truncated") or not marker:
                return count

    def _remember_version(self, version: int) -> int:
        # max(): the rotation count only grows; an eventually consistent read must not go back.
        self._version = max(self._version, version)
        self._version_read_at = asyncio.get_running_loop().time()
        return self._version

    async def current_version(self) -> int:
        """1 + the number of completed rotations of the key (cached for ``version_ttl_s``)."""
        if asyncio.get_running_loop().time() - self._version_read_at < self._version_ttl_s:
            return self._version
        return self._remember_version(1 + await self._count_rotations())

    def _check_response_key(self, key_id: object, operation: str, context: WrapContext) -> None:
        if key_id is not None and key_id not in (self._key_arn, self._key_arn.rsplit("/", 1)[-1]):
            raise KekError(
                f"aws-kms {operation}: the DEK for {context.scope} v{context.dek_version} belongs to "
                f"key {key_id}, not {self._key_arn}"
            )

    def _check_kek_id(self, wrapped: WrappedDek) -> None:
        foreign = foreign_kek("aws-kms", self._key_arn, wrapped)
        if foreign is not None:
            raise foreign
        if wrapped.kek_id != self._key_arn:
            raise KekError(
                f"aws-kms: DEK was wrapped by {wrapped.kek_id}, this provider uses {self._key_arn} "
                "(AWS_KMS_KEY_ID names another key)"
            )

    async def wrap(self, dek: bytes, context: WrapContext) -> WrappedDek:
        check_dek("aws-kms", dek)
        version = await self.current_version()
        response = await self._call(
            "encrypt",
            partial(
                self._client.encrypt,
                KeyId=self._key_arn,
                Plaintext=dek,
                EncryptionContext=context.as_encryption_context(),
            ),
        )
        return WrappedDek(kek_id=self._key_arn, kek_version=version, blob=bytes(response["CiphertextBlob"]))

    async def unwrap(self, wrapped: WrappedDek, context: WrapContext) -> bytes:
        self._check_kek_id(wrapped)
        try:
            response = await self._call(
                "decrypt",
                partial(
                    self._client.decrypt,
                    CiphertextBlob=wrapped.blob,
                    KeyId=self._key_arn,
                    EncryptionContext=context.as_encryption_context(),
                ),
            )
        except KekError as err:
            raise KekError(
                f"aws-kms: wrapped DEK for {context.scope} v{context.dek_version} does not unwrap "
                f"(wrapped for another scope or version, another key, or tampered): {err}"
            ) from err
        self._check_response_key(response.get("KeyId"), "unwrap", context)
        dek = bytes(response["Plaintext"])
        if len(dek) != DEK_BYTES:
            raise KekError(f"aws-kms: wrapped DEK for {context.scope} v{context.dek_version} is not a DEK")
        return dek

    async def rewrap(self, items: Sequence[tuple[WrappedDek, WrapContext]]) -> list[WrappedDek]:
        """``ReEncrypt`` each DEK under the key's current material, in order, server side."""
        for wrapped, _ in items:
            self._check_kek_id(wrapped)
        if not items:
            return []
        version = await self.current_version()
        limit = asyncio.Semaphore(self._rewrap_concurrency)

        async def one(wrapped: WrappedDek, context: WrapContext) -> WrappedDek:
            ec = context.as_encryption_context()
            request = partial(
                self._client.re_encrypt,
                CiphertextBlob=wrapped.blob,
                SourceKeyId=self._key_arn,
                SourceEncryptionContext=ec,
                DestinationKeyId=self._key_arn,
                DestinationEncryptionContext=ec,
            )
            async with limit:
                try:
                    response = await self._call("rewrap", request)
                except KekError as err:
                    raise KekError(
                        f"aws-kms: wrapped DEK for {context.scope} v{context.dek_version} "
                        f"does not rewrap: {err}"
                    ) from err
            # KMS refuses a SourceKeyId that does not match the blob; check it here too (moto
            # does not), so a DEK of another key is never adopted by a rewrap.
            self._check_response_key(response.get("SourceKeyId"), "rewrap", context)
            self._check_response_key(response.get("KeyId"), "rewrap", context)
            return WrappedDek(
                kek_id=self._key_arn, kek_version=version, blob=bytes(response["CiphertextBlob"])
            )

        # gather, not a TaskGroup: callers get the KekError itself, not an ExceptionGroup.
        tasks = [asyncio.ensure_future(one(wrapped, context)) for wrapped, context in items]
        try:
            return list(await asyncio.gather(*tasks))
        except BaseException:
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)
            raise

    async def latest_version(self) -> int:
        """1 + the number of completed rotations of the key, read from KMS now."""
        return self._remember_version(1 + await self._count_rotations())

    async def rotate(self) -> int:
        """Rotate the key material on demand and wait for it (see :meth:`rotate_from`)."""
        return await self.rotate_from(await self.latest_version())

    async def rotate_from(self, version: int) -> int:
        """Rotate the key material on demand from ``version``, wait until KMS completes it,
        and return the new version; a key already past ``version`` is not rotated again.

        If a rotation is already in progress (another process, or an interrupted run), it waits
        for that one instead of starting a second. ``RotateKeyOnDemand`` is sent once, never
        retried: a request that timed out may yet be carried out.

        Raises:
            KekError: on-demand rotations are exhausted for this key, or access is denied.
            KekUnavailable: KMS cannot be reached, or the rotation did not complete within
                ``rotate_timeout_s`` (call again with the same ``version``: it waits for the same
                rotation, or adopts it once completed).
        """
        counted = await self._count_rotations()
        if 1 + counted > version:
            return self._remember_version(1 + counted)
        # Version n is n - 1 completed rotations: wait until there are more than that.
        before = version - 1
        if not await self._rotation_in_progress():
            try:
                await self._call(
                    "rotate", partial(self._client.rotate_key_on_demand, KeyId=self._key_arn), retry=False
                )
            except KekError as err:
                if aws_error_code(err) != "ConflictException":  # a rotation started meanwhile: wait for it
                    raise
            except KekUnavailable:
                # Not retried (it would rotate twice). The request may still have been carried
                # out: wait for it only if KMS shows it, else let the caller retry.
                if not (await self._rotation_in_progress() or await self._count_rotations() > before):
                    raise
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self._rotate_timeout_s
        delay = 0.05
        while True:
            count = await self._count_rotations()
            if count > before:
                version = self._remember_version(1 + count)
                return version
            if loop.time() >= deadline:
                raise KekUnavailable(
                    f"aws-kms: rotation of {self._key_arn} has not completed "
                    f"after {self._rotate_timeout_s:g}s; "
                    "call rotate() again to keep waiting for it"
                )
            await asyncio.sleep(delay)
            delay = min(delay * 2, 5.0)

    async def _rotation_in_progress(self) -> bool:
        status = await self._call(
            "get_key_rotation_status", partial(self._client.get_key_rotation_status, KeyId=self._key_arn)
        )
        return bool(status.get("OnDemandRotationStartDate"))

    async def check(self) -> None:
        """Round-trip a random probe DEK through Encrypt and Decrypt."""
        probe = os.urandom(DEK_BYTES)
        if await self.unwrap(await self.wrap(probe, _PROBE_CONTEXT), _PROBE_CONTEXT) != probe:
            raise KekError(f"aws-kms: key {self._key_arn} failed its round trip")

    async def aclose(self) -> None:
        await self._stack.aclose()
