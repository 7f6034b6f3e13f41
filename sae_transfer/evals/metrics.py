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
        # float64 sums on the tokens' device: no host sync per `add` (read once in `result`)
        self.sums: dict[str, torch.Tensor] | None = None
        self.d_in = d_in

    def add(self, x_ND: torch.Tensor, x_hat_ND: torch.Tensor, l0_N: torch.Tensor) -> torch.Tensor:
        """Add tokens (rows); returns their per-token squared error [N] in raw units (float64)."""
        x = x_ND.detach().double()
        sq_err_N = (x - x_hat_ND.detach().double()).pow(2).sum(-1)
        if self.sums is None:
            zero = torch.zeros((), dtype=torch.float64, device=x.device)
            self.sums = {"l0": zero, "sq_err": zero, "sq_norm": zero, "legacy": zero,
                         "x_D": torch.zeros(self.d_in, dtype=torch.float64, device=x.device)}
        self.n += x.shape[0]
        s = self.sums
        s["l0"] = s["l0"] + l0_N.detach().double().sum()
        s["sq_err"] = s["sq_err"] + sq_err_N.sum()  # raw units
        s["sq_norm"] = s["sq_norm"] + x.pow(2).sum()
        s["x_D"] = s["x_D"] + x.sum(0)
        if x.shape[0]:
            s["legacy"] = s["legacy"] + legacy_terms(x, sq_err_N).sum()
        return sq_err_N

    def result(self, scale: float) -> ReconMetrics:
        """Metrics over everything added; `scale` is s (mse is multiplied by s^2)."""
        nan = float("nan")
        if not self.n:
            return ReconMetrics(0, nan, nan, nan, nan, nan)
        s = {k: v.cpu() for k, v in self.sums.items()}
        n = self.n
        sum_sq_err, mean_sq_norm, mean_D = float(s["sq_err"]), float(s["sq_norm"]) / n, s["x_D"] / n
        total_var = mean_sq_norm - float(mean_D.pow(2).sum())
        if total_var <= 1e-9 * mean_sq_norm:  # identical tokens (e.g. only BOS): undefined
            total_var = 0.0
        ev = variance_explained_from_moments(sum_sq_err / n, mean_sq_norm, mean_D)
        return ReconMetrics(
            n_tokens=n,
            l0=float(s["l0"]) / n,
            mse=scale**2 * sum_sq_err / n,
            explained_variance=float(ev) if total_var > 0 else nan,
            explained_variance_legacy=float(s["legacy"]) / n,
            variance_share=total_var / mean_sq_norm if mean_sq_norm > 0 else nan,
        )


def reconstruction_metrics(
    x_ND: torch.Tensor, x_hat_ND: torch.Tensor, feats_NF: torch.Tensor, scale: float = 1.0
) -> ReconMetrics:
    """All reconstruction metrics over one set of tokens (one batch: the legacy mean is theirs)."""
    acc = ReconAccumulator(x_ND.shape[-1])
    acc.add(x_ND, x_hat_ND, (feats_NF > 0).sum(-1))
    return acc.result(scale)
