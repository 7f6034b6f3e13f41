"""JumpReLU trainer (Rajamanoharan et al. 2024): MSE + λ·L0 with straight-through estimators
for the threshold (rectangle kernel of width ε). L0 penalty: "step" (Σ H(pre − θ)) or
"tanh" (Σ tanh(c · f · ‖W_dec_f‖), SAELens's smooth variant)."""

from __future__ import annotations

import torch

from sae_transfer.sae.metrics import column_sum, count_nonzero_columns, count_true
from sae_transfer.training.schedules import sparsity_multiplier
from sae_transfer.training.trainers.base import StepLoss, Trainer, addmm_fp32, mse_of
from sae_transfer.training.trainers.topk import _sparse_FB as sparse_FB
from sae_transfer.training.trainers.topk import csr_rows, sparse_decode

SPARSE_DENSITY = 0.05  # use the sparse step once at most this fraction of pre-activations is near/above θ


def _rectangle(u: torch.Tensor) -> torch.Tensor:
    return ((u > -0.5) & (u < 0.5)).to(u.dtype)


class _JumpReLU(torch.autograd.Function):
    """pre · H(pre − θ); d/dpre = H(pre − θ); d/dθ = −(θ/ε) K((pre − θ)/ε)."""

    @staticmethod
    def forward(ctx, pre_BF, threshold_F, bandwidth):
        ctx.save_for_backward(pre_BF, threshold_F)
        ctx.bandwidth = bandwidth
        return pre_BF * (pre_BF > threshold_F)

    @staticmethod
    def backward(ctx, g_BF):
        pre_BF, threshold_F = ctx.saved_tensors
        eps = ctx.bandwidth
        g_pre = g_BF * (pre_BF > threshold_F)
        g_thr = (-(threshold_F / eps) * _rectangle((pre_BF - threshold_F) / eps) * g_BF).sum(0)
        return g_pre, g_thr, None


class _Step(torch.autograd.Function):
    """H(pre − θ); d/dθ = −(1/ε) K((pre − θ)/ε); no gradient to pre."""

    @staticmethod
    def forward(ctx, pre_BF, threshold_F, bandwidth):
        ctx.save_for_backward(pre_BF, threshold_F)
        ctx.bandwidth = bandwidth
        return (pre_BF > threshold_F).to(pre_BF.dtype)

    @staticmethod
    def backward(ctx, g_BF):
        pre_BF, threshold_F = ctx.saved_tensors
        eps = ctx.bandwidth
        g_thr = (-(1.0 / eps) * _rectangle((pre_BF - threshold_F) / eps) * g_BF).sum(0)
        return None, g_thr, None


