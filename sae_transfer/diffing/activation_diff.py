"""The activation-difference baseline: chat − base on the same tokens, before any dictionary.

The view the diffing-toolkit family starts from (e.g. Minder et al.'s activation-difference
lens): run both models on the same token ids and look at Δ = x_chat − x_base directly. It
needs no training, so a single-token plant cannot hide in it: a token whose activation moves
tops the per-token ranking, a shift at every position shows as the overall mean, and a change
confined to a small subspace (rotated or rescaled) shows as the top principal directions of Δ.
What it cannot see: a change that is not linear in one token's activation (a feature that
fires on new contexts with an unchanged direction moves Δ only where it fires, diluted
across tokens), nor anything about how the change is used downstream.

One streaming pass over the paired caches in raw model units holds, per group (token id,
role, log2 position bucket, and all tokens), the count, Σ Δ [D] and Σ ‖Δ‖, Σ ‖Δ‖², Σ ‖x_base‖
(memory: vocabulary × d_model floats for the token groups), and Σ Δ Δᵀ [D, D] for the principal
directions (centred: the mean is reported on its own). Shape suffixes as in the package
docstring; G groups, K principal directions.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from dataclasses import dataclass

import torch

KINDS = ("all", "token", "role", "position")  # the grouping of each `GroupStats`


@dataclass(frozen=True)
class ActDiffConfig:
    """What the activation-difference pass keeps (the table's size, not the pass's memory)."""

    top_tokens: int = 32  # token rows kept: largest mean ‖Δ‖ among tokens seen min_token_count times
    min_token_count: int = 4  # a token rarer than this is not ranked (its mean is noise)
    n_components: int = 4  # principal directions of Δ reported
    top_latents: int = 3  # per direction and SAE, the latents whose decoders align best

    def __post_init__(self) -> None:
        if min(self.top_tokens, self.min_token_count, self.n_components, self.top_latents) < 1:
            raise ValueError(f"{self}: every count must be >= 1")


@dataclass(frozen=True)
class GroupStats:
    """Per-group statistics of Δ = x_chat − x_base (raw model units)."""

    keys_G: torch.Tensor  # int64 group key: token id, role code, log2 position bucket, or 0 (all)
    count_G: torch.Tensor  # int64 tokens in the group
    mean_GD: torch.Tensor  # float32 mean Δ [G, D]
    mean_norm_G: torch.Tensor  # float64 mean ‖Δ‖
    rms_norm_G: torch.Tensor  # float64 sqrt(mean ‖Δ‖²)
    base_norm_G: torch.Tensor  # float64 mean ‖x_base‖ (to read ‖Δ‖ relative to the activation)


@dataclass(frozen=True)
class ActivationDiff:
    """What one pass found; `groups[kind]` for kind in KINDS (token groups: every token seen)."""

    n_tokens: int
    groups: dict[str, GroupStats]
    components_KD: torch.Tensor  # unit principal directions of the centred Δ, largest first
    variance_K: torch.Tensor  # variance of Δ along each (float64, model units²)
    total_variance: float  # trace of Δ's covariance

    def top_tokens(self, cfg: ActDiffConfig) -> torch.Tensor:
        """Indices into groups["token"] of the cfg.top_tokens tokens with the largest mean ‖Δ‖
        among those seen at least cfg.min_token_count times, largest first."""
        g = self.groups["token"]
        score_G = torch.where(g.count_G >= cfg.min_token_count, g.mean_norm_G, torch.full_like(g.mean_norm_G, -1.0))
        order = score_G.argsort(descending=True)
        return order[score_G[order] >= 0][:cfg.top_tokens]

    def typical_token_norm(self, cfg: ActDiffConfig) -> float:
        """Median over ranked tokens of their mean ‖Δ‖: the scale a top token stands out from."""
        g = self.groups["token"]
        ranked = g.mean_norm_G[g.count_G >= cfg.min_token_count]
        return float(ranked.median()) if ranked.numel() else float("nan")


def position_bucket(pos_B: torch.Tensor) -> torch.Tensor:
    """floor(log2(pos + 1)): bucket 0 holds position 0, bucket b positions 2^b − 1 .. 2^(b+1) − 2."""
    return torch.floor(torch.log2(pos_B.double() + 1)).long()


def bucket_label(b: int) -> str:
    """The positions of bucket b, e.g. "0", "1-2", "3-6"."""
    lo, hi = 2 ** b - 1, 2 ** (b + 1) - 2
    return str(lo) if lo == hi else f"{lo}-{hi}"


class _Groups:
    """Running sums per integer key, grown as larger keys appear (token ids, role codes, buckets)."""

    def __init__(self, d: int, device: torch.device):
        self.d, self.device, self.n = d, device, 0
        self.count = torch.zeros(0, dtype=torch.int64, device=device)
        self.sum_GD = torch.zeros(0, d, dtype=torch.float32, device=device)
        self.scalars_G3 = torch.zeros(0, 3, dtype=torch.float64, device=device)  # Σ‖Δ‖, Σ‖Δ‖², Σ‖x_base‖

    def _grow(self, size: int) -> None:
        if size <= self.n:
            return
        size = max(size, 2 * self.n)
        pad = size - self.n
        self.count = torch.cat([self.count, self.count.new_zeros(pad)])
        self.sum_GD = torch.cat([self.sum_GD, self.sum_GD.new_zeros(pad, self.d)])
        self.scalars_G3 = torch.cat([self.scalars_G3, self.scalars_G3.new_zeros(pad, 3)])
        self.n = size

    def add(self, key_B: torch.Tensor, diff_BD: torch.Tensor, scalars_B3: torch.Tensor) -> None:
        self._grow(int(key_B.max()) + 1)
        self.count.index_add_(0, key_B, torch.ones_like(key_B))
        self.sum_GD.index_add_(0, key_B, diff_BD)
        self.scalars_G3.index_add_(0, key_B, scalars_B3)

    def stats(self) -> GroupStats:
        seen = (self.count > 0).nonzero().squeeze(1)
        n_G = self.count[seen]
        sums_G3 = self.scalars_G3[seen] / n_G[:, None].double()
        return GroupStats(seen.cpu(), n_G.cpu(), (self.sum_GD[seen] / n_G[:, None].float()).cpu(),
                          sums_G3[:, 0].cpu(), sums_G3[:, 1].sqrt().cpu(), sums_G3[:, 2].cpu())


@torch.no_grad()
def activation_diff(batches: Iterable[tuple[torch.Tensor, ...]], d_model: int, cfg: ActDiffConfig = ActDiffConfig(),
                    device: str | torch.device = "cpu") -> ActivationDiff:
    """One pass over paired rows: each batch is (token_id_B, role_B, pos_B, base_BD, chat_BD) in raw
    model units, the same tokens in both. Returns every group's statistics and the principal
    directions of Δ."""
    device = torch.device(device)
    groups = {kind: _Groups(d_model, device) for kind in KINDS}
    first_D = torch.zeros(d_model, dtype=torch.float64, device=device)  # float64: the centring cancels
    second_DD = torch.zeros(d_model, d_model, dtype=torch.float64, device=device)
    n = 0
    for token_B, role_B, pos_B, base_BD, chat_BD in batches:
        base_BD = base_BD.to(device, torch.float32)
        diff_BD = chat_BD.to(device, torch.float32) - base_BD
        norm_B = diff_BD.double().norm(dim=-1)
        scalars_B3 = torch.stack([norm_B, norm_B.square(), base_BD.double().norm(dim=-1)], dim=1)
        keys = {"all": torch.zeros_like(token_B), "token": token_B, "role": role_B.long(), "position": position_bucket(pos_B)}
        for kind, key_B in keys.items():
            groups[kind].add(key_B.to(device, torch.int64), diff_BD, scalars_B3)
        first_D += diff_BD.double().sum(0)
        second_DD += diff_BD.double().T @ diff_BD.double()
        n += diff_BD.shape[0]
    if n == 0:
        raise ValueError("activation_diff got no rows: the paired caches are empty")
    stats = {kind: g.stats() for kind, g in groups.items()}
    mean_D = first_D / n
    cov_DD = second_DD / n - torch.outer(mean_D, mean_D)
    eigval_D, eigvec_DD = torch.linalg.eigh(cov_DD)
    k = min(cfg.n_components, d_model)
    order = eigval_D.argsort(descending=True)[:k]
    return ActivationDiff(n, stats, eigvec_DD[:, order].T.float().cpu(), eigval_D[order].clamp_min(0).cpu(),
                          float(eigval_D.clamp_min(0).sum()))


@torch.no_grad()
def aligned_latents(directions_KD: torch.Tensor, W_dec_FD: torch.Tensor, top: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(latents [K, top], |cosine| [K, top]): per direction, the decoder rows pointing most along
    it (sign ignored: a principal direction has none)."""
    cos_KF = torch.nn.functional.normalize(directions_KD.float(), dim=-1) @ torch.nn.functional.normalize(
        W_dec_FD.detach().float().to(directions_KD.device), dim=-1).T
    vals, idx = cos_KF.abs().topk(min(top, cos_KF.shape[1]), dim=1)
    return idx, vals


def subspace_cosine(found_KD: torch.Tensor, truth_JD: torch.Tensor) -> float:
    """Smallest cosine of the principal angles between span(truth) and its best match in
    span(found): 1 when span(found) contains span(truth) (the figure a planted subspace needs)."""
    q_found, _ = torch.linalg.qr(found_KD.double().T)
    q_truth, _ = torch.linalg.qr(truth_JD.double().T)
    sv = torch.linalg.svdvals(q_truth.T @ q_found)
    return float(sv.min()) if sv.numel() else math.nan
