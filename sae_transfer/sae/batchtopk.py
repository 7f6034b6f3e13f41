"""BatchTopK SAE (Bussmann et al. 2024): the batch keeps its N·k largest activations overall,
N the number of tokens in it (B for [B, F] input, B·S for [B, S, F]).

During training the selection is batch-level; for inference the SAE is a JumpReLU whose
threshold is the running estimate of the smallest kept activation (`threshold` buffer)."""

from __future__ import annotations

import torch

from sae_transfer.sae.base import SAE, SAEConfig
from sae_transfer.sae.jumprelu import JumpReluSAE


def batch_topk(pre_BF: torch.Tensor, n_keep: int, c: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The n_keep largest ReLU(pre) of the whole [B, F] batch: (vals [n_keep], flat index
    b·F + f [n_keep]), unordered; differentiable through vals. Never sorts or copies all B·F.

    Each row offers its top c candidates; the n_keep largest of all candidates give a cut-off.
    A row whose smallest candidate beats the cut-off may hold more, so it offers 2c (4c, ..,
    up to F) and the selection is redone, until no row is cut off (a host sync per round; one
    round unless a row, e.g. a high-norm BOS token, holds more than c of the batch's largest).

    Exact: the candidates only grow from round to round, so the cut-off (the n_keep-th largest
    candidate) never falls. At the end every row either offers all F values or its smallest
    candidate m_r was <= the cut-off of some round, hence <= the final cut-off; its other
    values are <= m_r. So nothing outside the candidates exceeds the final cut-off, and the
    n_keep largest candidates (all >= it) are n_keep largest values of the batch: the same
    values as relu(pre).flatten().topk(n_keep), the same set up to ties. Memory: the rows still
    open (each holds more than c of the n_keep kept, so at most n_keep / c of them, B/4 for
    c = 4k) are copied once per round; candidates take O(n_keep) entries."""
    B, F = pre_BF.shape
    c = max(1, min(F, c))
    done_vals, done_flat = [], []  # candidates of the rows that are settled
    open_B = None  # rows still open (None: all)
    while True:
        rows_RF = pre_BF if open_B is None else pre_BF.index_select(0, open_B)
        vals_RC, idx_RC = rows_RF.topk(c, dim=-1, sorted=False)
        vals_RC = torch.relu(vals_RC)  # relu is monotone: the top c of pre are those of relu(pre)
        row_R1 = (torch.arange(B, device=pre_BF.device) if open_B is None else open_B)[:, None]
        flat_RC = row_R1 * F + idx_RC
        vals_M = torch.cat([*done_vals, vals_RC.flatten()])
        flat_M = torch.cat([*done_flat, flat_RC.flatten()])
        vals_N, pos_N = vals_M.topk(n_keep, sorted=False)
        if c >= F:
            break
        cut_off_R = vals_RC.detach().min(dim=-1).values > vals_N.detach().min()
        if not bool(cut_off_R.any()):
            break
        settled_R = ~cut_off_R
        done_vals.append(vals_RC[settled_R].flatten())
        done_flat.append(flat_RC[settled_R].flatten())
        open_B = row_R1[cut_off_R, 0]
        c = min(F, 2 * c)
    return vals_N, flat_M[pos_N]


class BatchTopKSAE(SAE):
    """Training-time form. `activation` keeps the N·k largest ReLU pre-activations of the batch
    (N tokens), so the mean number of active features per token is k."""

    def __init__(self, cfg: SAEConfig):
        super().__init__(cfg)
        if not cfg.k or cfg.k < 1:
            raise ValueError(f"k={cfg.k}: batchtopk needs k >= 1 (mean active features per token)")
        # Running mean of the smallest kept activation; -1 means "not estimated yet".
        self.register_buffer("threshold", torch.tensor(-1.0))

    def activation(self, pre_F: torch.Tensor) -> torch.Tensor:
        """Feature activations, same shape as `pre_F` ([..., F]): every leading dim is tokens."""
        pre_BF = pre_F.reshape(-1, pre_F.shape[-1])
        n_keep = min(self.cfg.k * pre_BF.shape[0], pre_BF.numel())
        vals_N, flat_N = batch_topk(pre_BF, n_keep, 4 * self.cfg.k)
        return torch.zeros_like(pre_F).flatten().scatter(0, flat_N, vals_N).view_as(pre_F)

    def to_jumprelu(self) -> JumpReluSAE:
        """The inference SAE: same weights, every feature's threshold = the learned global one."""
        cfg = SAEConfig(**{**self.cfg.__dict__, "architecture": "jumprelu"})
        out = JumpReluSAE(cfg)
        with torch.no_grad():
            for name in ("W_enc", "b_enc", "W_dec", "b_dec"):
                getattr(out, name).copy_(getattr(self, name))
            out.threshold.fill_(max(float(self.threshold), 0.0))
        return out
