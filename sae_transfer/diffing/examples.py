"""Max-activating examples (issue 10, analysis 5): for every latent of a dictionary, its top-k
tokens on one model's cached activations, the context window around each, and an activation
histogram.

Two passes, memory O(latents × k) whatever the number of tokens:

1. One streaming pass over the cache (`MaxActTracker.add`). Per batch, the non-zero
   activations are listed once (b, j, f); they fill the histogram, and only those above their
   latent's current k-th best value are merged into the running top-k, which is held as
   (activation, seq_id, pos) only: [F, k] tensors. After the first batches almost nothing
   passes the k-th-value test, so the merge (a stable sort of the few candidates together with
   their latents' running entries) costs little next to the encoder.
2. `window_activations` re-encodes just the rows of the winners' sequences (a cheap read of
   those sequences only) and gathers each winner's latent over its token window.

Ties: a token replaces a kept one only with a strictly larger activation, and equal candidates
keep token order, so the result equals a stable sort of all tokens by activation (earlier
tokens first among equals), which is what the tests compare against.

Histogram bins are fixed and log-spaced (`bins_per_decade` from `hist_min` to `hist_max`,
feature-activation units), plus an underflow bin (0 < f < hist_min) and an overflow bin
(f >= hist_max); bin i >= 1 holds [edge[i-1], edge[i]).

Shape letters besides the package legend: here K is the k contexts kept per latent; H histogram
bins, N non-zero activations of a batch, C merge candidates, W winners, X window positions,
R cached rows.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch

from sae_transfer.models import check_device
from sae_transfer.sae.base import SAE
from sae_transfer.sae.jumprelu import JumpReluSAE
from sae_transfer.sae.relu import ReluSAE


@dataclass(frozen=True)
class ExamplesConfig:
    """How max-activating examples are collected."""

    k: int = 10  # contexts kept per latent
    window_before: int = 12  # tokens shown before the max-activating token
    window_after: int = 4  # tokens shown after it
    hist_min: float = 1e-3  # lowest histogram edge (feature units); smaller activations: underflow bin
    hist_max: float = 1e3  # highest edge; larger activations: overflow bin
    bins_per_decade: int = 4  # log-spaced bins per factor of 10 (24 bins for the defaults)
    batch_tokens: int = 8192  # rows encoded at once (holds batch_tokens × d_sae floats)
    device: str | None = None  # None: CUDA when available, else CPU

    @property
    def edges(self) -> np.ndarray:
        """Histogram edges [n_bins + 1] (feature units)."""
        n = round(math.log10(self.hist_max / self.hist_min) * self.bins_per_decade)
        return np.logspace(math.log10(self.hist_min), math.log10(self.hist_max), n + 1)


@dataclass
class MaxActs:
    """The running top-k per latent and the histogram, on the CPU."""

    n_tokens: int  # tokens seen
    value_FK: torch.Tensor  # float32, descending per latent; 0 where the latent fired < k times
    seq_FK: torch.Tensor  # int64 seq_id of each kept token (-1: empty)
    pos_FK: torch.Tensor  # int64 position of each kept token (-1: empty)
    hist_FH: torch.Tensor  # int64 counts per bin: [underflow, bins..., overflow]
    edges: np.ndarray  # the histogram's bin edges

    def winners(self) -> dict[str, np.ndarray]:
        """The kept tokens as flat columns latent, rank, activation, seq_id, pos (rank 0 = best)."""
        f, r = (self.value_FK > 0).nonzero(as_tuple=True)
        return {"latent": f.numpy(), "rank": r.numpy(), "activation": self.value_FK[f, r].double().numpy(),
                "seq_id": self.seq_FK[f, r].numpy(), "pos": self.pos_FK[f, r].numpy()}


class MaxActTracker:
    """Streaming top-k tokens per latent plus an activation histogram (see module doc)."""

    def __init__(self, d_sae: int, cfg: ExamplesConfig = ExamplesConfig(), device: torch.device | str = "cpu"):
        self.cfg, self.k, self.device = cfg, cfg.k, torch.device(device)
        self.n_tokens = 0
        self.value_FK = torch.zeros(d_sae, cfg.k, device=device)
        self.seq_FK = torch.full((d_sae, cfg.k), -1, dtype=torch.int64, device=device)
        self.pos_FK = torch.full((d_sae, cfg.k), -1, dtype=torch.int64, device=device)
        self.edges_t = torch.tensor(cfg.edges, dtype=torch.float32, device=device)
        self.hist_FH = torch.zeros(d_sae, len(cfg.edges) + 1, dtype=torch.int64, device=device)

    def add(self, feats_BF: torch.Tensor, seq_B: torch.Tensor, pos_B: torch.Tensor) -> None:
        """Fold in a batch of feature activations of the tokens (seq_B, pos_B)."""
        F = feats_BF.shape[1]
        flat_N = (feats_BF > 0).view(-1).nonzero().squeeze(1)  # token-major order
        v_N = feats_BF.view(-1).index_select(0, flat_N)
        self.add_sparse(v_N, flat_N // F, flat_N % F, seq_B.to(self.device), pos_B.to(self.device))
        self.n_tokens += feats_BF.shape[0]

    def add_sparse(self, v_N: torch.Tensor, b_N: torch.Tensor, f_N: torch.Tensor, seq_B: torch.Tensor,
                   pos_B: torch.Tensor) -> None:
        """Fold in the non-zero activations v_N of latents f_N at batch rows b_N (token order)."""
        H = self.hist_FH.shape[1]
        bins_N = torch.bucketize(v_N.float(), self.edges_t, right=True)
        self.hist_FH.view(-1).index_add_(0, f_N * H + bins_N, torch.ones_like(bins_N))
        cand = v_N > self.value_FK[f_N, self.k - 1]
        if bool(cand.any()):
            b_C = b_N[cand]
            self._merge(v_N[cand].float(), f_N[cand], seq_B[b_C], pos_B[b_C])

    def _merge(self, v_C: torch.Tensor, f_C: torch.Tensor, seq_C: torch.Tensor, pos_C: torch.Tensor) -> None:
        k = self.k
        lat_L = torch.unique(f_C)  # sorted
        held = self.value_FK[lat_L] > 0
        l_held = lat_L[:, None].expand(-1, k)[held]
        # running entries first: among equal activations, the earlier token stays ahead
        v = torch.cat([self.value_FK[lat_L][held], v_C])
        lat = torch.cat([l_held, f_C])
        seq = torch.cat([self.seq_FK[lat_L][held], seq_C])
        pos = torch.cat([self.pos_FK[lat_L][held], pos_C])
        order = torch.sort(v, descending=True, stable=True).indices
        order = order[torch.sort(lat[order], stable=True).indices]
        lat = lat[order]
        _, counts = torch.unique_consecutive(lat, return_counts=True)
        starts = torch.cumsum(counts, 0) - counts
        rank = torch.arange(len(lat), device=lat.device) - torch.repeat_interleave(starts, counts)
        keep = rank < k
        row, col, order = torch.searchsorted(lat_L, lat[keep]), rank[keep], order[keep]
        new_v = torch.zeros(len(lat_L), k, device=v.device)
        new_s = torch.full((len(lat_L), k), -1, dtype=torch.int64, device=v.device)
        new_p = new_s.clone()
        new_v[row, col], new_s[row, col], new_p[row, col] = v[order], seq[order], pos[order]
        self.value_FK[lat_L], self.seq_FK[lat_L], self.pos_FK[lat_L] = new_v, new_s, new_p

    def result(self) -> MaxActs:
        """The top-k and histogram so far, on the CPU."""
        return MaxActs(self.n_tokens, self.value_FK.cpu(), self.seq_FK.cpu(), self.pos_FK.cpu(),
                       self.hist_FH.cpu(), self.cfg.edges)


def _device(cfg: ExamplesConfig) -> torch.device:
    return torch.device(check_device(cfg.device))


@torch.inference_mode()
def collect_max_acts(sae: SAE, batches, cfg: ExamplesConfig = ExamplesConfig()) -> MaxActs:
    """Pass 1 over `batches` (objects with seq_id_B, pos_B and raw acts_BD, in any order).

    `sae` is applied as given, and must be float32 on cfg's device: pass
    `latent_stats.applied_sae(sae, s_eval, device)` (which also rescales it for another model)."""
    device = _device(cfg)
    tracker = MaxActTracker(sae.d_sae, cfg, device)
    for batch in batches:
        for s in range(0, len(batch.seq_id_B), cfg.batch_tokens):
            x_BD = batch.acts_BD[s:s + cfg.batch_tokens].to(device, torch.float32)
            tracker.add(sae.encode(x_BD), batch.seq_id_B[s:s + cfg.batch_tokens], batch.pos_B[s:s + cfg.batch_tokens])
    return tracker.result()


@torch.inference_mode()
def window_activations(sae: SAE, rows, winners: dict[str, np.ndarray], cfg: ExamplesConfig = ExamplesConfig()) -> dict:
    """Pass 2 for the winners whose sequences are in `rows` (whole sequences, sorted by
    (seq_id, pos), with seq_id_B, pos_B, token_id_B, acts_BD).

    `sae` as for `collect_max_acts`. Returns the winners' columns plus `window_start` (first
    position shown) and the windows as flat lists with offsets: `token_ids` / `acts` values and
    `window_offsets` [n + 1]; `acts` is the winner's latent at each window token (feature units).
    For ReLU and JumpReLU SAEs only the winner's latent is computed at each window token."""
    device = _device(cfg)
    seq_R = rows.seq_id_B.to(device)
    here = torch.isin(torch.from_numpy(winners["seq_id"]).to(device), seq_R)
    sel = here.cpu().numpy()
    w = {name: col[sel] for name, col in winners.items()}
    seq_W, pos_W = torch.from_numpy(w["seq_id"]).to(device), torch.from_numpy(w["pos"]).to(device)
    first_W = torch.searchsorted(seq_R, seq_W)  # row of each winner's sequence start
    length_W = torch.searchsorted(seq_R, seq_W, right=True) - first_W
    lo_W = (pos_W - cfg.window_before).clamp(min=0)
    hi_W = torch.minimum(pos_W + cfg.window_after, length_W - 1)
    width = cfg.window_before + cfg.window_after + 1
    offs_WX = lo_W[:, None] + torch.arange(width, device=device)[None, :]
    valid_WX = offs_WX <= hi_W[:, None]
    rows_WX = torch.where(valid_WX, first_W[:, None] + offs_WX, torch.zeros_like(offs_WX))
    lat_W, acts_RD = torch.from_numpy(w["latent"]).to(device), rows.acts_BD.to(device)
    if _elementwise(sae):
        acts_WX = _window_pre_acts(sae, acts_RD, rows_WX, lat_W, cfg.batch_tokens)
    else:  # TopK-style activations depend on the other latents: encode the window rows whole
        acts_WX = _window_encoded(sae, acts_RD, rows_WX, valid_WX, lat_W, cfg.batch_tokens)
    acts_WX = acts_WX * valid_WX
    tokens_WX = rows.token_id_B.to(device)[rows_WX]
    lengths = valid_WX.sum(1).cpu().numpy()
    return {**w, "window_start": lo_W.cpu().numpy(),
            "window_offsets": np.concatenate([[0], np.cumsum(lengths)]).astype(np.int32),
            "token_ids": tokens_WX[valid_WX].cpu().numpy(), "acts": acts_WX[valid_WX].cpu().numpy()}


