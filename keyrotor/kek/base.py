"""The KEK provider interface.

A KEK (key-encryption key) wraps DEKs. It lives in a provider: the local keyring (derived from
``ENCRYPTION_KEY``), AWS KMS, AWS Secrets Manager or a Vault/OpenBao transit engine. Every
provider implements :class:`KekProvider`; nothing else in keyrotor knows which one it talks to.

Each wrap binds the DEK to its scope and version (:class:`WrapContext`) as AAD or as the
provider's encryption context, so a wrapped DEK copied to another scope or version does not
unwrap.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Protocol, runtime_checkable

from keyrotor.errors import KekError

DEK_BYTES = 32


def check_dek(provider: str, dek: bytes) -> None:
    """Refuse to wrap anything but a 32-byte DEK (KekError; the message names the type and
    length, never the value)."""
    # Checked before any client sees it: a 32-character str would be wrapped as its UTF-8 text,
    # and botocore would quote a list of 32 ints in its validation error.
    if not isinstance(dek, bytes | bytearray):
        raise KekError(f"{provider}: refusing to wrap a DEK of type {type(dek).__name__} (need bytes)")
    if len(dek) != DEK_BYTES:
        raise KekError(f"{provider}: refusing to wrap a DEK of {len(dek)} bytes (need {DEK_BYTES})")


@dataclass(frozen=True, slots=True)
class WrapContext:
    """What a wrapped DEK is bound to: its scope and its DEK version."""

    scope: str
    dek_version: int

    def as_aad(self) -> bytes:
        """Unambiguous bytes for AAD: length-prefixed fields."""
        scope = self.scope.encode()
        return (
            b"keyrotor/dek\x00" + len(scope).to_bytes(4, "big") + scope + self.dek_version.to_bytes(8, "big")
        )

    def as_encryption_context(self) -> dict[str, str]:
        """The same binding as a KMS/transit encryption context."""
        return {"keyrotor:scope": self.scope, "keyrotor:dek_version": str(self.dek_version)}


@dataclass(frozen=True, slots=True)
class WrappedDek:
    """A DEK encrypted under a KEK. ``blob`` is opaque to everyone but its provider.

    ``kek_id`` names the provider and key (e.g. ``local:3f9c…`` or a KMS key ARN) and
    ``kek_version`` the KEK version that wrapped it, so `rotate_kek` can find what to rewrap.
    """

    kek_id: str
    kek_version: int
    blob: bytes = field(repr=False)


@runtime_checkable
class KekProvider(Protocol):
    """A source of KEKs. All methods are async and may raise:

    - :class:`keyrotor.errors.KekUnavailable` (transient: the provider cannot be reached),
    - :class:`keyrotor.errors.KekError` (permanent: wrong key, wrong context, disabled key),
    - :class:`keyrotor.errors.ConfigurationError` (the provider is misconfigured).
    """

    @property
    def name(self) -> str:
        """Short provider name for logs, metrics and status: ``local``, ``aws-kms``, ``aws-sm``, ``vault``."""
        ...

    async def current_version(self) -> int:
        """Return the KEK version new wraps use."""
        ...

    async def wrap(self, dek: bytes, context: WrapContext) -> WrappedDek:
        """Wrap a DEK under the current KEK version, bound to ``context``."""
        ...

    async def unwrap(self, wrapped: WrappedDek, context: WrapContext) -> bytes:
        """Unwrap a DEK. Raises KekError if it was wrapped for another context or key."""
        ...

    async def rewrap(self, items: Sequence[tuple[WrappedDek, WrapContext]]) -> list[WrappedDek]:
        """Rewrap DEKs under the current KEK version, in order, server-side where possible."""
        ...

    async def rotate(self) -> int:
        """Create a new KEK version, make it current, and return its number."""
        ...

    async def check(self) -> None:
        """Prove the provider works now (round-trip a probe). Raises on any failure."""
        ...

    async def aclose(self) -> None:
        """Release clients and connections."""
        ...


@runtime_checkable
class RetiresKekVersions(Protocol):
    """A provider that can refuse to unwrap with old KEK versions (Vault transit's
    ``min_decryption_version``). ``rotate_kek`` uses it once no DEK needs them any more."""

    @property
    def kek_id(self) -> str:
        """The ``kek_id`` of the DEKs this provider wraps."""
        ...

    async def min_decryption_version(self) -> int:
        """The lowest KEK version the provider still unwraps with."""
        ...

    async def raise_min_decryption_version(self, version: int) -> int | None:
        """Refuse KEK versions below ``version`` from now on; never lowers it.

        Returns the previous minimum, or None if nothing changed.
        """
        ...


@runtime_checkable
class RotatesFromVersion(Protocol):
    """A remote provider whose rotation a retry can make safe.

    A rotate request that times out may still be carried out by the provider, late; a blind
    retry would then rotate twice (an extra KEK version). ``rotate_kek`` reads
    :meth:`latest_version` and records it on its run before it asks for a rotation, and every
    attempt asks with :meth:`rotate_from` that recorded version: a key already past it was
    rotated by an earlier attempt, and that version is adopted.
    """

    async def latest_version(self) -> int:
        """The KEK's latest version, read from the provider now (never from a cache); the
        provider's own cached version is replaced by it."""
        ...

    async def rotate_from(self, version: int) -> int:
        """Make ``version + 1`` current, unless the KEK is already past ``version``.

        Returns:
            The KEK's latest version: the one this call made, or the one already past ``version``.
        """
        ...


