"""Matching the latents of two SAEs (issue 10, analysis 2): base SAE vs chat SAE, or a base
SAE vs its fine-tuned child.

1. Decoder cosine + one-to-one assignment. The weight of pair (i, j) is cos(d_i^A, d_j^B) − m
   (m = `min_cosine`; pairs at or below m are never matched), and the assignment maximises the
   total weight over partial one-to-one matchings (a latent may stay unmatched).
   - Small problems (F_A·F_B ≤ `dense_max_pairs`): `scipy.optimize.linear_sum_assignment` on
     the full matrix of weights clipped at 0: the exact optimum over all pairs.
   - At 65k latents the dense matrix alone is 34 GB, so the same problem is solved on the
     top-c candidate graph: pair (i, j) is an edge when j is among i's c best decoder cosines
     or i among j's (computed in row chunks, memory O(F·c)). Scipy's sparse Jonker–Volgenant
     solver (`min_weight_full_bipartite_matching`, LAPJVsp: the sparse form of the algorithm
     `linear_sum_assignment` implements) then runs on an augmented graph that always has a full
     matching: rows = A latents + one dummy per B latent, columns = B latents + one dummy per A
     latent; A_i–dummy_i and dummy_j–B_j are "unmatched" edges, and dummy_j–dummy_i exists for
     every candidate edge (i, j) so the dummies of a matched pair can pair up. Every full
     matching has F_A + F_B edges, so with cost 3 − w on real edges and 3 elsewhere it
     minimises −Σ w over the matched pairs: the same optimum as the dense solver whenever the
     optimal pairs are among the candidates (tests check both agree).
2. Activation correlation of matched pairs on the same tokens: streaming Pearson correlation
   (per-batch moments merged as in Chan et al. 1979, in float64).
3. Drift of a fine-tuned SAE from its parent, latent by latent (same index): cosine and norm
   ratio of each encoder column and decoder row, in each SAE's training (scaled) units, and the
   change of the encoder bias (the study's stage-wise view).

Shape letters besides the package legend: G latents of the second SAE, R rows of one chunk of
the cosine matrix, C candidates kept per latent, P matched pairs.
"""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

import numpy as np
import torch

from sae_transfer.models import check_device
from sae_transfer.sae.base import SAE
from sae_transfer.sae.scaling import fold_scale, training_scale

_COST_OFFSET = 3.0  # > 1 + max weight (2), so every sparse edge cost is non-zero (scipy drops zeros)


@dataclass(frozen=True)
class MatchConfig:
    """How two SAEs' latents are matched."""

    candidates: int = 8  # c: best decoder cosines kept per latent on each side (sparse solver's edges)
    min_cosine: float = 0.0  # pairs with decoder cosine <= this stay unmatched
    dense_max_pairs: int = 1 << 24  # F_A·F_B up to which the exact dense Hungarian runs (128 MiB of float64)
    chunk_rows: int = 2048  # rows of the cosine matrix computed at once (chunk_rows × F_B floats)
    batch_tokens: int = 8192  # tokens per batch of the activation-correlation pass
    device: str | None = None  # None: CUDA when available, else CPU


@dataclass
class Matching:
    """A one-to-one assignment between latents of A and B (numpy arrays [P])."""

    latent_a: np.ndarray  # int64
    latent_b: np.ndarray  # int64
    dec_cos: np.ndarray  # float64: decoder cosine of the pair
    enc_cos: np.ndarray  # float64: encoder (column) cosine of the pair
    method: str  # "dense" or "sparse-top<c>"


def _device(cfg) -> torch.device:
    return torch.device(check_device(cfg.device))


def unit_rows(W_FD: torch.Tensor) -> torch.Tensor:
    """Rows scaled to unit norm (float32); all-zero rows stay zero."""
    return torch.nn.functional.normalize(W_FD.detach().float(), dim=-1)


