"""The KEK material a Secrets Manager secret holds, and the wrapping done with it.

Each secret version is the JSON ``{"version": n, "key": "<base64 of 32 random bytes>"}``; the
version that :meth:`~keyrotor.kek.aws_secrets.AwsSecretsKek.rotate` writes for KEK version n
has a deterministic ``VersionId`` (:func:`rotation_token`), so it can be found again after its
label has moved on. A wrapped DEK is ``nonce(12) || AES-256-GCM(key, nonce, dek,
aad=WrapContext.as_aad())``, as in the local keyring.
"""

from __future__ import annotations

import base64
import binascii
import json
import os
import uuid
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from cryptography.exceptions import InvalidTag
from cryptography.hazmat.primitives.ciphers.aead import AESGCM

from keyrotor.errors import KekError
from keyrotor.kek.base import DEK_BYTES, WrapContext

NONCE_BYTES = 12
WRAPPED_BYTES = NONCE_BYTES + DEK_BYTES + 16
_TOKEN_NAMESPACE = uuid.UUID("6d0b3c4e-4f55-4b7c-9a55-0c1f3b3e7a11")


def new_secret_string(version: int = 1, *, random: Callable[[int], bytes] = os.urandom) -> str:
    """The JSON of a fresh KEK version: ``{"version": n, "key": base64 of 32 random bytes}``."""
    return json.dumps({"version": version, "key": base64.b64encode(random(32)).decode()})


def rotation_token(secret_name: str, version: int) -> str:
    """The ``ClientRequestToken`` (= ``VersionId``) of KEK version ``version`` of a secret."""
    return str(uuid.uuid5(_TOKEN_NAMESPACE, f"keyrotor/aws-sm/{secret_name}/v{version}"))


@dataclass(frozen=True)
class Material:
    """One KEK version read from the secret: its number, its ``VersionId`` and its key."""

    version: int
    version_id: str
    key: bytes = field(repr=False)

    def seal(self, dek: bytes, context: WrapContext, nonce: bytes) -> bytes:
        """The wrapped DEK: ``nonce || AES-256-GCM(key, nonce, dek, aad)``."""
        return nonce + AESGCM(self.key).encrypt(nonce, dek, context.as_aad())

    def open(self, blob: bytes, context: WrapContext) -> bytes:
        """The DEK of a wrapped DEK. Raises InvalidTag if it was sealed for another context or key."""
        return AESGCM(self.key).decrypt(blob[:NONCE_BYTES], blob[NONCE_BYTES:], context.as_aad())

    def round_trips(self, probe: bytes, context: WrapContext, nonce: bytes) -> bool:
        """Whether a probe sealed with this material opens to itself."""
        try:
            return self.open(self.seal(probe, context, nonce), context) == probe
        except InvalidTag:
            return False


def parse_material(response: Mapping[str, Any], what: str) -> Material:
    """The KEK material of a ``GetSecretValue`` response; ``what`` names the secret in errors.

    Raises:
        KekError: the secret string is not keyrotor KEK material (the message names the shape,
            never the content).
    """
    try:
        document = json.loads(response["SecretString"])
        version = document["version"]
        key = base64.b64decode(document["key"], validate=True)
        shaped = True
    except (KeyError, TypeError, ValueError, binascii.Error, RecursionError):
        # RecursionError: JSON nested deeper than the parser recurses (a secret holds 64 KB).
        shaped = False
    if not shaped:
        # Name the shape, never the content: it is key material. Raised outside the except block
        # so that the parser's error is neither the cause nor the context (a JSONDecodeError
        # holds the whole secret string in its ``doc``).
        raise KekError(
            f'{what} is not keyrotor KEK material (want JSON {{"version": n, "key": base64 of 32 bytes}})'
        )
    if not isinstance(version, int) or isinstance(version, bool) or version < 1:
        raise KekError(f"{what}: 'version' must be an integer >= 1")
    if len(key) != 32:
        raise KekError(f"{what}: 'key' must be 32 bytes, has {len(key)}")
    return Material(version=version, version_id=str(response.get("VersionId") or ""), key=key)
