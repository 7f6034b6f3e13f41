"""Bootstrap confidence interval for ce_loss_score, resampling whole sequences."""

from __future__ import annotations

import torch


def ce_score_ci(
    clean_N: torch.Tensor,
    sae_N: torch.Tensor,
    zero_N: torch.Tensor,
    *,
    n_resamples: int = 1000,
    level: float = 0.95,
    seed: int = 0,
) -> tuple[float, float]:
    """Percentile interval of (ce_zero - ce_sae) / (ce_zero - ce_clean) over resampled sequences.

    Inputs are per-sequence SUMS of next-token losses (nats) over the counted positions. All
    three means share one denominator (the resample's token count), so the score of a resample
    is the same ratio of summed differences. Returns (lo, hi); (nan, nan) with no sequences.
    """
    n = clean_N.shape[0]
    if n == 0:
        return float("nan"), float("nan")
    gen = torch.Generator().manual_seed(seed)
    idx_RN = torch.randint(0, n, (n_resamples, n), generator=gen)
    counts_RN = torch.zeros(n_resamples, n, dtype=torch.float64)
    counts_RN.scatter_add_(1, idx_RN, torch.ones_like(idx_RN, dtype=torch.float64))
    sums_N3 = torch.stack([clean_N, sae_N, zero_N], dim=1).double().cpu()
    sums_R3 = counts_RN @ sums_N3
    score_R = (sums_R3[:, 2] - sums_R3[:, 1]) / (sums_R3[:, 2] - sums_R3[:, 0])
    alpha = (1 - level) / 2
    lo, hi = torch.quantile(score_R, torch.tensor([alpha, 1 - alpha], dtype=torch.float64))
    return float(lo), float(hi)
