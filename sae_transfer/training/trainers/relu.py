"""ReLU SAE trainer: MSE + λ·Σ_f f·‖W_dec_f‖ (Anthropic, April 2024 update), with optional
ghost grads (corrected form) for dead latents.

Without ghost grads the step computes its gradients by hand: five large matmuls and a few
fused passes over the [B, F] activations, no autograd graph (`fused_loss_and_grads`; a test
checks it against autograd)."""

from __future__ import annotations

import torch

from sae_transfer.sae.metrics import count_nonzero_columns
from sae_transfer.training.schedules import sparsity_multiplier
from sae_transfer.training.trainers.base import StepLoss, Trainer, addmm_fp32, mse_of
from sae_transfer.training.tricks import ghost_grad_loss


class ReluTrainer(Trainer):
    def coefficient(self, step: int) -> float:
        """Sparsity coefficient at `step` (after its warm-up)."""
        cfg = self.cfg
        return cfg.l1_coefficient * sparsity_multiplier(step, cfg.total_steps, cfg.l1_warmup_frac)

    def loss(self, x_BD: torch.Tensor, step: int, dead_F: torch.Tensor | None, detail: bool = True) -> StepLoss:
        if not (self.cfg.ghost_grads and dead_F is not None):
            return self.fused_loss_and_grads(x_BD, step, detail)
        return self.autograd_loss(x_BD, step, dead_F, detail)

    def autograd_loss(self, x_BD: torch.Tensor, step: int, dead_F: torch.Tensor | None, detail: bool = True) -> StepLoss:
        """The objective as an autograd graph (used with ghost grads, and as the reference)."""
        sae = self.sae
        with self.autocast():
            pre_BF = self.encoder_pre(x_BD)
            feats_BF = torch.relu(pre_BF)
            x_hat_BD = torch.addmm(sae.b_dec, feats_BF, sae.W_dec).float()
            mse = mse_of(x_BD, x_hat_BD)
            sparsity = torch.dot(feats_BF.float().sum(0), sae.W_dec.norm(dim=-1)) / x_BD.shape[0]
            loss = mse + self.coefficient(step) * sparsity
            if self.cfg.ghost_grads and dead_F is not None:
                loss = loss + ghost_grad_loss(x_BD, x_hat_BD, pre_BF, sae.W_dec, dead_F, mse)
        with torch.no_grad():
            counts_F = count_nonzero_columns(feats_BF) if detail else None
            fired_F = feats_BF.detach().sum(0) > 0
        return StepLoss(loss, mse.detach(), sparsity.detach(), x_hat_BD.detach(), fired_F, counts_F)

    def _buffers(self, B: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Two reusable [B, F] buffers in the compute dtype (fresh 32 MB allocations page-fault
        on every step on a CPU)."""
        F = self.sae.d_sae
        bufs = getattr(self, "_bufs", None)
        if bufs is None or bufs[0].shape != (B, F) or bufs[0].device != self.device or bufs[0].dtype != self.compute_dtype:
            opts = dict(device=self.device, dtype=self.compute_dtype)
            bufs = self._bufs = (torch.empty(B, F, **opts), torch.empty(B, F, **opts))
        return bufs

    @torch.no_grad()
    def fused_loss_and_grads(self, x_BD: torch.Tensor, step: int, detail: bool = True) -> StepLoss:
        """Loss and hand-written gradients (stored in each parameter's .grad, fp32).

        Biases ride along as an extra row/column of ones ("augmented" matrices), so each of the
        five matmuls also produces a bias term or a column sum for free: the only other passes
        over [B, F] are the ReLU and its mask. The five matmuls and the [B, F] buffers are in
        compute_dtype; everything [B, D] or smaller is fp32."""
        sae, cdt = self.sae, self.compute_dtype
        B, D = x_BD.shape
        feats_BF, g_pre_BF = self._buffers(B)
        ones_B1 = x_BD.new_ones(B, 1)
        xc_BD = x_BD - sae.b_dec if sae.cfg.apply_b_dec_to_input else x_BD
        xc1_BE = torch.cat([xc_BD, ones_B1], dim=1).to(cdt)  # E = D + 1
        torch.mm(xc1_BE, torch.cat([sae.W_enc, sae.b_enc.unsqueeze(0)]).to(cdt), out=feats_BF).clamp_min_(0.0)
        x_hat_BD = addmm_fp32(sae.b_dec, feats_BF, sae.W_dec)
        g_xhat_BD = x_hat_BD - x_BD
        mse = torch.vdot(g_xhat_BD.flatten(), g_xhat_BD.flatten()) / B
        g1_BE = torch.cat([g_xhat_BD.mul_(2.0 / B), ones_B1], dim=1)
        # [F, E]: columns :D are d/dW_dec of the reconstruction, column D is Σ_b f_bf
        g_dec_FE = torch.mm(feats_BF.T, g1_BE.to(cdt)).float()
        feat_sum_F = g_dec_FE[:, D]
        norms_F = sae.W_dec.norm(dim=-1)
        sparsity = torch.dot(feat_sum_F, norms_F) / B
        coeff = self.coefficient(step)
        fired_F = feat_sum_F > 0
        counts_F = count_nonzero_columns(feats_BF) if detail else None
        g_W_dec = g_dec_FE[:, :D].contiguous()
        g_W_dec.addcmul_(sae.W_dec, (feat_sum_F * (coeff / B) / norms_F.clamp_min(1e-12)).unsqueeze(1))
        # d/dpre = (g x̂ W_decᵀ + λ‖W_dec‖/B) · 1[f > 0]: one matmul, one fused mask pass
        torch.mm(g1_BE.to(cdt), torch.cat([sae.W_dec.T, (norms_F * (coeff / B)).unsqueeze(0)]).to(cdt), out=g_pre_BF)
        torch.ops.aten.threshold_backward.grad_input(g_pre_BF, feats_BF, 0.0, grad_input=g_pre_BF)
        g_enc_EF = torch.mm(xc1_BE.T, g_pre_BF).float()  # rows :D: d/dW_enc; row D: d/db_enc
        g_b_enc = g_enc_EF[D]
        g_b_dec = g1_BE[:, :D].sum(0)
        if sae.cfg.apply_b_dec_to_input:
            g_b_dec.sub_(sae.W_enc @ g_b_enc)
        for param, grad in ((sae.W_enc, g_enc_EF[:D]), (sae.b_enc, g_b_enc), (sae.W_dec, g_W_dec), (sae.b_dec, g_b_dec)):
            param.grad = grad
        loss = mse + coeff * sparsity
        return StepLoss(loss, mse, sparsity, x_hat_BD, fired_F, counts_F, grads_done=True)
