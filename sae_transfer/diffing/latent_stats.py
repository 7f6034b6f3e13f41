"""Per-latent transfer of one SAE to both models (issue 10, analysis 1).

For every latent j of an SAE, on each model's activations: firing frequency, mean activation
when firing, largest activation, and its contribution to the reconstruction, measured two ways:

- `ev_drop`: the drop in explained variance when latent j alone is removed from the
  reconstruction, the other latents' activations held fixed (an ablation attribution):
  ΔEV_j = Σ_t (‖e_t + f_tj d_j‖² − ‖e_t‖²) / Σ_t ‖x_t − x̄‖² = Σ_t (2 f_tj ⟨d_j, e_t⟩ + f_tj² ‖d_j‖²) / TV,
  with e = x − x̂ and the explained variance of DESIGN.md (SAELens's 1 − E‖x − x̂‖² / Var).
  Exact in one streaming pass from Σ_t f_tj ⟨d_j, e_t⟩ and Σ_t f_tj².
- `act_share`: latent j's share of Σ_t Σ_i f_ti ‖d_i‖, the decoder-norm-weighted activation
  mass (the "f_j ‖d_j‖" attribution of Anthropic's Towards Monosemanticity / crosscoder work).

A token counts as a firing when the latent is non-zero, or, with `min_contribution` > 0, when
its contribution f_j·‖d_j‖ in scaled units exceeds that share of the mean norm sqrt(D): ReLU
SAEs leak small activations onto tokens they were not trained for (on the planted pair, the
chat SAE's v latent reads up to ~8% of the mean norm on a few ordinary tokens, against ~50% at
the planted positions), which the bare count calls firing. A latent is `silent` on a model when
it fires on at most `silent_frequency` of its tokens (1e-5 in the issue), and its status from
base to chat is "dies" (fires on base, silent on chat), "appears" (silent on base, fires on
chat), "shared" (fires on both) or "dead" (neither).
The density-shift columns are log10 densities per model, log10(frequency + 1e-10) (SAELens's
sparsity convention) and their difference.

An SAE on a model other than its own is applied as SAE(r·x)/r, r = s_eval / s_train
(`sae.scaling`), so its feature activations are in the units it was trained in.
"""

from __future__ import annotations

import copy
import math
from collections.abc import Iterable
from dataclasses import dataclass

import numpy as np
import torch

from sae_transfer.models import check_device
from sae_transfer.sae.base import SAE
from sae_transfer.sae.metrics import column_sum
from sae_transfer.sae.scaling import cross_model_ratio, rescaled, training_scale

DENSITY_EPS = 1e-10  # added before log10 so silent latents get a finite density (SAELens)
STATUSES = ("shared", "dies", "appears", "dead")


@dataclass(frozen=True)
class LatentStatsConfig:
    """How the per-latent statistics pass runs."""

    batch_tokens: int = 8192  # rows encoded at once; holds ~3 × batch_tokens × d_sae floats
    silent_frequency: float = 1e-5  # at most this firing frequency = silent on a model (the cut-off)
    # A token counts as a firing when f_j·‖d_j‖ (in the model's scaled units) exceeds this share of
    # the mean activation norm sqrt(D); 0 counts any non-zero activation (the usual density).
    # ReLU SAEs leak small activations onto tokens they were not trained for (see module doc).
    min_contribution: float = 0.0
    device: str | None = None  # None: CUDA when available, else CPU


@dataclass
class ModelLatentStats:
    """One SAE on one model's tokens; per-latent tensors [F] on the CPU."""

    n_tokens: int  # tokens seen
    fire_count_F: torch.Tensor  # int64: tokens counted as firings (non-zero, or above the contribution floor)
    sum_act_F: torch.Tensor  # float64: Σ f over the tokens counted as firings (feature units)
    max_act_F: torch.Tensor  # float32: largest activation (0 if never fires)
    ev_drop_F: torch.Tensor  # float64: drop in explained variance when the latent is removed
    act_mass_F: torch.Tensor  # float64: Σ_t f_tj ‖d_j‖ (model units)
    explained_variance: float  # the whole SAE's explained variance on these tokens
    scale_eval: float  # s of the evaluated model (sqrt(D) / E‖x‖)
    scale_train: float | None  # s_train recorded in the SAE (None: used as saved)
    ratio: float  # r = s_eval / s_train applied to the SAE

    @property
    def frequency_F(self) -> torch.Tensor:
        """Share of tokens where the latent fires (float64)."""
        return self.fire_count_F.double() / max(self.n_tokens, 1)

    @property
    def mean_act_firing_F(self) -> torch.Tensor:
        """Mean activation over the tokens where it fires; NaN when it never fires."""
        count = self.fire_count_F.double()
        return torch.where(count > 0, self.sum_act_F / count.clamp(min=1), torch.full_like(count, float("nan")))

    @property
    def log10_density_F(self) -> torch.Tensor:
        """log10(frequency + 1e-10)."""
        return torch.log10(self.frequency_F + DENSITY_EPS)

    @property
    def act_share_F(self) -> torch.Tensor:
        """Share of the decoder-norm-weighted activation mass (sums to 1 over latents)."""
        total = float(self.act_mass_F.sum())
        return self.act_mass_F / total if total > 0 else torch.zeros_like(self.act_mass_F)


