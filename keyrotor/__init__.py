"""keyrotor: envelope encryption for AI-provider API keys, with key rotation.

The public surface: :class:`KeyManager` (encrypt and decrypt), :class:`KeyrotorClient` (ask the
workers for rotations), :class:`Settings` and the errors in :mod:`keyrotor.errors`.
"""

from keyrotor.errors import KeyrotorError, PermanentError, TransientError
from keyrotor.keys import KeyManager
from keyrotor.queue.client import KeyrotorClient
from keyrotor.settings import Settings

__all__ = ["KeyManager", "KeyrotorClient", "KeyrotorError", "PermanentError", "Settings", "TransientError"]
__version__ = "0.1.0"
