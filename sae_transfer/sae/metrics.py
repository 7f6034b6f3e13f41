"""Reconstruction metrics, exactly as defined in DESIGN.md; shared by training and evaluation.

All take x_BD (the input, scaled units) and x_hat_BD (the reconstruction) and return a 0-d
float tensor averaged over the B tokens."""

from __future__ import annotations

import torch

# Rows per chunk of a [B, F] reduction: a sum into a wider dtype (bool -> int64, fp32 -> fp64)
# first copies its whole input into that dtype (8 bytes x B x F: 8 GiB at 8192 x 131072), so
# the reductions below widen at most this many elements at a time.
CHUNK_ELEMENTS = 1 << 24


def column_sum(x_BF: torch.Tensor, dtype: torch.dtype | None = None) -> torch.Tensor:
    """x_BF.sum(0, dtype=dtype) [F] (bool counts as int64), widening CHUNK_ELEMENTS at a time."""
    rows = max(1, CHUNK_ELEMENTS // max(x_BF.shape[-1], 1))
    if x_BF.shape[0] <= rows:
        return x_BF.sum(0, dtype=dtype)
    out = x_BF[:rows].sum(0, dtype=dtype)
    for i in range(rows, x_BF.shape[0], rows):
        out += x_BF[i:i + rows].sum(0, dtype=dtype)
    return out


def count_nonzero_columns(x_BF: torch.Tensor) -> torch.Tensor:
    """torch.count_nonzero(x_BF, dim=0) [F] (int64) without an int64 copy of [B, F]."""
    return column_sum(x_BF != 0) if x_BF.dtype != torch.bool else column_sum(x_BF)


def count_true(mask: torch.Tensor) -> torch.Tensor:
    """mask.sum() (0-d int64) of a bool tensor of any size, without an int64 copy of it."""
    flat = mask.reshape(-1, mask.shape[-1]) if mask.dim() > 1 else mask.reshape(1, -1)
    return column_sum(flat).sum()


def l0(feats_BF: torch.Tensor) -> torch.Tensor:
    """Mean number of active (non-zero) features per token."""
    flat = feats_BF.reshape(-1, feats_BF.shape[-1])
    return count_true(flat != 0).float() / flat.shape[0]  # NaN for no tokens, as a mean of nothing


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
