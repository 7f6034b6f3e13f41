"""SAE architectures: one small module per architecture behind the `SAE` interface.

Shape legend used across the package: B batch (tokens), D d_in (d_model for resid hooks),
F d_sae (features), K active features per token (TopK)."""

from sae_transfer.sae.base import SAE, SAEConfig
from sae_transfer.sae.batchtopk import BatchTopKSAE
from sae_transfer.sae.jumprelu import JumpReluSAE
from sae_transfer.sae.relu import ReluSAE
from sae_transfer.sae.topk import TopKSAE

# cfg.json `architecture` value -> class. "standard" is SAELens's name for the ReLU SAE.
ARCHITECTURES: dict[str, type[SAE]] = {
    "standard": ReluSAE,
    "topk": TopKSAE,
    "batchtopk": BatchTopKSAE,
    "jumprelu": JumpReluSAE,
}
# CLI names -> cfg.json names.
ARCH_ALIASES = {"relu": "standard", "standard": "standard", "topk": "topk", "batchtopk": "batchtopk", "jumprelu": "jumprelu"}


def make_sae(cfg: SAEConfig) -> SAE:
    """A zero-initialised SAE of `cfg.architecture` (any name in ARCH_ALIASES)."""
    name = ARCH_ALIASES.get(cfg.architecture)
    if name is None:
        raise ValueError(f"architecture={cfg.architecture!r}: use one of {sorted(ARCH_ALIASES)}")
    if name != cfg.architecture:
        cfg = SAEConfig(**{**cfg.__dict__, "architecture": name})
    return ARCHITECTURES[name](cfg)


__all__ = ["SAE", "SAEConfig", "ReluSAE", "TopKSAE", "BatchTopKSAE", "JumpReluSAE", "ARCHITECTURES", "make_sae"]
