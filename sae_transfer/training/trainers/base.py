"""The interface every per-architecture trainer implements; the shared loop only uses this."""

from __future__ import annotations

from dataclasses import dataclass

import torch

from sae_transfer.sae import SAE
from sae_transfer.training.config import TrainConfig


@dataclass
class StepLoss:
    """What one training step's forward pass produced (tensors are 0-d unless noted)."""

    loss: torch.Tensor  # total objective (has grad)
    mse: torch.Tensor  # mean over tokens of Σ_d (x − x̂)², scaled units (detached)
    sparsity: torch.Tensor  # the sparsity term before its coefficient (detached; 0 for topk)
    x_hat_BD: torch.Tensor  # reconstruction (detached)
    fired_F: torch.Tensor  # bool [F]: latent fired on some token of the batch
    fire_count_F: torch.Tensor | None  # tokens on which each latent fired (only when detail=True)
    grads_done: bool = False  # True when the trainer already set every parameter's .grad


class Trainer:
    """Owns an SAE's initialisation, its training objective and post-step constraints."""

    def __init__(self, sae: SAE, cfg: TrainConfig):
        self.sae = sae
        self.cfg = cfg

    @torch.no_grad()
    def init_weights(self, generator: torch.Generator, b_dec_D: torch.Tensor) -> None:
        """Fresh weights (April-update init): random decoder rows of norm init_decoder_norm,
        W_enc = W_decᵀ, b_enc = 0, b_dec = the given initial value."""
        sae = self.sae
        W_dec_FD = torch.randn(sae.d_sae, sae.d_in, generator=generator)
        W_dec_FD = torch.nn.functional.normalize(W_dec_FD, dim=-1) * self.decoder_norm()
        sae.W_dec.copy_(W_dec_FD)
        sae.W_enc.copy_(W_dec_FD.T)
        sae.b_enc.zero_()
        sae.b_dec.copy_(b_dec_D)

    def decoder_norm(self) -> float:
        """Initial norm of decoder rows."""
        return self.cfg.init_decoder_norm

    def loss(self, x_BD: torch.Tensor, step: int, dead_F: torch.Tensor, detail: bool = True) -> StepLoss:  # pragma: no cover
        """The objective on one batch of scaled activations; dead_F marks dead latents;
        detail=True also counts firings per latent (a full pass: only on logging steps)."""
        raise NotImplementedError

    @torch.no_grad()
    def after_step(self) -> None:
        """Constraints applied after each optimiser step (decoder norms, thresholds)."""

    def encoder_pre(self, x_BD: torch.Tensor) -> torch.Tensor:
        """Pre-activations [B, F] as one addmm: (x − b_dec) W_enc + b_enc is rewritten as
        x W_enc + (b_enc − b_dec W_enc), so autograd never forms the useless grad of x."""
        sae = self.sae
        bias_F = sae.b_enc - sae.b_dec @ sae.W_enc if sae.cfg.apply_b_dec_to_input else sae.b_enc
        return torch.addmm(bias_F, x_BD, sae.W_enc)


def mse_of(x_BD: torch.Tensor, x_hat_BD: torch.Tensor) -> torch.Tensor:
    """Mean over tokens of Σ_d (x − x̂)² (differentiable)."""
    err_BD = x_hat_BD - x_BD
    return torch.vdot(err_BD.flatten(), err_BD.flatten()) / x_BD.shape[0]