def same_device(a: torch.device | str, b: torch.device | str) -> bool:
    """Whether two device names mean one device: "cuda" is the current GPU, so it equals
    cuda:N for that N (torch.device("cuda", 0) != torch.device("cuda") compares the names)."""
    a, b = torch.device(a), torch.device(b)
    if a.type != b.type:
        return False
    if a.index == b.index:
        return True
    if a.type == "cuda":
        current = torch.cuda.current_device() if torch.cuda.is_available() else 0
        return (current if a.index is None else a.index) == (current if b.index is None else b.index)
    return a.index in (None, 0) and b.index in (None, 0)  # "cpu" and "cpu:0"


def applied_sae(sae: SAE, s_eval: float, device: torch.device | str = "cpu") -> tuple[SAE, float]:
    """(the SAE as applied to a model whose scale is s_eval, in float32 on `device`; r).

    The SAE computes SAE(r·x)/r, r = s_eval / s_train; the caller's SAE is never modified."""
    r = cross_model_ratio(s_eval, training_scale(sae))
    used = rescaled(sae, r)
    w = used.W_enc
    if not same_device(w.device, device) or w.dtype != torch.float32:
        used = copy.deepcopy(used) if used is sae else used  # .to() moves a module in place
        used = used.to(device=device, dtype=torch.float32)
    return used, r


class _Sums:
    """Streaming sums of one SAE on one model (float64 where it matters)."""

    def __init__(self, sae: SAE, device: torch.device):
        F, D = sae.d_sae, sae.d_in
        f64 = dict(dtype=torch.float64, device=device)
        self.n = 0
        self.count_F = torch.zeros(F, dtype=torch.int64, device=device)
        self.sum_f_F, self.sum_fired_F, self.sum_f2_F, self.cross_F = (torch.zeros(F, **f64) for _ in range(4))
        self.max_F = torch.zeros(F, device=device)
        self.sum_x_D = torch.zeros(D, **f64)
        self.sum_x2 = torch.zeros((), **f64)
        self.sum_e2 = torch.zeros((), **f64)

    def add(self, sae: SAE, x_BD: torch.Tensor, floor_F: torch.Tensor | None) -> None:
        feats_BF = sae.encode(x_BD)
        e_BD = x_BD - sae.decode(feats_BF)
        self.n += x_BD.shape[0]
        fired_BF = feats_BF != 0 if floor_F is None else feats_BF > floor_F
        # column sums widen (int64, float64) in row chunks: never an 8-byte copy of [B, F]
        self.count_F += column_sum(fired_BF)
        self.sum_fired_F += column_sum(feats_BF * fired_BF, torch.float64)
        self.sum_f_F += column_sum(feats_BF, torch.float64)
        self.sum_f2_F += column_sum(feats_BF.pow(2), torch.float64)
        # Σ_t f_tj <d_j, e_t> for every j: one [B, D] x [D, F] product
        self.cross_F += column_sum(feats_BF * (e_BD @ sae.W_dec.T), torch.float64)
        self.max_F = torch.maximum(self.max_F, feats_BF.max(0).values)
        self.sum_x_D += x_BD.sum(0, dtype=torch.float64)
        self.sum_x2 += x_BD.pow(2).sum(dtype=torch.float64)
        self.sum_e2 += e_BD.pow(2).sum(dtype=torch.float64)