def provider_layers(kek: object) -> list[object]:
    """``kek`` and the providers it delegates to: a rate budget's ``inner`` provider, a routing
    provider's ``primary`` (outermost first)."""
    out: list[object] = [kek]
    while True:
        inner = getattr(out[-1], "inner", None) or getattr(out[-1], "primary", None)
        # Only providers: AwsSecretsKek.primary, for one, is a region, not a provider.
        if not isinstance(inner, KekProvider) or inner in out:
            return out
        out.append(inner)


# The KEK provider a kek_id belongs to, by its form (see each provider's module docstring).
PROVIDER_SETTING = {"local": "local", "aws-kms": "aws", "aws-sm": "aws", "vault": "vault"}


def provider_of(kek_id: str) -> str:
    """The provider name (``local``, ``aws-kms``, ``aws-sm``, ``vault``) a ``kek_id`` belongs to.

    ``unknown`` for an id of none of them (e.g. written by a newer keyrotor).
    """
    if kek_id.startswith("local:"):
        return "local"
    if kek_id.startswith("aws-sm:"):
        return "aws-sm"
    if kek_id.startswith("vault:"):
        return "vault"
    if kek_id.startswith("arn:") and ":kms:" in kek_id:
        return "aws-kms"
    return "unknown"


class ForeignKek(KekError):
    """The DEK was wrapped by another KEK provider than the one this process is configured with."""


def foreign_kek(own_provider: str, own_kek_id: str, wrapped: WrappedDek) -> ForeignKek | None:
    """The error for a DEK that another *provider* wrapped, or None if it is this provider's kind.

    During and after a provider migration (``keyrotor kek migrate``) a process configured with
    provider B can meet a DEK still wrapped by provider A: that is a configuration problem, and
    the message names both providers and what to do, instead of a generic unwrap failure.
    """
    other = provider_of(wrapped.kek_id)
    if other == own_provider:
        return None
    if other == "unknown":
        return ForeignKek(
            f"DEK was wrapped by an unknown KEK provider ({wrapped.kek_id}, KEK version "
            f"{wrapped.kek_version}); this process is configured with {own_provider} ({own_kek_id})"
        )
    setting = PROVIDER_SETTING.get(other, other)
    return ForeignKek(
        f"DEK was wrapped by the {other} KEK provider ({wrapped.kek_id}, KEK version {wrapped.kek_version}), "
        f"but this process is configured with {own_provider} ({own_kek_id}): finish the migration "
        f"(`keyrotor kek migrate --from {setting} --to {PROVIDER_SETTING.get(own_provider, own_provider)}`) "
        f"or run with SECRETS_PROVIDER={setting} and its configuration"
    )
