"""Latent Scaling (Minder et al. 2025, arXiv 2504.02922, Sec. 3): how much of a latent's
direction a model's activations carry, by least squares.

For latent j with direction d_j and activation f_j(x), fit y ≈ β f_j d_j over tokens:

    β_j = Σ_i f_j(x_i) ⟨d_j, y_i⟩ / (‖d_j‖² Σ_i f_j(x_i)²)

The sums are accumulated batch by batch (`LatentScaler`), so any number of tokens streams
through in memory O(latents × d_model). A target may add the latent's own contribution back
per latent (y_ij = y_i + f_ij · own_j): that term is folded into the sums, never materialised.

Crosscoder (direction d_j = d_j^chat for every target, as the paper's released code does):
  error          ε_j^m = x^m − x̂^m + f_j d_j^m  (model m's error with latent j's own part back)
  reconstruction r^m   = x̂^m                   (model m's full reconstruction)
  ν^ε_j = β_j(ε^base) / β_j(ε^chat),   ν^r_j = β_j(r^base) / β_j(r^chat).
A truly chat-specific latent has both small. A large ν^ε says the base activations still
carry the direction the base decoder dropped (Complete Shrinkage); a large ν^r says other
latents reconstruct it on base (Latent Decoupling). DESIGN.md words the reconstruction
target as "without latent j": for chat-only latents d_j^base ≈ 0, so on base both readings
agree, and on chat the paper keeps j (β(r^chat) ≈ 1 is what makes ν^r a ratio); we follow
the paper. The cut-offs in `ScalingCuts` are ours (the paper ranks by ν), recorded.

SAE on two models: d_j = the SAE's decoder row, f_j = its code on each model's activations
(scaled for that model as the study does), targets x − b_dec ("activation") and
x − x̂ + f_j d_j ("error"); the chat/base ratios say whether a base latent's direction
survives on chat.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import torch

from sae_transfer.diffing.crosscoder import CrossCoder
from sae_transfer.sae.base import SAE


class LatentScaler:
    """Streaming sums for β of L latents with directions d_LD (float64 accumulation).

    The sums live on d_LD's device and every batch is brought there: at 4096 × 131072 latents
    the per-batch float64 product y @ d.T is a GPU's work, never the host's. `beta` and
    `counts` hand back the small [L] results on the CPU."""

    def __init__(self, d_LD: torch.Tensor):
        self.d_LD = d_LD.detach().double()
        self.device = self.d_LD.device
        L = d_LD.shape[0]
        self.num_L = torch.zeros(L, dtype=torch.float64, device=self.device)  # Σ f ⟨d, y⟩
        self.f2_L = torch.zeros(L, dtype=torch.float64, device=self.device)  # Σ f²
        self.count_L = torch.zeros(L, dtype=torch.int64, device=self.device)  # tokens with f > 0

    def update(self, f_BL: torch.Tensor, y_BD: torch.Tensor, own_LD: torch.Tensor | None = None) -> None:
        """Add a batch: codes f [B, L], common target y [B, D], and optionally each latent's own
        contribution direction own [L, D] added back to its target (y_j = y + f_j·own_j)."""
        f_BL = f_BL.detach().to(self.device, torch.float64)
        y_BD = y_BD.detach().to(self.device, torch.float64)
        f2_L = f_BL.pow(2).sum(0)
        self.num_L += ((y_BD @ self.d_LD.T) * f_BL).sum(0)
        if own_LD is not None:
            self.num_L += (self.d_LD * own_LD.detach().to(self.device, torch.float64)).sum(-1) * f2_L
        self.f2_L += f2_L
        self.count_L += (f_BL > 0).sum(0)

    def beta(self) -> torch.Tensor:
        """β [L] (float64, CPU); NaN for a latent that never fired or has a zero direction."""
        denom_L = self.d_LD.pow(2).sum(-1) * self.f2_L
        beta_L = torch.where(denom_L > 0, self.num_L / denom_L.clamp_min(1e-300), torch.full_like(denom_L, float("nan")))
        return beta_L.cpu()

    def counts(self) -> torch.Tensor:
        """Tokens on which each latent fired [L] (int64, CPU)."""
        return self.count_L.cpu()


@dataclass(frozen=True)
class ScalingCuts:
    """ν cut-offs naming a latent's Latent Scaling verdict (our choice; recorded with results)."""

    complete_shrinkage_min: float = 0.3  # ν^ε ≥ this: the other model still carries the direction
    latent_decoupling_min: float = 0.5  # ν^r ≥ this (and ν^ε below its cut): other latents rebuild it


VERDICTS = ("specific", "complete_shrinkage", "latent_decoupling", "inactive")