@torch.inference_mode()
def model_latent_stats(
    sae: SAE, batches: Iterable[torch.Tensor], s_eval: float, cfg: LatentStatsConfig = LatentStatsConfig()
) -> ModelLatentStats:
    """Per-latent statistics of `sae` on one model's raw activations (`batches` of [B, D]).

    `s_eval` is that model's scale factor; the SAE is applied as SAE(r·x)/r (see module doc).
    """
    device = torch.device(check_device(cfg.device))
    used, r = applied_sae(sae, s_eval, device)
    sums = _Sums(used, device)
    dec_norm2_F = used.W_dec.double().pow(2).sum(-1)
    floor_F = None
    if cfg.min_contribution > 0:  # f·‖d‖·s_eval > min_contribution·sqrt(D)  (scaled units)
        scaled_norm_F = dec_norm2_F.sqrt().float() * s_eval
        floor_F = cfg.min_contribution * math.sqrt(used.d_in) / scaled_norm_F.clamp(min=1e-30)
    for x_BD in batches:
        for start in range(0, x_BD.shape[0], cfg.batch_tokens):
            sums.add(used, x_BD[start:start + cfg.batch_tokens].to(device, torch.float32), floor_F)
    n = max(sums.n, 1)
    total_var = float(sums.sum_x2) - float(sums.sum_x_D.pow(2).sum()) / n  # Σ‖x − x̄‖²
    drop_F = 2 * sums.cross_F + sums.sum_f2_F * dec_norm2_F
    nan = float("nan")
    return ModelLatentStats(
        n_tokens=sums.n,
        fire_count_F=sums.count_F.cpu(),
        sum_act_F=sums.sum_fired_F.cpu(),
        max_act_F=sums.max_F.cpu(),
        ev_drop_F=(drop_F / total_var).cpu() if total_var > 0 else torch.full_like(drop_F, nan).cpu(),
        act_mass_F=(sums.sum_f_F * dec_norm2_F.sqrt()).cpu(),
        explained_variance=1 - float(sums.sum_e2) / total_var if total_var > 0 else nan,
        scale_eval=s_eval, scale_train=training_scale(sae), ratio=r,
    )


def latent_status(freq_base_F: torch.Tensor, freq_chat_F: torch.Tensor, silent_frequency: float) -> np.ndarray:
    """Per latent: "shared", "dies" (fires on base only), "appears" (chat only) or "dead"."""
    fires_base = (freq_base_F > silent_frequency).numpy()
    fires_chat = (freq_chat_F > silent_frequency).numpy()
    code = np.where(fires_base, np.where(fires_chat, 0, 1), np.where(fires_chat, 2, 3))
    return np.asarray(STATUSES, dtype=object)[code]


def stats_columns(
    stats: dict[str, ModelLatentStats], labels: tuple[str, str] = ("base", "chat"),
    cfg: LatentStatsConfig = LatentStatsConfig(),
) -> dict[str, np.ndarray]:
    """`latent_stats` columns (long form: one row per latent per model) for the two models
    labelled `labels` (base first); the caller adds provenance columns."""
    base, chat = (stats[label] for label in labels)
    status = latent_status(base.frequency_F, chat.frequency_F, cfg.silent_frequency)
    shift = (chat.log10_density_F - base.log10_density_F).numpy()
    cols: dict[str, list] = {}
    for label in labels:
        s = stats[label]
        F = s.fire_count_F.shape[0]
        part = {
            "latent": np.arange(F, dtype=np.int64), "model": np.full(F, label, dtype=object),
            "n_tokens": np.full(F, s.n_tokens, dtype=np.int64),
            "scale_factor_eval": np.full(F, s.scale_eval), "scale_factor_train": np.full(F, s.scale_train or np.nan),
            "scale_ratio": np.full(F, s.ratio), "explained_variance": np.full(F, s.explained_variance),
            "fire_count": s.fire_count_F.numpy(), "frequency": s.frequency_F.numpy(),
            "log10_density": s.log10_density_F.numpy(), "mean_act_firing": s.mean_act_firing_F.numpy(),
            "max_act": s.max_act_F.double().numpy(), "ev_drop": s.ev_drop_F.numpy(), "act_share": s.act_share_F.numpy(),
            "status": status, "log10_density_shift": shift, "silent_frequency": np.full(F, cfg.silent_frequency),
            "min_contribution": np.full(F, cfg.min_contribution),
        }
        for name, values in part.items():
            cols.setdefault(name, []).append(values)
    return {name: np.concatenate(parts) for name, parts in cols.items()}
