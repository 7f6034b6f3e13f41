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

    def after_selection(self, kept_vals_N: torch.Tensor) -> None:
        if kept_vals_N.numel() == 0:
            return
        smallest = float(kept_vals_N.min())
        thr = self.sae.threshold
        if float(thr) < 0:
            thr.fill_(smallest)
        else:
            thr.mul_(THRESHOLD_MOMENTUM).add_((1 - THRESHOLD_MOMENTUM) * smallest)
