"""TopK SAE trainer (Gao et al. 2024): MSE + AuxK loss on dead latents.

Decoder rows are free (no renormalisation): a latent's contribution is relu(pre)·W_dec_f, and
the k kept are those with the largest relu(pre)·‖W_dec_f‖, the norm of what they add. Rows
start small (init_decoder_norm, W_enc = W_decᵀ) and the saved SAE has the norms folded into
the encoder (unit rows, the same function). On the demo's activations (bench_frontier.py, 1.2M
tokens, k = 16 / 32 / 64) this lifted held-out EV from 0.954 / 0.969 / 0.980 (unit rows
renormalised after each step, W_enc = W_decᵀ at norm 1) to 0.962 / 0.977 / 0.986.

Only the encoder's forward matmul is dense. Its backward and the decoder (forward and
backward) touch only the k active latents per token, as sparse [F, B] × dense products:
B·K·D multiply-adds each instead of B·F·D."""

from __future__ import annotations

import copy

import torch
import torch.nn.functional as F_nn

from sae_transfer.sae.batchtopk import batch_topk
from sae_transfer.training.trainers.base import StepLoss, Trainer, mse_of


def _sparse_FB(latent_N: torch.Tensor, token_N: torch.Tensor, vals_N: torch.Tensor, d_sae: int, n_tokens: int) -> torch.Tensor:
    """The [F, B] sparse (COO) matrix holding vals_N[n] at (latent_N[n], token_N[n])."""
    return torch.sparse_coo_tensor(torch.stack([latent_N, token_N]), vals_N, (d_sae, n_tokens), check_invariants=False)


def _csr_BF(crow_B1: torch.Tensor, latent_N: torch.Tensor, vals_N: torch.Tensor, d_sae: int) -> torch.Tensor:
    """The [B, F] sparse (CSR) matrix with row b holding vals at latent_N[crow[b]:crow[b+1]]."""
    return torch.sparse_csr_tensor(crow_B1, latent_N, vals_N, (crow_B1.numel() - 1, d_sae), check_invariants=False)