def candidate_edges(A_FD: torch.Tensor, B_GD: torch.Tensor, c: int,
                    chunk_rows: int = 2048) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(i, j, cosine) of the union of each row's top-c and each column's top-c cosines between
    unit rows A [F, D] and B [G, D]; memory O((F + G)·c) plus one [chunk_rows, G] block."""
    F, G = A_FD.shape[0], B_GD.shape[0]
    c_row, c_col = min(c, G), min(c, F)
    chunk_rows = max(chunk_rows, c_col)  # the first chunk must hold each column's c best rows
    rows_i, rows_j, col_vals, col_idx = [], [], None, None
    for start in range(0, F, chunk_rows):
        cos_RG = A_FD[start:start + chunk_rows] @ B_GD.T
        _, j_RC = cos_RG.topk(c_row, dim=1)
        rows_i.append((torch.arange(cos_RG.shape[0], device=cos_RG.device)[:, None] + start).expand_as(j_RC).reshape(-1))
        rows_j.append(j_RC.reshape(-1))
        v_CG, i_CG = cos_RG.topk(min(c_col, cos_RG.shape[0]), dim=0)
        i_CG = i_CG + start
        if col_vals is not None:  # merge with the best rows of the chunks before
            v_CG, pick = torch.cat([col_vals, v_CG]).topk(c_col, dim=0)
            i_CG = torch.cat([col_idx, i_CG]).gather(0, pick)
        col_vals, col_idx = v_CG, i_CG
    cols_j = torch.arange(G, device=A_FD.device)[None, :].expand_as(col_idx).reshape(-1)
    i_all = torch.cat(rows_i + [col_idx.reshape(-1)]).cpu().numpy()
    j_all = torch.cat(rows_j + [cols_j]).cpu().numpy()
    key = np.unique(i_all.astype(np.int64) * G + j_all)
    i, j = key // G, key % G
    cos = (A_FD[torch.from_numpy(i).to(A_FD.device)] * B_GD[torch.from_numpy(j).to(A_FD.device)]).sum(-1)
    return i, j, cos.double().cpu().numpy()


def _sparse_assignment(i: np.ndarray, j: np.ndarray, w: np.ndarray, F: int, G: int) -> tuple[np.ndarray, np.ndarray]:
    """Max-weight partial matching on edges (i, j, w > 0) via the augmented full matching."""
    from scipy.sparse import coo_matrix  # deferred: scipy takes ~0.6 s to import
    from scipy.sparse.csgraph import min_weight_full_bipartite_matching

    ar_f, ar_g = np.arange(F), np.arange(G)
    rows = np.concatenate([i, ar_f, F + ar_g, F + j])  # real, A unmatched, B unmatched, dummy pairs
    cols = np.concatenate([j, G + ar_f, ar_g, G + i])
    cost = np.concatenate([_COST_OFFSET - w, np.full(F + G + len(i), _COST_OFFSET)])
    graph = coo_matrix((cost, (rows, cols)), shape=(F + G, G + F)).tocsr()
    r, c = min_weight_full_bipartite_matching(graph)
    real = (r < F) & (c < G)
    return r[real], c[real]


def match_decoders(sae_a: SAE, sae_b: SAE, cfg: MatchConfig = MatchConfig()) -> Matching:
    """One-to-one matching of A's and B's latents by decoder cosine (see module doc)."""
    from scipy.optimize import linear_sum_assignment  # deferred: scipy takes ~0.6 s to import

    device = _device(cfg)
    A_FD, B_GD = unit_rows(sae_a.W_dec).to(device), unit_rows(sae_b.W_dec).to(device)
    F, G = A_FD.shape[0], B_GD.shape[0]
    if F * G <= cfg.dense_max_pairs:
        weight_FG = (A_FD @ B_GD.T - cfg.min_cosine).clamp(min=0).double().cpu().numpy()
        ia, jb = linear_sum_assignment(weight_FG, maximize=True)
        keep = weight_FG[ia, jb] > 0
        ia, jb, method = ia[keep], jb[keep], "dense"
    else:
        i, j, cos = candidate_edges(A_FD, B_GD, cfg.candidates, cfg.chunk_rows)
        w = cos - cfg.min_cosine
        keep = w > 0
        ia, jb = _sparse_assignment(i[keep], j[keep], w[keep], F, G)
        method = f"sparse-top{cfg.candidates}"
    ia_t, jb_t = torch.from_numpy(ia).to(device), torch.from_numpy(jb).to(device)
    dec_cos = (A_FD[ia_t] * B_GD[jb_t]).sum(-1)
    enc_a, enc_b = unit_rows(sae_a.W_enc.T).to(device), unit_rows(sae_b.W_enc.T).to(device)
    enc_cos = (enc_a[ia_t] * enc_b[jb_t]).sum(-1)
    order = np.argsort(ia, kind="stable")
    return Matching(ia[order].astype(np.int64), jb[order].astype(np.int64),
                    dec_cos.double().cpu().numpy()[order], enc_cos.double().cpu().numpy()[order], method)


class StreamingPearson:
    """Pearson correlation of P column pairs, accumulated over batches (float64 moments).

    Batches are merged with Chan et al.'s pairwise update, so the result equals the correlation
    over all rows at once up to rounding, however the rows are batched."""

    def __init__(self, n_pairs: int, device: torch.device | str = "cpu"):
        z = dict(dtype=torch.float64, device=device)
        self.n = 0
        self.mean_a, self.mean_b, self.m2_a, self.m2_b, self.c_ab = (torch.zeros(n_pairs, **z) for _ in range(5))

    def add(self, a_BP: torch.Tensor, b_BP: torch.Tensor) -> None:
        nb = a_BP.shape[0]
        if nb == 0:
            return
        a, b = a_BP.double(), b_BP.double()
        ma, mb = a.mean(0), b.mean(0)
        da, db = a - ma, b - mb
        n, tot = self.n, self.n + nb
        delta_a, delta_b = ma - self.mean_a, mb - self.mean_b
        self.m2_a += da.pow(2).sum(0) + delta_a.pow(2) * n * nb / tot
        self.m2_b += db.pow(2).sum(0) + delta_b.pow(2) * n * nb / tot
        self.c_ab += (da * db).sum(0) + delta_a * delta_b * n * nb / tot
        self.mean_a += delta_a * nb / tot
        self.mean_b += delta_b * nb / tot
        self.n = tot

    def result(self) -> np.ndarray:
        """Correlation per pair [P] (NaN where either side is constant)."""
        denom = (self.m2_a * self.m2_b).sqrt()
        corr = torch.where(denom > 0, self.c_ab / denom.clamp(min=1e-300), torch.full_like(denom, float("nan")))
        return corr.cpu().numpy()


@torch.inference_mode()
def activation_correlation(
    sae_a: SAE, sae_b: SAE, matching: Matching, batches: Iterable[tuple[torch.Tensor, torch.Tensor]],
    cfg: MatchConfig = MatchConfig(),
) -> tuple[np.ndarray, int]:
    """(Pearson correlation [P] of each matched pair's activations, tokens seen).

    `batches` yields (x_a_BD, x_b_BD): the activations each SAE reads on the same tokens (the
    same tensor twice when both read one model), already as each SAE should see them (pass
    `latent_stats.applied_sae` SAEs for another model's activations)."""
    device = _device(cfg)
    ia, jb = torch.from_numpy(matching.latent_a).to(device), torch.from_numpy(matching.latent_b).to(device)
    acc = StreamingPearson(len(ia), device)
    for x_a_BD, x_b_BD in batches:
        for s in range(0, x_a_BD.shape[0], cfg.batch_tokens):
            fa_BF = sae_a.encode(x_a_BD[s:s + cfg.batch_tokens].to(device, torch.float32))
            fb_BF = sae_b.encode(x_b_BD[s:s + cfg.batch_tokens].to(device, torch.float32))
            acc.add(fa_BF.index_select(1, ia), fb_BF.index_select(1, jb))
    return acc.result(), acc.n


def _training_units(sae: SAE) -> SAE:
    """The SAE in its training units (s_train unfolded: W_enc / s, W_dec · s)."""
    s = training_scale(sae)
    return fold_scale(sae, 1.0 / s) if s else sae


def _cos_and_ratio(child_FD: torch.Tensor, parent_FD: torch.Tensor) -> tuple[np.ndarray, np.ndarray]:
    child_FD, parent_FD = child_FD.detach().double(), parent_FD.detach().double()
    cos = torch.nn.functional.cosine_similarity(child_FD, parent_FD, dim=-1, eps=1e-30)
    ratio = child_FD.norm(dim=-1) / parent_FD.norm(dim=-1)
    return cos.cpu().numpy(), ratio.cpu().numpy()


def latent_drift(child: SAE, parent: SAE) -> dict[str, np.ndarray]:
    """Per latent (same index in both): encoder-column and decoder-row cosine and norm ratio
    (child / parent, training units), and b_enc change (child − parent, feature units)."""
    if (child.d_sae, child.d_in) != (parent.d_sae, parent.d_in):
        raise ValueError(f"child SAE is {child.d_in}x{child.d_sae}, parent {parent.d_in}x{parent.d_sae}: "
                         "drift needs the same shape")
    c, p = _training_units(child), _training_units(parent)
    enc_cos, enc_ratio = _cos_and_ratio(c.W_enc.T, p.W_enc.T)
    dec_cos, dec_ratio = _cos_and_ratio(c.W_dec, p.W_dec)
    return {
        "latent": np.arange(child.d_sae, dtype=np.int64), "enc_cos": enc_cos, "enc_norm_ratio": enc_ratio,
        "dec_cos": dec_cos, "dec_norm_ratio": dec_ratio,
        "b_enc_delta": (c.b_enc.detach().double() - p.b_enc.detach().double()).cpu().numpy(),
    }
