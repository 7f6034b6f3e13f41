"""BatchTopK SAE (Bussmann et al. 2024): the batch keeps its N·k largest activations overall,
N the number of tokens in it (B for [B, F] input, B·S for [B, S, F]).

During training the selection is batch-level; for inference the SAE is a JumpReLU whose
threshold is the running estimate of the smallest kept activation (`threshold` buffer)."""

from __future__ import annotations

import torch

from sae_transfer.sae.base import SAE, SAEConfig
from sae_transfer.sae.jumprelu import JumpReluSAE


class BatchTopKSAE(SAE):
    """Training-time form. `activation` keeps the N·k largest ReLU pre-activations of the batch
    (N tokens), so the mean number of active features per token is k."""

    def __init__(self, cfg: SAEConfig):
        super().__init__(cfg)
        if not cfg.k or cfg.k < 1:
            raise ValueError(f"k={cfg.k}: batchtopk needs k >= 1 (mean active features per token)")
        # Running mean of the smallest kept activation; -1 means "not estimated yet".
        self.register_buffer("threshold", torch.tensor(-1.0))

    def activation(self, pre_F: torch.Tensor) -> torch.Tensor:
        """Feature activations, same shape as `pre_F` ([..., F]): every leading dim is tokens."""
        relu_F = torch.relu(pre_F)
        n_tokens = relu_F.numel() // relu_F.shape[-1]
        n_keep = min(self.cfg.k * n_tokens, relu_F.numel())
        vals_N, idx_N = relu_F.flatten().topk(n_keep, sorted=False)
        return torch.zeros_like(relu_F).flatten().scatter_(0, idx_N, vals_N).view_as(relu_F)

    def to_jumprelu(self) -> JumpReluSAE:
        """The inference SAE: same weights, every feature's threshold = the learned global one."""
        cfg = SAEConfig(**{**self.cfg.__dict__, "architecture": "jumprelu"})
        out = JumpReluSAE(cfg)
        with torch.no_grad():
            for name in ("W_enc", "b_enc", "W_dec", "b_dec"):
                getattr(out, name).copy_(getattr(self, name))
            out.threshold.fill_(max(float(self.threshold), 0.0))
        return out
