"""The activation scale factor, in one place, and folding it into SAE weights.

Activations are scaled by s = sqrt(d_model) / E||x|| (Conerly et al.; the seed study), with
E||x|| estimated on the evaluated model's own activations. A saved SAE has its training factor
s_train folded in, so it reads raw activations of its own model: W_enc <- s*W_enc,
W_dec <- W_dec / s, b_dec <- b_dec / s (feature activations and thresholds are unchanged).

On another model with factor s_eval the study reconstructs x_hat = SAE_raw(r*x) / r with
r = s_eval / s_train (DESIGN.md "Scaling"), i.e. the SAE sees the other model's activations at
the scale it was trained on. `cross_model_ratio` is that r and `rescaled` applies it.
"""

from __future__ import annotations

import copy
import math

import torch

from sae_transfer.sae.base import SAE
from sae_transfer.storage.sae_format import SCALE_KEY  # cfg.json metadata key holding s_train


def scale_factor(mean_norm: float, d_model: int) -> float:
    """s = sqrt(d_model) / E||x|| (dimensionless): s * x has mean norm sqrt(d_model)."""
    mean_norm = float(mean_norm)
    if not (mean_norm > 0 and math.isfinite(mean_norm)):
        raise ValueError(f"mean activation norm is {mean_norm}; cannot scale (are the activations all zero?)")
    return math.sqrt(d_model) / mean_norm


def scale_factor_of(norms_N: torch.Tensor, d_model: int) -> float:
    """s from per-token norms [N] (mean in float64)."""
    return scale_factor(float(norms_N.double().mean()), d_model)


def training_scale(sae: SAE) -> float | None:
    """s_train recorded in the SAE's metadata (None for SAEs saved without one, e.g. SAELens's)."""
    value = sae.cfg.metadata.get(SCALE_KEY)
    return float(value) if value is not None else None


def cross_model_ratio(s_eval: float, s_train: float | None) -> float:
    """r = s_eval / s_train; 1 when the SAE records no training scale (it is used as saved)."""
    return s_eval / s_train if s_train else 1.0


def fold_scale(sae: SAE, scale: float) -> SAE:
    """A copy of `sae` that takes activations `scale` times smaller than `sae` does, with the
    same features; used with the training scale s to save an SAE that works on raw activations."""
    out = copy.deepcopy(sae)
    with torch.no_grad():
        out.W_enc.mul_(scale)
        out.W_dec.div_(scale)
        out.b_dec.div_(scale)
    return out


def rescaled(sae: SAE, r: float) -> SAE:
    """The SAE as applied to another model: x -> SAE_raw(r*x) / r, as a plain SAE (a copy).

    Folding r in gives exactly that map (W_enc*r, W_dec/r, b_dec/r); r = 1 returns `sae` itself."""
    return sae if r == 1.0 else fold_scale(sae, r)
