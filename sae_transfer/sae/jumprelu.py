"""JumpReLU SAE (Rajamanoharan et al. 2024): a feature is active only above its own threshold."""

from __future__ import annotations

import torch
from torch import nn

from sae_transfer.sae.base import SAE, SAEConfig


class JumpReluSAE(SAE):
    """feats = pre · 1[pre > threshold]; `threshold` [F] is saved as SAELens's `threshold` key.

    BatchTopK SAEs are saved in this form too, with their learned global threshold."""

    def __init__(self, cfg: SAEConfig):
        super().__init__(cfg)
        self.threshold = nn.Parameter(torch.zeros(cfg.d_sae))

    def activation(self, pre_BF: torch.Tensor) -> torch.Tensor:
        return pre_BF * (pre_BF > self.threshold)