class JumpReluTrainer(Trainer):
    @torch.no_grad()
    def init_weights(self, generator: torch.Generator, b_dec_D: torch.Tensor) -> None:
        super().init_weights(generator, b_dec_D)
        self.sae.threshold.fill_(self.cfg.jumprelu_init_threshold)

    def loss(self, x_BD: torch.Tensor, step: int, dead_F: torch.Tensor | None, detail: bool = True) -> StepLoss:
        if self.cfg.jumprelu_l0_mode == "step":
            return self.fused_loss_and_grads(x_BD, step, detail)
        return self.autograd_loss(x_BD, step, detail)

    @torch.no_grad()
    def sparse_loss_and_grads(self, x_BD: torch.Tensor, step: int, pre_BF: torch.Tensor, xc1_BE: torch.Tensor) -> StepLoss | None:
        """Like fused_loss_and_grads after the encoder matmul, but touching only the (token,
        latent) pairs with pre > θ − ε/2 (active or inside the kernel window); None when those
        are too many (> SPARSE_DENSITY of the batch, early in training) to be worth it.
        xc1_BE is fp32; the sparse products run in fp32."""
        sae, cfg = self.sae, self.cfg
        B, D = x_BD.shape
        theta_F, eps = sae.threshold, cfg.jumprelu_bandwidth
        tok_N, lat_N = (pre_BF > theta_F - eps / 2).nonzero(as_tuple=True)
        if tok_N.numel() > SPARSE_DENSITY * pre_BF.numel():
            return None
        coeff = cfg.l1_coefficient * sparsity_multiplier(step, cfg.total_steps, cfg.l1_warmup_frac)
        v_N, th_N = pre_BF[tok_N, lat_N].float(), theta_F[lat_N]
        active_N = v_N > th_N
        f_N = v_N * active_N
        crow_B1 = csr_rows(tok_N, B)
        x_hat_BD = sparse_decode(f_N, crow_B1, lat_N, tok_N, sae.W_dec) + sae.b_dec
        g_xhat_BD = x_hat_BD - x_BD
        mse = torch.vdot(g_xhat_BD.flatten(), g_xhat_BD.flatten()) / B
        g_xhat_BD.mul_(2.0 / B)
        F = sae.d_sae
        pattern_BF = torch.sparse_csr_tensor(crow_B1, lat_N, torch.ones_like(v_N), (B, F), check_invariants=False)
        g_f_N = torch.sparse.sampled_addmm(pattern_BF, g_xhat_BD, sae.W_dec.T, beta=0.0).values()
        g_W_dec = torch.sparse.mm(sparse_FB(lat_N, tok_N, f_N, F, B), g_xhat_BD)
        window_N = (v_N - th_N).abs() < eps / 2
        g_theta_F = torch.zeros_like(theta_F).index_add_(
            0, lat_N[window_N], th_N[window_N] * g_f_N[window_N] + coeff / B).mul_(-1.0 / eps)
        g_pre_N = g_f_N * active_N
        g_enc_FE = torch.sparse.mm(sparse_FB(lat_N, tok_N, g_pre_N, F, B), xc1_BE)  # [:, D] = d/db_enc
        g_b_enc = g_enc_FE[:, D].contiguous()
        g_b_dec = g_xhat_BD.sum(0)
        if sae.cfg.apply_b_dec_to_input:
            g_b_dec.sub_(sae.W_enc @ g_b_enc)
        grads = {sae.W_enc: g_enc_FE[:, :D].T.contiguous(), sae.b_enc: g_b_enc, sae.W_dec: g_W_dec,
                 sae.b_dec: g_b_dec, sae.threshold: g_theta_F}
        for param, grad in grads.items():
            param.grad = grad
        counts_F = torch.bincount(lat_N[active_N], minlength=F)
        sparsity = active_N.sum() / B
        return StepLoss(mse + coeff * sparsity, mse, sparsity, x_hat_BD, counts_F > 0, counts_F, grads_done=True)

    def _buffers(self, B: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Reusable [B, F] buffers in the compute dtype (fresh large allocations page-fault on
        every step on a CPU)."""
        F = self.sae.d_sae
        bufs = getattr(self, "_bufs", None)
        if bufs is None or bufs[0].shape != (B, F) or bufs[0].device != self.device or bufs[0].dtype != self.compute_dtype:
            opts = dict(device=self.device, dtype=self.compute_dtype)
            bufs = self._bufs = tuple(torch.empty(B, F, **opts) for _ in range(3))
        return bufs

    @torch.no_grad()
    def fused_loss_and_grads(self, x_BD: torch.Tensor, step: int, detail: bool = True, sparse_ok: bool = True) -> StepLoss:
        """Step-L0 objective with hand-written gradients (checked against autograd in a test):
        d/dθ_f = −(1/ε) Σ_b K((pre−θ)/ε) · (θ_f · dL/df_bf + λ/B). Matmuls and [B, F]
        buffers in compute_dtype; with sparse_kernels="dense" no step waits on the device."""
        sae, cfg, cdt = self.sae, self.cfg, self.compute_dtype
        B, D = x_BD.shape
        pre_BF, feats_BF, g_BF = self._buffers(B)
        theta_F, eps = sae.threshold, cfg.jumprelu_bandwidth
        coeff = cfg.l1_coefficient * sparsity_multiplier(step, cfg.total_steps, cfg.l1_warmup_frac)
        ones_B1 = x_BD.new_ones(B, 1)
        xc_BD = x_BD - sae.b_dec if sae.cfg.apply_b_dec_to_input else x_BD
        xc1_BE = torch.cat([xc_BD, ones_B1], dim=1)
        torch.mm(xc1_BE.to(cdt), torch.cat([sae.W_enc, sae.b_enc.unsqueeze(0)]).to(cdt), out=pre_BF)
        if sparse_ok and self.sparse_kernels == "csr":
            out = self.sparse_loss_and_grads(x_BD, step, pre_BF, xc1_BE)
            if out is not None:
                return out
        active_BF = pre_BF > theta_F
        torch.mul(pre_BF, active_BF, out=feats_BF)
        x_hat_BD = addmm_fp32(sae.b_dec, feats_BF, sae.W_dec)
        g_xhat_BD = x_hat_BD - x_BD
        mse = torch.vdot(g_xhat_BD.flatten(), g_xhat_BD.flatten()) / B
        g1_BE = torch.cat([g_xhat_BD.mul_(2.0 / B), ones_B1], dim=1)
        g_dec_FE = torch.mm(feats_BF.T, g1_BE.to(cdt)).float()
        fired_F = g_dec_FE[:, D] > 0
        sparsity = count_true(active_BF) / B
        counts_F = column_sum(active_BF) if detail else None
        torch.mm(g_xhat_BD.to(cdt), sae.W_dec.T.to(cdt), out=g_BF)  # dL/df
        window_BF = torch.sub(pre_BF, theta_F, out=feats_BF).abs_() < eps / 2
        if self.sparse_kernels == "csr":  # from the few (token, latent) pairs inside the window
            tok_N, lat_N = window_BF.nonzero(as_tuple=True)
            per_pair_N = theta_F[lat_N] * g_BF[tok_N, lat_N].float() + coeff / B
            g_theta_F = torch.zeros_like(theta_F).index_add_(0, lat_N, per_pair_N)
        else:  # dense passes: no nonzero(), so no host sync
            g_theta_F = torch.where(window_BF, g_BF.float() * theta_F + coeff / B, 0.0).sum(0)
        g_theta_F.mul_(-1.0 / eps)
        g_BF.mul_(active_BF)  # dL/dpre
        g_enc_EF = torch.mm(xc1_BE.T.to(cdt), g_BF).float()
        g_b_enc = g_enc_EF[D]
        g_b_dec = g1_BE[:, :D].sum(0)
        if sae.cfg.apply_b_dec_to_input:
            g_b_dec.sub_(sae.W_enc @ g_b_enc)
        grads = {sae.W_enc: g_enc_EF[:D], sae.b_enc: g_b_enc, sae.W_dec: g_dec_FE[:, :D].contiguous(),
                 sae.b_dec: g_b_dec, sae.threshold: g_theta_F}
        for param, grad in grads.items():
            param.grad = grad
        return StepLoss(mse + coeff * sparsity, mse, sparsity, x_hat_BD, fired_F, counts_F, grads_done=True)

    def autograd_loss(self, x_BD: torch.Tensor, step: int, detail: bool = True) -> StepLoss:
        """The objective as an autograd graph (tanh penalty; reference for the fused step)."""
        sae, cfg = self.sae, self.cfg
        with self.autocast():
            pre_BF = self.encoder_pre(x_BD)
            feats_BF = _JumpReLU.apply(pre_BF, sae.threshold, cfg.jumprelu_bandwidth)
            x_hat_BD = torch.addmm(sae.b_dec, feats_BF, sae.W_dec).float()
            mse = mse_of(x_BD, x_hat_BD)
            if cfg.jumprelu_l0_mode == "step":
                sparsity = _Step.apply(pre_BF, sae.threshold, cfg.jumprelu_bandwidth).float().sum() / x_BD.shape[0]
            else:
                scaled_BF = feats_BF * (cfg.jumprelu_tanh_scale * sae.W_dec.norm(dim=-1))
                sparsity = torch.tanh(scaled_BF).float().sum() / x_BD.shape[0]
        coeff = cfg.l1_coefficient * sparsity_multiplier(step, cfg.total_steps, cfg.l1_warmup_frac)
        with torch.no_grad():
            counts_F = count_nonzero_columns(feats_BF) if detail else None
            fired_F = feats_BF.detach().sum(0) > 0  # active features are > threshold > 0
        return StepLoss(mse + coeff * sparsity, mse.detach(), sparsity.detach(), x_hat_BD.detach(), fired_F, counts_F)

    @torch.no_grad()
    def after_step(self) -> None:
        self.sae.threshold.clamp_(min=1e-6)
