"""BatchTopK trainer (Bussmann et al. 2024): the batch keeps its B·k largest norm scores
(topk.py); a running mean of the smallest kept score becomes the inference JumpReLU threshold."""

from __future__ import annotations

import torch

from sae_transfer.training.trainers.topk import TopKTrainer, norm_scores, select_batch_topk

THRESHOLD_MOMENTUM = 0.99  # running-mean decay for the inference threshold


class BatchTopKTrainer(TopKTrainer):
    _min_score: torch.Tensor | None = None  # smallest kept score of the last selection (0-d)

    def select(self, pre_BF: torch.Tensor):
        """The B·k largest norm scores of the batch; values are the kept ReLU(pre). The smallest
        kept score is kept (on the device) for the threshold, which applies to the saved SAE's
        pre-activations: the scores, once the decoder norms are folded in."""
        # k·B values for B tokens: the batch must be flat tokens, never [B, S, F]
        assert pre_BF.dim() == 2, f"batchtopk selects over [tokens, F], got shape {tuple(pre_BF.shape)}"
        score_N, token_N, latent_N = select_batch_topk(norm_scores(pre_BF, self.sae.W_dec), self.sae.cfg.k)
        kept_N = score_N > 0
        self._min_score = torch.where(kept_N, score_N.float(), torch.inf).min()
        return torch.relu(pre_BF[token_N, latent_N]).float() * kept_N, token_N, latent_N

    def after_selection(self, vals_N: torch.Tensor, positive_N: torch.Tensor) -> None:
        """Running mean of the smallest kept score, updated on the device: the first estimate
        replaces the -1 placeholder; a batch with none kept changes nothing."""
        smallest = self._min_score
        if smallest is None:
            return
        thr = self.sae.threshold
        updated = torch.where(thr < 0, smallest, thr * THRESHOLD_MOMENTUM + (1 - THRESHOLD_MOMENTUM) * smallest)
        thr.copy_(torch.where(torch.isfinite(smallest), updated, thr))
