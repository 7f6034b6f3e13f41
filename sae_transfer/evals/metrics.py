"""Reconstruction metrics (DESIGN.md definitions) accumulated over batches: l0, mse, explained variance.

Everything is accumulated as sums over batches so one pass over any number of tokens gives
exactly the same numbers as one big batch.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from sae_transfer.sae.metrics import legacy_terms, variance_explained_from_moments


@dataclass(frozen=True)
class ReconMetrics:
    """Reconstruction quality over a set of tokens."""

    n_tokens: int  # tokens the metrics average over
    l0: float  # mean number of active features per token
    mse: float  # mean over tokens of sum_d (x - x_hat)^2, in scaled units (times s^2 vs raw)
    explained_variance: float  # 1 - E||x - x_hat||^2 / (E||x||^2 - ||E x||^2) (SAELens)
    explained_variance_legacy: float  # mean over tokens of 1 - ||x - x_hat||^2 / ||x - mean(x)||^2 (seed study)
    variance_share: float  # (E||x||^2 - ||E x||^2) / E||x||^2: how much of the tokens' energy varies (EV's denominator)


class ReconAccumulator:
    """Sums over counted tokens; `result(scale)` turns them into `ReconMetrics`.

    l0, mse and explained_variance are exact over all tokens added, however they are batched.
    explained_variance_legacy uses the mean of the tokens passed to each `add` call as
    mean_batch(x), as the seed study did with its eval batches (so it depends slightly on the
    batch size; pass whole forward batches).
    """

    def __init__(self, d_in: int):
        self.n = 0
        self.sum_l0 = 0.0
        self.sum_sq_err = 0.0  # raw units
        self.sum_sq_norm = 0.0
        self.sum_x_D = torch.zeros(d_in, dtype=torch.float64)
        self.sum_legacy = 0.0

    def add(self, x_ND: torch.Tensor, x_hat_ND: torch.Tensor, l0_N: torch.Tensor) -> torch.Tensor:
        """Add tokens (rows); returns their per-token squared error [N] in raw units (float64)."""
        x = x_ND.detach().double()
        sq_err_N = (x - x_hat_ND.detach().double()).pow(2).sum(-1)
        self.n += x.shape[0]
        self.sum_l0 += float(l0_N.detach().double().sum())
        self.sum_sq_err += float(sq_err_N.sum())
        self.sum_sq_norm += float(x.pow(2).sum())
        self.sum_x_D += x.sum(0).cpu()
        if x.shape[0]:
            self.sum_legacy += float(legacy_terms(x, sq_err_N).sum())
        return sq_err_N

    def result(self, scale: float) -> ReconMetrics:
        """Metrics over everything added; `scale` is s (mse is multiplied by s^2)."""
        n = max(self.n, 1)
        mean_sq_norm = self.sum_sq_norm / n
        total_var = mean_sq_norm - float((self.sum_x_D / n).pow(2).sum())
        if total_var <= 1e-9 * mean_sq_norm:  # identical tokens (e.g. only BOS): undefined
            total_var = 0.0
        nan = float("nan")
        ev = variance_explained_from_moments(self.sum_sq_err / n, mean_sq_norm, self.sum_x_D / n)
        return ReconMetrics(
            n_tokens=self.n,
            l0=self.sum_l0 / n if self.n else nan,
            mse=scale**2 * self.sum_sq_err / n if self.n else nan,
            explained_variance=float(ev) if self.n and total_var > 0 else nan,
            explained_variance_legacy=self.sum_legacy / n if self.n else nan,
            variance_share=total_var / mean_sq_norm if self.n and mean_sq_norm > 0 else nan,
        )


def reconstruction_metrics(
    x_ND: torch.Tensor, x_hat_ND: torch.Tensor, feats_NF: torch.Tensor, scale: float = 1.0
) -> ReconMetrics:
    """All reconstruction metrics over one set of tokens (one batch: the legacy mean is theirs)."""
    acc = ReconAccumulator(x_ND.shape[-1])
    acc.add(x_ND, x_hat_ND, (feats_NF > 0).sum(-1))
    return acc.result(scale)
