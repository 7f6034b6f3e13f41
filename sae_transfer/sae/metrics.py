"""Reconstruction metrics, exactly as defined in DESIGN.md; shared by training and evaluation.

All take x_BD (the input, scaled units) and x_hat_BD (the reconstruction) and return a 0-d
float tensor averaged over the B tokens."""

from __future__ import annotations

import torch


def l0(feats_BF: torch.Tensor) -> torch.Tensor:
    """Mean number of active (non-zero) features per token."""
    return (feats_BF != 0).sum(dim=-1, dtype=torch.float32).mean()


def mse(x_BD: torch.Tensor, x_hat_BD: torch.Tensor) -> torch.Tensor:
    """Mean over tokens of Σ_d (x − x̂)² (in the units of x; scaled units in our pipeline)."""
    return (x_BD - x_hat_BD).pow(2).sum(dim=-1).mean()


def variance_explained_from_moments(mean_sq_err, mean_sq_norm, mean_D):
    """1 − E‖x − x̂‖² / (E‖x‖² − ‖E x‖²) from the three moments (tensors or floats).

    The one formula of `explained_variance` (SAELens's current definition): a batch and a
    streaming accumulator (`evals.metrics.ReconAccumulator`) both call it."""
    return 1.0 - mean_sq_err / (mean_sq_norm - (mean_D * mean_D).sum())


def legacy_terms(x_BD: torch.Tensor, sq_err_B: torch.Tensor) -> torch.Tensor:
    """Per-token 1 − ‖x − x̂‖² / ‖x − mean_batch(x)‖² (the seed study's explained variance)."""
    return 1.0 - sq_err_B / (x_BD - x_BD.mean(0)).pow(2).sum(-1)


def explained_variance(x_BD: torch.Tensor, x_hat_BD: torch.Tensor) -> torch.Tensor:
    """1 − E‖x − x̂‖² / (E‖x‖² − ‖E x‖²) over the batch (SAELens's current definition)."""
    x_BD = x_BD.float()
    sq_err = (x_BD - x_hat_BD.float()).pow(2).sum(-1).mean()
    return variance_explained_from_moments(sq_err, x_BD.pow(2).sum(-1).mean(), x_BD.mean(0))


def explained_variance_legacy(x_BD: torch.Tensor, x_hat_BD: torch.Tensor) -> torch.Tensor:
    """Mean over tokens of 1 − ‖x − x̂‖² / ‖x − mean_batch(x)‖² (the seed study's definition)."""
    x_BD = x_BD.float()
    return legacy_terms(x_BD, (x_BD - x_hat_BD.float()).pow(2).sum(-1)).mean()
