"""BatchTopK crosscoder trainer (Minder et al. 2025): MSE on both models + AuxK, no decoder-norm
constraint (ρ lives in the decoder norms), selection by f·(‖d^base‖ + ‖d^chat‖).

The crosscoder is an SAE over the concatenation [x_base, x_chat] (d_in = 2D), so the shared
loop, optimiser and checkpoints apply; the MSE over 2D is the sum of the two models' MSEs.
Encoder backward and decoder touch only the B·k kept entries (topk.py's sparse kernels)."""

from __future__ import annotations

import torch

from sae_transfer.training.trainers.batchtopk import BatchTopKTrainer
from sae_transfer.training.trainers.topk import select_batch_topk

# How init_weights draws the two decoders, recorded in every crosscoder run's config so a run
# folder trained before (one independent draw per model) is refused, not silently reused.
DECODER_INIT = "one_draw_both_models"


class CrosscoderTrainer(BatchTopKTrainer):
    """Trains a `sae_transfer.diffing.crosscoder.CrossCoder` (decoder rows [F, 2D]); the
    threshold is BatchTopK's running mean of the smallest kept score (`after_selection`)."""

    def decoder_norm(self) -> float:
        """Initial ‖d_j^m‖ of each model's decoder row (their sum is 1, like a unit-norm SAE row)."""
        return 0.5

    @torch.no_grad()
    def init_weights(self, generator: torch.Generator, b_dec_D: torch.Tensor) -> None:
        """Both models' decoder rows of latent j start as the same random direction of norm
        decoder_norm(); W_enc = W_decᵀ; b_enc = 0; b_dec = the given [2D] value.

        One shared draw, not one per model: where the two models' activations agree, the two
        halves then get the same gradient and stay equal, and they part only where the models
        differ. Drawn independently (as dictionary_learning's CrossCoder does unless
        same_init_for_all_layers), a latent that fires rarely keeps much of its two unrelated
        random rows: on an identical pair a third of the live latents ended with decoder
        cosine below 0.95, the worst at 0.15 (tests/test_diffing_agreement.py)."""
        cc = self.sae
        F, D = cc.d_sae, cc.d_in // 2
        dec_FD = torch.nn.functional.normalize(torch.randn(F, D, generator=generator, device=generator.device),
                                               dim=-1) * self.decoder_norm()
        cc.W_dec.copy_(torch.cat([dec_FD, dec_FD], dim=1))
        cc.W_enc.copy_(cc.W_dec.T)
        cc.b_enc.zero_()
        cc.b_dec.copy_(b_dec_D)

    def select(self, pre_BF: torch.Tensor):
        """The B·k largest scores ReLU(pre)·(‖d^base‖+‖d^chat‖) of the batch, returning the
        kept entries' ReLU(pre) (vals, token, latent) in CSR order; the smallest kept score
        is kept (on the device) for the threshold."""
        norm_F = self.sae.decoder_norms_MF().sum(0).detach()
        score_vals_N, token_N, latent_N = select_batch_topk(pre_BF * norm_F.to(pre_BF.dtype), self.sae.cfg.k)
        kept_N = score_vals_N > 0
        self._min_score = torch.where(kept_N, score_vals_N.float(), torch.inf).min()
        return torch.relu(pre_BF[token_N, latent_N]) * kept_N, token_N, latent_N

    def inference_sae(self):
        """The crosscoder as trained: its scores use both models' norms, nothing is folded."""
        return self.sae

    @torch.no_grad()
    def after_step(self) -> None:
        """Nothing: decoder norms are free (the taxonomy reads them); the score makes the loss
        invariant to trading code size for decoder norm."""

