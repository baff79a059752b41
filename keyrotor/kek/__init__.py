"""KEK providers: the local keyring, AWS (KMS, Secrets Manager) and Vault/OpenBao transit."""

from keyrotor.kek.base import KekProvider, WrapContext, WrappedDek

__all__ = ["KekProvider", "WrapContext", "WrappedDek"]
