"""SAE architectures: one small module per architecture behind the `SAE` interface."""

from sae_transfer.sae.base import SAE, SAEConfig

__all__ = ["SAE", "SAEConfig"]
