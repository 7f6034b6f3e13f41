"""The interface every SAE architecture implements, in SAELens 6's parameter layout."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
from torch import nn


@dataclass(frozen=True)
class SAEConfig:
    """Shape and inference-time behaviour of an SAE (mirrors SAELens 6 cfg.json fields)."""

    architecture: str  # "standard" (ReLU), "topk", "batchtopk", "jumprelu"
    d_in: int  # width of the hooked activation (d_model for resid hooks)
    d_sae: int  # number of features
    apply_b_dec_to_input: bool = True  # subtract b_dec before encoding (SAELens default for ReLU SAEs)
    k: int | None = None  # active features per token (topk); average per token (batchtopk, training only)
    dtype: str = "float32"
    metadata: dict = field(default_factory=dict)  # model_name, hook_name, context_size, ... (provenance)


class SAE(nn.Module):
    """x_BD -> feats_BF -> x_hat_BD. Parameters: W_enc [D,F], b_enc [F], W_dec [F,D], b_dec [D].

    Subclasses implement `activation(pre_BF)`; `encode`/`decode` are shared.
    """

    def __init__(self, cfg: SAEConfig):
        super().__init__()
        self.cfg = cfg
        d, f = cfg.d_in, cfg.d_sae
        self.W_enc = nn.Parameter(torch.zeros(d, f))
        self.b_enc = nn.Parameter(torch.zeros(f))
        self.W_dec = nn.Parameter(torch.zeros(f, d))
        self.b_dec = nn.Parameter(torch.zeros(d))

    @property
    def d_in(self) -> int:
        return self.cfg.d_in

    @property
    def d_sae(self) -> int:
        return self.cfg.d_sae

    def pre_acts(self, x_BD: torch.Tensor) -> torch.Tensor:
        """Encoder pre-activations [B, F], in the weights' dtype whatever x's (a bf16 batch
        into an fp32 SAE, or the other way round, is cast instead of failing in the matmul)."""
        x_BD = x_BD.to(self.W_enc.dtype)
        if self.cfg.apply_b_dec_to_input:
            x_BD = x_BD - self.b_dec
        return x_BD @ self.W_enc + self.b_enc

    def activation(self, pre_BF: torch.Tensor) -> torch.Tensor:  # pragma: no cover - abstract
        raise NotImplementedError

    def encode(self, x_BD: torch.Tensor) -> torch.Tensor:
        """Feature activations [B, F] (non-negative, sparse)."""
        return self.activation(self.pre_acts(x_BD))

    def decode(self, feats_BF: torch.Tensor) -> torch.Tensor:
        """Reconstruction [B, D] from feature activations (in the weights' dtype)."""
        return feats_BF.to(self.W_dec.dtype) @ self.W_dec + self.b_dec

    def forward(self, x_BD: torch.Tensor) -> torch.Tensor:
        """Reconstruction [B, D] of x_BD."""
        return self.decode(self.encode(x_BD))
