"""BatchTopK trainer (Bussmann et al. 2024): the batch keeps its B·k largest activations;
a running mean of the smallest kept activation becomes the inference JumpReLU threshold."""

from __future__ import annotations

import torch

from sae_transfer.training.trainers.topk import TopKTrainer, select_batch_topk

THRESHOLD_MOMENTUM = 0.99  # running-mean decay for the inference threshold


class BatchTopKTrainer(TopKTrainer):
    def select(self, pre_BF: torch.Tensor):
        # k·B values for B tokens: the batch must be flat tokens, never [B, S, F]
        assert pre_BF.dim() == 2, f"batchtopk selects over [tokens, F], got shape {tuple(pre_BF.shape)}"
        return select_batch_topk(pre_BF, self.sae.cfg.k)

    def after_selection(self, vals_N: torch.Tensor, positive_N: torch.Tensor) -> None:
        """Running mean of the smallest kept (positive) activation, updated on the device: the
        first estimate replaces the -1 placeholder; a batch with none kept changes nothing."""
        smallest = torch.where(positive_N, vals_N, torch.inf).min()
        thr = self.sae.threshold
        updated = torch.where(thr < 0, smallest, thr * THRESHOLD_MOMENTUM + (1 - THRESHOLD_MOMENTUM) * smallest)
        thr.copy_(torch.where(torch.isfinite(smallest), updated, thr))