def select_topk(pre_BF: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-token top-k of ReLU(pre): (vals [B·K] fp32, token [B·K], latent [B·K]) in CSR order."""
    vals_BK, idx_BK = pre_BF.topk(k, dim=-1, sorted=False)
    idx_BK, order_BK = idx_BK.sort(dim=-1)
    vals_BK = torch.relu(vals_BK.gather(1, order_BK)).float()
    return vals_BK.flatten(), token_index(*idx_BK.shape, device=pre_BF.device), idx_BK.flatten()


def select_batch_topk(pre_BF: torch.Tensor, k: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The B·k largest ReLU(pre) of the whole batch, as (vals fp32, token, latent) in CSR order.

    Exact but cheap (`batch_topk`): each token offers its top 4k candidates and the batch's
    selection is made among those; a token whose 4k-th candidate beats the cut-off (it might
    hold more) offers 8k, 16k, .. until none does. Never sorts the B·F values. One host read
    per round: one per step unless some token holds more than 4k of the batch's largest, then
    at most ceil(log2(F / 4k)) in all (exactness without a B·F sort needs a data-dependent width)."""
    B, F = pre_BF.shape
    n_keep = min(k * B, B * F)
    vals_N, flat_N = batch_topk(pre_BF, n_keep, 4 * k)
    flat_N, order_N = flat_N.sort()
    return vals_N[order_N].float(), flat_N // F, flat_N % F


class _SparseEncode(torch.autograd.Function):
    """(x [B,D] fp32, W_enc [D,F], bias [F], select, compute dtype) -> active (vals [N] fp32,
    token [N], latent [N]), where select(pre_BF) picks them (TopK or BatchTopK) in CSR order;
    the encoder matmul runs in the compute dtype.

    Backward touches only the active latents: grad W_enc = (S x)ᵀ with S the [F, B] sparse
    matrix of active-latent gradients (N·D multiply-adds instead of B·F·D), in fp32."""

    @staticmethod
    def forward(ctx, x_BD, W_enc_DF, bias_F, select, cdt):
        pre_BF = torch.addmm(bias_F.to(cdt), x_BD.to(cdt), W_enc_DF.to(cdt))
        vals_N, token_N, latent_N = select(pre_BF)
        ctx.save_for_backward(x_BD, vals_N, token_N, latent_N)
        ctx.d_sae = W_enc_DF.shape[1]
        ctx.mark_non_differentiable(token_N, latent_N)
        return vals_N, token_N, latent_N

    @staticmethod
    def backward(ctx, g_vals_N, _g_token, _g_latent):
        x_BD, vals_N, token_N, latent_N = ctx.saved_tensors
        g_N = (g_vals_N * (vals_N > 0)).to(x_BD.dtype)
        g_bias_F = torch.zeros(ctx.d_sae, dtype=g_N.dtype, device=g_N.device).index_add_(0, latent_N, g_N)
        g_W_enc_FD = torch.sparse.mm(_sparse_FB(latent_N, token_N, g_N, ctx.d_sae, x_BD.shape[0]), x_BD)
        return None, g_W_enc_FD.T, g_bias_F, None, None


def sparse_encode(trainer, x_BD: torch.Tensor, select) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Active (vals, token, latent) of trainer.sae on x_BD, differentiable through vals."""
    sae = trainer.sae
    bias_F = sae.b_enc - sae.b_dec @ sae.W_enc if sae.cfg.apply_b_dec_to_input else sae.b_enc
    return _SparseEncode.apply(x_BD, sae.W_enc, bias_F, select, trainer.compute_dtype)


def csr_rows(token_N: torch.Tensor, n_tokens: int) -> torch.Tensor:
    """CSR row pointer [B+1] for sorted token ids (binary searches: no host sync on CUDA,
    unlike bincount, whose output size waits on the device)."""
    return torch.searchsorted(token_N, torch.arange(n_tokens + 1, device=token_N.device, dtype=token_N.dtype))


def token_index(B: int, K: int, device: torch.device | str = "cpu") -> torch.Tensor:
    """[B·K] token of each flattened (token, slot) pair: 0,0,..,1,1,.."""
    return torch.arange(B, device=device).repeat_interleave(K)


class _SparseDecode(torch.autograd.Function):
    """x̂ [B, D] = S W_dec for the sparse [B, F] activations S given as CSR (crow [B+1],
    latent [N] ascending within a row, vals [N]; token [N] is the row of each entry). Forward
    and backward read only the active rows of W_dec: the value gradient is a sampled
    dense-dense product (B·K·D work)."""

    @staticmethod
    def forward(ctx, vals_N, crow_B1, latent_N, token_N, W_dec_FD):
        S_BF = _csr_BF(crow_B1, latent_N, vals_N, W_dec_FD.shape[0])
        ctx.save_for_backward(vals_N, crow_B1, latent_N, token_N, W_dec_FD)
        return S_BF @ W_dec_FD

    @staticmethod
    def backward(ctx, g_BD):
        vals_N, crow_B1, latent_N, token_N, W_dec_FD = ctx.saved_tensors
        pattern_BF = _csr_BF(crow_B1, latent_N, torch.ones_like(vals_N), W_dec_FD.shape[0])
        g_vals_N = torch.sparse.sampled_addmm(pattern_BF, g_BD, W_dec_FD.T, beta=0.0).values()
        g_W_dec_FD = torch.sparse.mm(_sparse_FB(latent_N, token_N, vals_N, W_dec_FD.shape[0], g_BD.shape[0]), g_BD)
        return g_vals_N, None, None, None, g_W_dec_FD


def sparse_decode(vals_N, crow_B1, latent_N, token_N, W_dec_FD) -> torch.Tensor:
    """x̂ [B, D] (without b_dec) from CSR-ordered active latents (see _SparseDecode); fp32."""
    return _SparseDecode.apply(vals_N, crow_B1, latent_N, token_N, W_dec_FD)


def aux_k_loss(x_BD, x_hat_BD, pre_BF, W_dec_FD, dead_F, aux_k: int) -> torch.Tensor:
    """AuxK (Gao et al.): the top-`aux_k` dead latents model the residual x − x̂; returns their
    squared error normalised by the residual's, so it is O(1) whatever the MSE scale (0 when
    no latent is dead).

    No host sync: the top-k runs over the pre-activations with the live latents masked to −inf;
    where fewer than aux_k latents are dead the extra picks are live ones of weight relu(−inf) = 0."""
    residual_BD = (x_BD - x_hat_BD).detach()
    vals_BK, idx_BK = pre_BF.masked_fill(~dead_F, float("-inf")).topk(min(aux_k, pre_BF.shape[-1]), dim=-1, sorted=False)
    weights_BK = torch.relu(vals_BK).to(W_dec_FD.dtype)
    e_hat_BD = F_nn.embedding_bag(idx_BK, W_dec_FD, per_sample_weights=weights_BK, mode="sum")
    loss = (e_hat_BD - residual_BD).pow(2).sum(-1).mean() / residual_BD.pow(2).sum(-1).mean().clamp_min(1e-12)
    return torch.where(dead_F.any(), loss, 0.0)


def norm_scores(pre_BF: torch.Tensor, W_dec_FD: torch.Tensor) -> torch.Tensor:
    """Selection scores [B, F]: pre-activations × decoder row norms (detached), so a latent
    ranks by the size of what it would add to the reconstruction."""
    return pre_BF * W_dec_FD.detach().norm(dim=-1).to(pre_BF.dtype)


@torch.no_grad()
def fold_decoder_norms(sae) -> None:
    """In place: W_enc·n, b_enc·n, W_dec/n with n the decoder row norms. The pre-activations
    become the selection scores and every row has unit norm: the same reconstruction."""
    n_F = sae.W_dec.norm(dim=-1).clamp_min(1e-12)
    sae.W_enc.mul_(n_F)
    sae.b_enc.mul_(n_F)
    sae.W_dec.div_(n_F.unsqueeze(1))


class TopKTrainer(Trainer):
    def select(self, pre_BF: torch.Tensor):
        """Active latents of a batch of pre-activations: per-token top-k of the norm scores;
        the values are the kept latents' ReLU(pre) (fp32, CSR order)."""
        _, token_N, latent_N = select_topk(norm_scores(pre_BF, self.sae.W_dec), self.sae.cfg.k)
        return torch.relu(pre_BF[token_N, latent_N]).float(), token_N, latent_N

    def inference_sae(self):
        """A copy of the SAE with the decoder norms folded in (what is saved)."""
        sae = copy.deepcopy(self.sae)
        fold_decoder_norms(sae)
        return sae

    def loss(self, x_BD: torch.Tensor, step: int, dead_F: torch.Tensor | None, detail: bool = True) -> StepLoss:
        sae, cfg = self.sae, self.cfg
        if self.sparse_kernels == "dense":
            vals_N, latent_N, x_hat_BD, pre_BF = self.dense_forward(x_BD)
        else:
            vals_N, token_N, latent_N = sparse_encode(self, x_BD, self.select)
            crow_B1 = csr_rows(token_N, x_BD.shape[0])
            x_hat_BD = sparse_decode(vals_N, crow_B1, latent_N, token_N, sae.W_dec) + sae.b_dec
            pre_BF = None
        mse = mse_of(x_BD, x_hat_BD)
        loss = mse
        if cfg.aux_coefficient and dead_F is not None:
            aux_k = cfg.aux_k or sae.d_in // 2
            if pre_BF is None:
                with self.autocast():
                    pre_BF = self.encoder_pre(x_BD)
            loss = loss + cfg.aux_coefficient * aux_k_loss(x_BD, x_hat_BD, pre_BF, sae.W_dec, dead_F, aux_k)
        with torch.no_grad():
            positive_N = vals_N > 0
            fire_count_F = torch.zeros(sae.d_sae, device=x_BD.device).index_add_(0, latent_N, positive_N.float())
            self.after_selection(vals_N.detach(), positive_N)
        return StepLoss(loss, mse.detach(), x_BD.new_zeros(()), x_hat_BD.detach(), fire_count_F > 0, fire_count_F)

    def dense_forward(self, x_BD: torch.Tensor):
        """The same objective through dense [B, F] matmuls (5 GEMMs, no sparse formats or host
        syncs): (vals [N], latent [N], x̂ [B, D] fp32, pre [B, F] with grad)."""
        sae = self.sae
        with self.autocast():
            pre_BF = self.encoder_pre(x_BD)
            _, token_N, latent_N = self.select(pre_BF.detach())
            vals_N = torch.relu(pre_BF[token_N, latent_N])
            feats_BF = pre_BF.new_zeros(pre_BF.shape).index_put((token_N, latent_N), vals_N)
            x_hat_BD = torch.addmm(sae.b_dec, feats_BF, sae.W_dec).float()
        return vals_N.float(), latent_N, x_hat_BD, pre_BF

    def after_selection(self, vals_N: torch.Tensor, positive_N: torch.Tensor) -> None:
        """Hook for statistics of the kept activations (BatchTopK's threshold); device-side."""