@dataclass(frozen=True)
class CrosscoderScaling:
    """Latent Scaling of crosscoder latents (all [L], float64, in the order of `latents_L`)."""

    latents_L: torch.Tensor  # latent indices
    beta_error_base_L: torch.Tensor  # β(ε^base)
    beta_error_chat_L: torch.Tensor  # β(ε^chat)
    beta_recon_base_L: torch.Tensor  # β(r^base)
    beta_recon_chat_L: torch.Tensor  # β(r^chat)
    nu_error_L: torch.Tensor  # ν^ε = β(ε^base) / β(ε^chat)
    nu_recon_L: torch.Tensor  # ν^r = β(r^base) / β(r^chat)
    count_L: torch.Tensor  # tokens on which the latent fired
    n_tokens: int  # tokens streamed

    def verdicts(self, cuts: ScalingCuts = ScalingCuts()) -> list[str]:
        """One of VERDICTS per latent."""
        out = []
        for ne, nr, c in zip(self.nu_error_L.tolist(), self.nu_recon_L.tolist(), self.count_L.tolist()):
            if c == 0 or ne != ne or nr != nr:
                out.append("inactive")
            elif ne >= cuts.complete_shrinkage_min:
                out.append("complete_shrinkage")
            elif nr >= cuts.latent_decoupling_min:
                out.append("latent_decoupling")
            else:
                out.append("specific")
        return out


@torch.no_grad()
def crosscoder_scaling(cc: CrossCoder, batches: Iterable[torch.Tensor], latents_L: torch.Tensor) -> CrosscoderScaling:
    """Latent Scaling of `latents_L` over paired batches x [B, 2, D] in training units (e.g.
    `paired.iter_paired(...).x_BMD`), with the inference threshold. Batches are brought to the
    crosscoder's device; the results are on the CPU."""
    latents_L = torch.as_tensor(latents_L, dtype=torch.int64).cpu()
    dec_MFD = cc.decoders_MFD().detach()
    device = dec_MFD.device
    idx_L = latents_L.to(device)
    d_chat_LD = dec_MFD[1, idx_L]
    scalers = {name: LatentScaler(d_chat_LD) for name in ("eb", "ec", "rb", "rc")}
    n = 0
    own_base_LD, own_chat_LD = dec_MFD[0, idx_L], d_chat_LD
    for x_BMD in batches:
        x_BMD = x_BMD.to(device)
        f_BF = cc.encode(x_BMD.flatten(1))
        x_hat_BMD = cc.split(cc.decode(f_BF))
        f_BL = f_BF[:, idx_L]
        err_BMD = x_BMD - x_hat_BMD
        scalers["eb"].update(f_BL, err_BMD[:, 0], own_LD=own_base_LD)
        scalers["ec"].update(f_BL, err_BMD[:, 1], own_LD=own_chat_LD)
        scalers["rb"].update(f_BL, x_hat_BMD[:, 0])
        scalers["rc"].update(f_BL, x_hat_BMD[:, 1])
        n += x_BMD.shape[0]
    b = {name: s.beta() for name, s in scalers.items()}
    return CrosscoderScaling(latents_L, b["eb"], b["ec"], b["rb"], b["rc"], b["eb"] / b["ec"], b["rb"] / b["rc"],
                             scalers["eb"].counts(), n)


@dataclass(frozen=True)
class SAEScaling:
    """Latent Scaling of SAE latents on one model (all [L], float64)."""

    latents_L: torch.Tensor  # latent indices
    beta_activation_L: torch.Tensor  # β against x − b_dec
    beta_error_L: torch.Tensor  # β against x − x̂ + f_j d_j
    count_L: torch.Tensor  # tokens on which the latent fired
    n_tokens: int  # tokens streamed


@torch.no_grad()
def sae_scaling(sae: SAE, batches: Iterable[torch.Tensor], latents_L: torch.Tensor) -> SAEScaling:
    """Latent Scaling of an SAE's `latents_L` over activation batches x [B, D] given in the
    SAE's input units (for another model: r·x, see sae.scaling.cross_model_ratio). Batches are
    brought to the SAE's device; the results are on the CPU."""
    latents_L = torch.as_tensor(latents_L, dtype=torch.int64).cpu()
    device = sae.W_dec.device
    idx_L = latents_L.to(device)
    d_LD = sae.W_dec.detach()[idx_L]
    act, err = LatentScaler(d_LD), LatentScaler(d_LD)
    n = 0
    for x_BD in batches:
        x_BD = x_BD.to(device)
        f_BF = sae.encode(x_BD)
        f_BL = f_BF[:, idx_L]
        act.update(f_BL, x_BD - sae.b_dec)
        err.update(f_BL, x_BD - sae.decode(f_BF), own_LD=d_LD)
        n += x_BD.shape[0]
    return SAEScaling(latents_L, act.beta(), err.beta(), act.counts(), n)
