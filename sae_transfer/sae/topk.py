"""TopK SAE (Gao et al. 2024): each token keeps its k largest pre-activations."""

from __future__ import annotations

import torch
import torch.nn.functional as F_nn

from sae_transfer.sae.base import SAE, SAEConfig


class TopKSAE(SAE):
    """feats = ReLU(TopK_k(pre)), zeros elsewhere. `encode_sparse`/`decode_sparse` keep only
    the k active rows, so the decoder costs B·k·D instead of B·F·D."""

    def __init__(self, cfg: SAEConfig):
        super().__init__(cfg)
        if not cfg.k or cfg.k < 1 or cfg.k > cfg.d_sae:
            raise ValueError(f"k={cfg.k}: topk needs 1 <= k <= d_sae ({cfg.d_sae}); pass k")

    def encode_sparse(self, x_BD: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(values [B, K] >= 0, feature indices [B, K]) of the k active features per token."""
        vals_BK, idx_BK = self.pre_acts(x_BD).topk(self.cfg.k, dim=-1, sorted=False)
        return torch.relu(vals_BK), idx_BK

    def decode_sparse(self, vals_BK: torch.Tensor, idx_BK: torch.Tensor) -> torch.Tensor:
        """Reconstruction [B, D] from the active rows of W_dec only (embedding_bag, sum mode)."""
        out_BD = F_nn.embedding_bag(idx_BK, self.W_dec, per_sample_weights=vals_BK.to(self.W_dec.dtype), mode="sum")
        return out_BD + self.b_dec

    def activation(self, pre_BF: torch.Tensor) -> torch.Tensor:
        vals_BK, idx_BK = pre_BF.topk(self.cfg.k, dim=-1, sorted=False)
        return torch.zeros_like(pre_BF).scatter_(-1, idx_BK, torch.relu(vals_BK))

    def forward(self, x_BD: torch.Tensor) -> torch.Tensor:
        return self.decode_sparse(*self.encode_sparse(x_BD))
