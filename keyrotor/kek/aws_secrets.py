"""The AWS Secrets Manager KEK provider: KEK material kept in a secret, wrapping done locally.

The secret ``AWS_SECRET_ID`` holds the KEK versions as JSON, one secret version per KEK version
(the format, and the wrapping, are :mod:`keyrotor.kek.aws_secret_material`)::

    {"version": 3, "key": "<base64 of 32 random bytes>"}

``AWSCURRENT`` wraps new DEKs; ``AWSPREVIOUS`` (and any older version that Secrets Manager still
keeps, looked up by its deterministic ``VersionId``) still unwraps. ``kek_id`` is
``aws-sm:<secret name>`` and ``kek_version`` the JSON's ``version``. Fetched material is cached
for ``cache_ttl_s`` (default 5 minutes), so a revoked version stops working within that time.

Rotation (:meth:`AwsSecretsKek.rotate`) follows Secrets Manager's own protocol, so an
interrupted run can be finished by the next one:

1. put version n+1 with the label ``AWSPENDING`` and ``ClientRequestToken`` =
   uuid5(name, n+1), so a repeated request is idempotent and the version can be found later;
2. test it: read it back and round-trip a probe through it;
3. move ``AWSCURRENT`` to it (Secrets Manager moves ``AWSPREVIOUS`` to the old one by itself),
   then remove ``AWSPENDING``.

A run that finds an ``AWSPENDING`` left behind finishes it if it holds version n+1, and
otherwise removes the label (rolls it back) and starts afresh; ``AWSPENDING`` still on the
``AWSCURRENT`` version means a run died at its last step, which is then completed.

Failover: reads go to the primary region first, then to each region of
``AWS_SECRETS_FAILOVER_REGIONS`` when the previous one is unavailable
(:mod:`keyrotor.kek.aws_secret_regions`). Rotation writes only to the primary: replicas are
read-only.

Create the secret once with :func:`~keyrotor.kek.aws_secret_material.new_secret_string` (the
command is in ``docs/providers.md``).

moto note: moto (server mode) keeps replicas in step with the primary and supports version
stages, ``UpdateSecretVersionStage`` and ``GetSecretValue`` by ``VersionId``. Unlike AWS, it
silently overwrites a version that has ``AWSPENDING`` when ``PutSecretValue`` reuses its token
(AWS refuses new content under a used token), which is why :meth:`~AwsSecretsKek.rotate`
finishes or rolls back an existing ``AWSPENDING`` before it puts anything.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Mapping, Sequence
from contextlib import AsyncExitStack
from dataclasses import dataclass, field
from typing import Any

import structlog
from cryptography.exceptions import InvalidTag

from keyrotor.errors import KekError
from keyrotor.kek.aws_client import AwsConnection, aws_error_code, check_region
from keyrotor.kek.aws_secret_material import (
    NONCE_BYTES,
    WRAPPED_BYTES,
    Material,
    new_secret_string,
    parse_material,
    rotation_token,
)
from keyrotor.kek.aws_secret_regions import SecretRegion, open_regions, read_first
from keyrotor.kek.base import DEK_BYTES, WrapContext, WrappedDek, check_dek, foreign_kek
from keyrotor.kek.environ import env_required, env_value
from keyrotor.kek.metrics import CallObserver, PrometheusObserver
from keyrotor.kek.resilience import CallBudget, ResiliencePolicy

log = structlog.get_logger(__name__)

CURRENT = "AWSCURRENT"
PREVIOUS = "AWSPREVIOUS"
PENDING = "AWSPENDING"
_PROBE_CONTEXT = WrapContext("keyrotor/health", 1)


@dataclass(frozen=True)
class AwsSecretsConfig:
    """Configuration of the Secrets Manager provider.

    ``region_endpoint_urls`` overrides the endpoint per region (tests, VPC endpoints); it is not
    read from the environment. ``cache_ttl_s``: how long fetched material is reused.
    """

    connection: AwsConnection
    secret_id: str
    failover_regions: tuple[str, ...] = ()
    region_endpoint_urls: Mapping[str, str] = field(default_factory=dict)
    cache_ttl_s: float = 300.0

    @classmethod
    def from_env(cls, environ: Mapping[str, str]) -> AwsSecretsConfig:
        """Read ``AWS_SECRET_ID``, ``AWS_SECRETS_FAILOVER_REGIONS`` and the :class:`AwsConnection` variables.

        Raises:
            ConfigurationError: naming the missing variable.
        """
        secret_id = env_required(environ, "AWS_SECRET_ID")
        connection = AwsConnection.from_env(environ)
        failover: list[str] = []
        for region in (env_value(environ, "AWS_SECRETS_FAILOVER_REGIONS") or "").split(","):
            region = region.strip()
            if region:
                check_region(region, "AWS_SECRETS_FAILOVER_REGIONS")
            if region and region != connection.region and region not in failover:
                failover.append(region)
        return cls(connection=connection, secret_id=secret_id, failover_regions=tuple(failover))

    @property
    def regions(self) -> tuple[str, ...]:
        """The primary region, then the failover regions in order."""
        return (self.connection.region, *self.failover_regions)


class AwsSecretsKek:
    """KEK provider whose material lives in a Secrets Manager secret. Build it with :meth:`open`."""

    def __init__(
        self,
        *,
        config: AwsSecretsConfig,
        regions: list[SecretRegion],
        stack: AsyncExitStack,
        observer: CallObserver,
        clock: Callable[[], float] = time.monotonic,
        random: Callable[[int], bytes] = os.urandom,
    ) -> None:
        self.config = config
        self._regions = regions
        self._stack = stack
        self._observer = observer
        self._clock = clock
        self._random = random
        self._secret_name = ""
        self._materials: dict[int, tuple[Material, float]] = {}
        self._current: tuple[int, float] | None = None

    @classmethod
    async def open(
        cls,
        config: AwsSecretsConfig,
        *,
        policy: ResiliencePolicy | None = None,
        limiter: CallBudget | None = None,
        observer: CallObserver | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> AwsSecretsKek:
        """Connect to every region and read the current KEK version.

        Args:
            config: regions, endpoints, credentials and secret id.
            policy: timeouts, retries, breaker and rate budget, applied per region.
            limiter: one rate budget for every region (default: one per region from ``policy``).
            observer: metrics hooks.
            clock: the material cache's clock (tests pass a fake one).

        Raises:
            KekError: the secret does not exist, is not KEK material, or access is denied.
            KekUnavailable: no region can be reached.
        """
        policy = policy or ResiliencePolicy()
        observer = observer or PrometheusObserver()
        stack = AsyncExitStack()
        try:
            regions = await open_regions(
                stack,
                config.connection,
                config.secret_id,
                config.regions,
                config.region_endpoint_urls,
                policy=policy,
                limiter=limiter,
                observer=observer,
            )
            provider = cls(config=config, regions=regions, stack=stack, observer=observer, clock=clock)
            await provider.current_version()
            return provider
        except BaseException:
            await stack.aclose()
            raise

    @property
    def name(self) -> str:
        return "aws-sm"

    @property
    def kek_id(self) -> str:
        """``aws-sm:<secret name>`` (the same in every region)."""
        return f"aws-sm:{self._secret_name}"

    @property
    def primary(self) -> SecretRegion:
        return self._regions[0]

    # --- reading material ---------------------------------------------------------------

    def _parse(self, response: Mapping[str, Any], where: str) -> Material:
        self._secret_name = self._secret_name or str(response.get("Name") or self.config.secret_id)
        return parse_material(response, f"aws-sm: secret {self._secret_name} ({where})")

    async def _fetch(self, where: str, **selector: str) -> Material:
        """GetSecretValue (with failover), parsed and cached."""
        return self._remember(self._parse(await self._fetch_response(where, **selector), where))

    async def _fetch_response(self, where: str, **selector: str) -> Mapping[str, Any]:
        return await read_first(self._regions, self._observer, self.config.secret_id, where, **selector)

    def _remember(self, material: Material) -> Material:
        self._materials[material.version] = (material, self._clock())
        return material

    def _cached(self, version: int) -> Material | None:
        entry = self._materials.get(version)
        if entry is None:
            return None
        material, fetched_at = entry
        if self._clock() - fetched_at >= self.config.cache_ttl_s:
            del self._materials[version]
            return None
        return material

    async def _current_material(self) -> Material:
        if self._current is not None:
            version, read_at = self._current
            material = self._cached(version)
            if material is not None and self._clock() - read_at < self.config.cache_ttl_s:
                return material
        material = await self._fetch(CURRENT, VersionStage=CURRENT)
        self._current = (material.version, self._clock())
        return material

    async def _material(self, version: int) -> Material:
        cached = self._cached(version)
        if cached is not None:
            return cached
        for stage in (CURRENT, PREVIOUS):
            try:
                material = await self._fetch(stage, VersionStage=stage)
            except KekError as err:
                if aws_error_code(err) == "ResourceNotFoundException":  # e.g. no AWSPREVIOUS yet
                    continue
                raise
            if stage == CURRENT:
                self._current = (material.version, self._clock())
            if material.version == version:
                return material
        # Older versions made by rotate() have a deterministic VersionId; AWS keeps unlabelled
        # versions for a while (up to ~100 versions) before it deletes them.
        token = rotation_token(self._secret_name, version)
        try:
            response = await self._fetch_response(f"v{version}", VersionId=token)
        except KekError as err:
            if aws_error_code(err) not in {"ResourceNotFoundException", "InvalidRequestException"}:
                raise
            raise KekError(
                f"aws-sm: KEK version {version} of secret {self._secret_name} is no longer available "
                "(neither AWSCURRENT nor AWSPREVIOUS, and no version with its VersionId)"
            ) from err
        material = self._parse(response, f"v{version}")
        if material.version != version:
            raise KekError(
                f"aws-sm: secret {self._secret_name} version {token} "
                f"holds KEK v{material.version}, not v{version}"
            )
        return self._remember(material)

    # --- the Protocol ------------------------------------------------------------------------

    async def current_version(self) -> int:
        return (await self._current_material()).version

    def _seal(self, material: Material, dek: bytes, context: WrapContext) -> WrappedDek:
        blob = material.seal(dek, context, self._random(NONCE_BYTES))
        return WrappedDek(kek_id=self.kek_id, kek_version=material.version, blob=blob)

    async def wrap(self, dek: bytes, context: WrapContext) -> WrappedDek:
        check_dek("aws-sm", dek)
        return self._seal(await self._current_material(), dek, context)

    async def unwrap(self, wrapped: WrappedDek, context: WrapContext) -> bytes:
        foreign = foreign_kek("aws-sm", self.kek_id, wrapped)
        if foreign is not None:
            raise foreign
        if wrapped.kek_id != self.kek_id:
            raise KekError(
                f"aws-sm: DEK was wrapped by {wrapped.kek_id}, this provider uses {self.kek_id} "
                "(AWS_SECRET_ID names another secret)"
            )
        if len(wrapped.blob) != WRAPPED_BYTES:
            raise KekError(f"aws-sm: wrapped DEK for {context.scope} v{context.dek_version} is malformed")
        material = await self._material(wrapped.kek_version)
        try:
            return material.open(wrapped.blob, context)
        except InvalidTag as exc:
            raise KekError(
                f"aws-sm: wrapped DEK for {context.scope} v{context.dek_version} does not unwrap "
                f"with KEK v{wrapped.kek_version} (wrapped for another scope or version, or tampered)"
            ) from exc

    async def rewrap(self, items: Sequence[tuple[WrappedDek, WrapContext]]) -> list[WrappedDek]:
        """Unwrap and wrap again under AWSCURRENT, locally (Secrets Manager has no server-side rewrap)."""
        current = await self._current_material()
        return [
            self._seal(current, await self.unwrap(wrapped, context), context) for wrapped, context in items
        ]

    async def check(self) -> None:
        """Fetch AWSCURRENT (bypassing the cache) and round-trip a probe through it."""
        material = await self._fetch(CURRENT, VersionStage=CURRENT)
        self._current = (material.version, self._clock())
        self._probe(material)

    async def aclose(self) -> None:
        await self._stack.aclose()

    # --- rotation ------------------------------------------------------------------------------

    def _probe(self, material: Material) -> None:
        probe = self._random(DEK_BYTES)
        if not material.round_trips(probe, _PROBE_CONTEXT, self._random(NONCE_BYTES)):
            raise KekError(
                f"aws-sm: KEK v{material.version} of secret {self._secret_name} failed its round trip"
            )

    async def _primary_get(self, where: str, **selector: str) -> Material:
        # Rotation reads the primary only: a replica may lag behind it. Not cached: a pending
        # version may yet be rolled back, and must never stand in for the real version n+1.
        return self._parse(await self.primary.get(**selector), where)

    async def _stages(self) -> dict[str, list[str]]:
        """VersionId -> staging labels, for every labelled version."""
        stages: dict[str, list[str]] = {}
        token: str | None = None
        while True:
            extra = {"NextToken": token} if token else {}
            page = await self.primary.call("list_secret_version_ids", "list_secret_version_ids", **extra)
            for version in page.get("Versions", []):
                stages[str(version["VersionId"])] = list(version.get("VersionStages") or [])
            token = page.get("NextToken")
            if not token:
                return stages

    async def _move_stage(
        self, stage: str, *, remove_from: str | None = None, move_to: str | None = None
    ) -> None:
        kwargs: dict[str, str] = {"VersionStage": stage}
        if remove_from:
            kwargs["RemoveFromVersionId"] = remove_from
        if move_to:
            kwargs["MoveToVersionId"] = move_to
        await self.primary.call("update_secret_version_stage", "update_secret_version_stage", **kwargs)

    async def latest_version(self) -> int:
        """The KEK version of the primary region's ``AWSCURRENT``, read now; wraps use it from
        now on (it replaces the cached one)."""
        return self._promoted(await self._primary_get(CURRENT, VersionStage=CURRENT))

    async def rotate(self) -> int:
        """Create KEK version n+1, test it, make it AWSCURRENT, return n+1.

        Finishes or rolls back an ``AWSPENDING`` version left by an interrupted run (see the
        module docstring). Writes go to the primary region only.

        Raises:
            KekUnavailable: the primary region is unavailable.
            KekError: access denied, or the secret's versions are not keyrotor KEK material.
        """
        return await self._rotate(None)

    async def rotate_from(self, version: int) -> int:
        """Like :meth:`rotate`, but a secret whose ``AWSCURRENT`` is past ``version`` already
        is not rotated again: an earlier attempt whose last answer was lost (say, the final
        label move timed out after it was made) did it."""
        return await self._rotate(version)

    async def _rotate(self, since: int | None) -> int:
        stages = await self._stages()
        current_ids = [vid for vid, labels in stages.items() if CURRENT in labels]
        if not current_ids:
            raise KekError(f"aws-sm: secret {self.config.secret_id} has no AWSCURRENT version")
        current_id = current_ids[0]
        pending_id = next((vid for vid, labels in stages.items() if PENDING in labels), None)
        current = await self._primary_get(CURRENT, VersionId=current_id)

        if pending_id == current_id:
            # A run died after promoting its version: only the clean-up is left.
            await self._move_stage(PENDING, remove_from=current_id)
            log.info("kek_rotation_resumed", provider="aws-sm", step="cleanup", version=current.version)
            return self._promoted(current)
        if since is not None and current.version > since:
            return self._promoted(current)

        target = current.version + 1
        if pending_id is not None:
            resumed = await self._resume_pending(pending_id, current_id, target)
            if resumed is not None:
                return resumed
        return await self._finish(await self._put_pending(target), current_id)

    async def _resume_pending(self, pending_id: str, current_id: str, target: int) -> int | None:
        """Finish the ``AWSPENDING`` version an interrupted run left if it holds ``target``
        (returns it), else roll it back (returns None)."""
        pending: Material | None
        try:
            pending = await self._primary_get(PENDING, VersionId=pending_id)
        except KekError:
            pending = None  # not KEK material: roll it back
        if pending is not None and pending.version == target:
            log.info("kek_rotation_resumed", provider="aws-sm", step="promote", version=target)
            return await self._finish(pending, current_id)
        await self._move_stage(PENDING, remove_from=pending_id)
        log.warning(
            "kek_pending_rolled_back",
            provider="aws-sm",
            version_id=pending_id,
            found_version=pending.version if pending else None,
            expected_version=target,
        )
        return None

    async def _put_pending(self, target: int) -> Material:
        """Put KEK version ``target`` as ``AWSPENDING`` (idempotent by its token) and read it back."""
        token = rotation_token(self._secret_name, target)
        try:
            await self.primary.call(
                "put_secret_value",
                "put_secret_value",
                ClientRequestToken=token,
                SecretString=new_secret_string(target, random=self._random),
                VersionStages=[PENDING],
            )
        except KekError as err:
            if aws_error_code(err) != "ResourceExistsException":
                raise
            # This token's version exists already (a run died after its put and its label was
            # removed since): reuse it, it holds version n+1 if it is ours.
            await self._move_stage(PENDING, move_to=token)
        pending = await self._primary_get(PENDING, VersionId=token)
        if pending.version != target:
            raise KekError(
                f"aws-sm: version {token} of secret {self._secret_name} holds KEK v{pending.version}, "
                f"expected v{target}"
            )
        return pending

    async def _finish(self, pending: Material, current_id: str) -> int:
        self._probe(pending)  # test: the stored material, as read back, round-trips
        try:
            await self._move_stage(CURRENT, move_to=pending.version_id, remove_from=current_id)
        except KekError:
            # Another process may have promoted it first; anything else is a real failure.
            if CURRENT not in (await self._stages()).get(pending.version_id, []):
                raise
        await self._move_stage(PENDING, remove_from=pending.version_id)
        log.info("kek_rotated", provider="aws-sm", version=pending.version)
        return self._promoted(pending)

    def _promoted(self, material: Material) -> int:
        self._remember(material)
        self._current = (material.version, self._clock())
        return material.version