def _elementwise(sae: SAE) -> bool:
    """True when a latent's activation depends on its own pre-activation only (ReLU, JumpReLU)."""
    return type(sae) in (ReluSAE, JumpReluSAE)


def _window_pre_acts(sae: SAE, acts_RD: torch.Tensor, rows_WX: torch.Tensor, lat_W: torch.Tensor, chunk: int) -> torch.Tensor:
    """Each winner's latent over its window rows, for ReLU/JumpReLU SAEs: one dot product of D
    per window token with that latent's encoder column (pass 2 costs W·X·D, not rows·F·D)."""
    out = torch.empty(rows_WX.shape, device=rows_WX.device)
    step = max(1, chunk * 4 // rows_WX.shape[1])  # winners per chunk: ~4 batches of rows gathered
    for s in range(0, rows_WX.shape[0], step):
        r_wx, j_w = rows_WX[s:s + step], lat_W[s:s + step]
        x_wxd = acts_RD[r_wx].float()
        if sae.cfg.apply_b_dec_to_input:
            x_wxd = x_wxd - sae.b_dec
        w_wd = sae.W_enc.index_select(1, j_w).T
        pre_wx = torch.einsum("wxd,wd->wx", x_wxd, w_wd) + sae.b_enc.index_select(0, j_w)[:, None]
        if isinstance(sae, JumpReluSAE):
            out[s:s + step] = pre_wx * (pre_wx > sae.threshold.index_select(0, j_w)[:, None])
        else:
            out[s:s + step] = torch.relu(pre_wx)
    return out


def _window_encoded(sae: SAE, acts_RD: torch.Tensor, rows_WX: torch.Tensor, valid_WX: torch.Tensor, lat_W: torch.Tensor,
                    chunk: int) -> torch.Tensor:
    """Each winner's latent over its window rows, encoding each distinct window row once."""
    device = rows_WX.device
    needed_U, inverse = torch.unique(rows_WX[valid_WX], return_inverse=True)
    lat = lat_W[:, None].expand_as(valid_WX)[valid_WX]
    x_UD = acts_RD[needed_U]
    vals = torch.empty(lat.shape[0], device=device)
    for s in range(0, len(needed_U), chunk):
        feats_UF = sae.encode(x_UD[s:s + chunk].float())
        in_chunk = (inverse >= s) & (inverse < s + chunk)
        vals[in_chunk] = feats_UF[inverse[in_chunk] - s, lat[in_chunk]]
    out = torch.zeros(valid_WX.shape, device=device)
    out[valid_WX] = vals
    return out
