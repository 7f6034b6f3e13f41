"""ReLU ("standard") SAE: inference; the L1 training objective lives with the trainer."""

from __future__ import annotations

import torch

from sae_transfer.sae.base import SAE


class ReluSAE(SAE):
    """feats = ReLU(W_enc^T (x - b_dec) + b_enc)."""

    def activation(self, pre_BF: torch.Tensor) -> torch.Tensor:
        return torch.relu(pre_BF)
