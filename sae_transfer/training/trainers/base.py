"""The interface every per-architecture trainer implements; the shared loop only uses this."""

from __future__ import annotations

import contextlib
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
    """Owns an SAE's initialisation, its training objective and post-step constraints.

    Every tensor a trainer creates lives on the SAE's device (custom autograd backwards run
    on a worker thread where no default device applies). Weights stay fp32; the large
    matmuls run in `compute_dtype` (bf16 when cfg.dtype asks), like autocast does."""

    def __init__(self, sae: SAE, cfg: TrainConfig, sparse_kernels: str | None = None):
        self.sae = sae
        self.cfg = cfg
        self.compute_dtype = torch.bfloat16 if cfg.dtype == "bfloat16" else torch.float32
        if sparse_kernels is None:  # cfg's choice with "auto" resolved for the SAE's device
            auto = "dense" if self.device.type == "cuda" else "csr"
            sparse_kernels = auto if cfg.sparse_kernels == "auto" else cfg.sparse_kernels
        self.sparse_kernels = sparse_kernels

    @property
    def device(self) -> torch.device:
        """Where the SAE's parameters live."""
        return self.sae.W_enc.device

    def autocast(self):
        """Autocast to compute_dtype on the SAE's device for autograd paths (a no-op in fp32)."""
        if self.compute_dtype == torch.float32:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.compute_dtype)

    @torch.no_grad()
    def init_weights(self, generator: torch.Generator, b_dec_D: torch.Tensor) -> None:
        """Fresh weights (April-update init): random decoder rows of norm init_decoder_norm,
        W_enc = W_decᵀ, b_enc = 0, b_dec = the given initial value."""
        sae = self.sae
        W_dec_FD = torch.randn(sae.d_sae, sae.d_in, generator=generator, device=generator.device)
        W_dec_FD = torch.nn.functional.normalize(W_dec_FD, dim=-1) * self.decoder_norm()
        sae.W_dec.copy_(W_dec_FD)
        sae.W_enc.copy_(W_dec_FD.T)
        sae.b_enc.zero_()
        sae.b_dec.copy_(b_dec_D)

    def decoder_norm(self) -> float:
        """Initial norm of decoder rows."""
        return self.cfg.init_decoder_norm

    def loss(self, x_BD: torch.Tensor, step: int, dead_F: torch.Tensor | None,
             detail: bool = True) -> StepLoss:  # pragma: no cover
        """The objective on one batch of scaled activations (fp32, on the SAE's device);
        dead_F marks dead latents (it may be all False between log steps), or is None when none
        can be dead (the loop knows that on the host, so no step waits on the device to ask); detail=True also counts firings per
        latent (a full pass: only on logging steps)."""
        raise NotImplementedError

    @torch.no_grad()
    def after_step(self) -> None:
        """Constraints applied after each optimiser step (decoder norms, thresholds)."""

    def inference_sae(self) -> SAE:
        """The SAE as it is saved and used after training (the trained module itself here;
        trainers whose parametrisation differs return a converted copy)."""
        return self.sae

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


def addmm_fp32(bias_D: torch.Tensor, a_BF: torch.Tensor, W_FD: torch.Tensor) -> torch.Tensor:
    """fp32 bias + a @ W, the product taken in a's dtype (W cast to it): one addmm in fp32,
    a low-precision GEMM then an fp32 bias add otherwise."""
    if a_BF.dtype == torch.float32:
        return torch.addmm(bias_D, a_BF, W_FD)
    return torch.mm(a_BF, W_FD.to(a_BF.dtype)).float().add_(bias_D)
