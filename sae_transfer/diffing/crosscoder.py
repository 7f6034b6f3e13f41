"""BatchTopK crosscoder (Minder et al. 2025, arXiv 2504.02922; Anthropic 2024) and its latent taxonomy.

One encoder reads both models' activations, one decoder per model writes them back:

    f(x) = BatchTopK( [x_base, x_chat] W_enc + b_enc ),   x̂_m = f W_dec^m + b_dec^m.

BatchTopK keeps the B·k largest *scores* f_j·(‖d_j^base‖ + ‖d_j^chat‖) of a batch and passes
the unscaled f_j of the kept entries (so a latent cannot win by shrinking its decoders while
growing its code). Decoder norms are free (no unit-norm constraint): the relative decoder norm
ρ_j = ‖d_j^chat‖ / (‖d_j^base‖ + ‖d_j^chat‖) is what the taxonomy reads. At inference a latent
fires when its score exceeds `threshold`, the running mean of the smallest kept score in
training (as the SAE BatchTopK of Bussmann et al. 2024 does).

The module is an `SAE` with d_in = 2·D (W_enc [2D, F], W_dec [F, 2D], b_dec [2D]; columns
[:D] base, [D:] chat) and apply_b_dec_to_input=False, so the shared training loop,
optimiser and checkpoints handle it unchanged. Weights are kept in *training units* (each
model's activations times its own scale factor, stored in `scales_M`): ρ and the BatchTopK
score are defined there, and folding two different factors into the weights would distort
them. `encode_raw` / `reconstruct_raw` take raw activations.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from sae_transfer.sae.base import SAE, SAEConfig

ARCHITECTURE = "batchtopk_crosscoder"
MODELS = ("base", "chat")


@dataclass(frozen=True)
class Taxonomy:
    """Cut-offs on ρ = ‖d^chat‖ / (‖d^base‖ + ‖d^chat‖) that name a latent's class.

    Defaults are Minder et al.'s Δnorm cut-offs (chat-only Δ ≥ 0.9, base-only Δ ≤ 0.1,
    shared 0.4 ≤ Δ ≤ 0.6, with Δ = ½((‖d^c‖ − ‖d^b‖)/max(‖d^b‖, ‖d^c‖) + 1)) rewritten
    exactly on ρ's scale: Δ = 0.9 ⇔ ‖d^b‖ = 0.2‖d^c‖ ⇔ ρ = 1/1.2, and so on."""

    chat_only_min: float = 1 / 1.2  # ρ ≥ this: chat-only (paper: Δnorm ≥ 0.9)
    base_only_max: float = 0.2 / 1.2  # ρ ≤ this: base-only (Δnorm ≤ 0.1)
    shared_min: float = 0.8 / 1.8  # shared when shared_min ≤ ρ ≤ shared_max (Δnorm 0.4..0.6)
    shared_max: float = 1 / 1.8  # everything else is "other"
    # Direction, ours (the paper reads norms only): "shared" also needs cos(d^base, d^chat) at or
    # above this; a latent with both decoders alive (base_only_max < ρ < chat_only_min) whose
    # decoders point further apart is "changed". 0.8 ≈ 37°: an identical pair reaches 1.0.
    agree_min_cos: float = 0.8

    def __post_init__(self) -> None:
        cuts = (self.base_only_max, self.shared_min, self.shared_max, self.chat_only_min)
        if not all(0 <= a <= b <= 1 for a, b in zip(cuts, cuts[1:])):
            raise ValueError(f"taxonomy cut-offs {cuts} must increase within [0, 1]")
        if not -1 <= self.agree_min_cos <= 1:
            raise ValueError(f"agree_min_cos={self.agree_min_cos}: a cosine cut-off lies in [-1, 1]")


# class codes 0..4 of `classify`; "changed" came last so the older codes kept their meaning
CLASSES = ("base_only", "shared", "chat_only", "other", "changed")


class CrossCoder(SAE):
    """BatchTopK crosscoder over (base, chat); see the module docstring for the layout."""

    def __init__(self, cfg: SAEConfig):
        if cfg.d_in % 2 or not cfg.k or cfg.k < 1 or cfg.apply_b_dec_to_input:
            raise ValueError(f"crosscoder needs even d_in (2·d_model), k >= 1 and apply_b_dec_to_input=False, got {cfg}")
        super().__init__(cfg)
        self.register_buffer("threshold", torch.tensor(-1.0))  # inference score cut; -1: not estimated yet
        self.register_buffer("scales_M", torch.ones(2))  # (s_base, s_chat): training units = raw × scale

    @classmethod
    def create(cls, d_model: int, d_sae: int, k: int, metadata: dict | None = None) -> CrossCoder:
        """A zero-initialised crosscoder for two models of width d_model."""
        return cls(SAEConfig(ARCHITECTURE, 2 * d_model, d_sae, apply_b_dec_to_input=False, k=k, metadata=dict(metadata or {})))

    @property
    def d_model(self) -> int:
        return self.cfg.d_in // 2

    def decoders_MFD(self) -> torch.Tensor:
        """The two decoders as a [2, F, D] view (0 base, 1 chat), training units."""
        return self.W_dec.view(self.d_sae, 2, self.d_model).transpose(0, 1)

    def decoder_norms_MF(self) -> torch.Tensor:
        """‖d_j^m‖ [2, F] in training units."""
        return self.decoders_MFD().norm(dim=-1)

    def scores(self, pre_BF: torch.Tensor) -> torch.Tensor:
        """BatchTopK scores ReLU(pre)·(‖d^base‖ + ‖d^chat‖) [B, F]."""
        return torch.relu(pre_BF) * self.decoder_norms_MF().sum(0).detach()

    def activation(self, pre_BF: torch.Tensor) -> torch.Tensor:
        """Codes [B, F]: ReLU(pre) where the score passes the threshold (or, before a threshold
        exists, where it is among the batch's B·k largest scores)."""
        relu_BF = torch.relu(pre_BF)
        score_BF = self.scores(pre_BF)
        if float(self.threshold) >= 0:
            return relu_BF * (score_BF > self.threshold)
        n_keep = min(self.cfg.k * relu_BF.shape[0], relu_BF.numel())
        keep_N = score_BF.flatten().topk(n_keep, sorted=False).indices
        mask = torch.zeros(relu_BF.numel(), dtype=torch.bool, device=relu_BF.device)
        mask[keep_N] = True
        return relu_BF * mask.view_as(relu_BF) * (score_BF > 0)

    def split(self, x_B2D: torch.Tensor) -> torch.Tensor:
        """[B, 2D] -> [B, 2, D] (base, chat)."""
        return x_B2D.view(x_B2D.shape[0], 2, self.d_model)

    def scale_raw(self, base_BD: torch.Tensor, chat_BD: torch.Tensor) -> torch.Tensor:
        """Raw activations of the two models -> the [B, 2D] input in training units."""
        return torch.cat([base_BD * self.scales_M[0], chat_BD * self.scales_M[1]], dim=-1)

    def encode_raw(self, base_BD: torch.Tensor, chat_BD: torch.Tensor) -> torch.Tensor:
        """Codes [B, F] of raw (unscaled) activations."""
        return self.encode(self.scale_raw(base_BD, chat_BD))

    def reconstruct_raw(self, base_BD: torch.Tensor, chat_BD: torch.Tensor) -> torch.Tensor:
        """Reconstructions [B, 2, D] in raw model units."""
        x_hat_BMD = self.split(self.forward(self.scale_raw(base_BD, chat_BD)))
        return x_hat_BMD / self.scales_M.view(1, 2, 1)


@dataclass(frozen=True)
class LatentTable:
    """Per-latent decoder geometry of a crosscoder (all [F], training units)."""

    norm_base_F: torch.Tensor  # ‖d_j^base‖
    norm_chat_F: torch.Tensor  # ‖d_j^chat‖
    rho_F: torch.Tensor  # ‖d^chat‖ / (‖d^base‖ + ‖d^chat‖); NaN for a latent with both norms 0
    delta_norm_F: torch.Tensor  # Minder et al.'s Δnorm = ½((‖d^c‖ − ‖d^b‖)/max + 1)
    cosine_F: torch.Tensor  # cos(d_j^base, d_j^chat); NaN when either norm is 0
    diff_norm_F: torch.Tensor  # ‖d_j^chat − d_j^base‖ (how far the latent's write moved)
    class_F: torch.Tensor  # int64 index into CLASSES
    taxonomy: Taxonomy  # the cut-offs used


@torch.no_grad()
def latent_table(cc: CrossCoder, taxonomy: Taxonomy = Taxonomy()) -> LatentTable:
    """ρ, Δnorm, decoder cosine, ‖d^chat − d^base‖ and class of every latent."""
    dec_MFD = cc.decoders_MFD().detach().double()
    nb_F, nc_F = dec_MFD.norm(dim=-1)
    total_F = nb_F + nc_F
    rho_F = torch.where(total_F > 0, nc_F / total_F.clamp_min(1e-30), torch.full_like(total_F, float("nan")))
    biggest_F = torch.maximum(nb_F, nc_F)
    delta_F = torch.where(biggest_F > 0, 0.5 * ((nc_F - nb_F) / biggest_F.clamp_min(1e-30) + 1),
                          torch.full_like(total_F, float("nan")))
    both = (nb_F > 0) & (nc_F > 0)
    cos_F = (dec_MFD[0] * dec_MFD[1]).sum(-1) / (nb_F * nc_F).clamp_min(1e-30)
    cos_F = torch.where(both, cos_F, torch.full_like(cos_F, float("nan")))
    diff_F = (dec_MFD[1] - dec_MFD[0]).norm(dim=-1)
    return LatentTable(nb_F.float(), nc_F.float(), rho_F.float(), delta_F.float(), cos_F.float(), diff_F.float(),
                       classify(rho_F, taxonomy, cos_F), taxonomy)


def classify(rho_F: torch.Tensor, taxonomy: Taxonomy = Taxonomy(), cos_F: torch.Tensor | None = None) -> torch.Tensor:
    """Class index [F] (CLASSES order) of each latent from ρ and, when given, the decoder cosine:
    shared needs both norms balanced and directions agreeing; a latent writing into both models
    in directions that disagree is "changed"; NaN ρ (a latent with no decoder) is "other"."""
    t = taxonomy
    out_F = torch.full(rho_F.shape, CLASSES.index("other"), dtype=torch.int64, device=rho_F.device)
    agree_F = torch.ones_like(rho_F, dtype=torch.bool) if cos_F is None else cos_F.to(rho_F.device) >= t.agree_min_cos
    both_F = (rho_F > t.base_only_max) & (rho_F < t.chat_only_min)
    out_F[rho_F <= t.base_only_max] = CLASSES.index("base_only")
    out_F[(rho_F >= t.shared_min) & (rho_F <= t.shared_max) & agree_F] = CLASSES.index("shared")
    out_F[both_F & ~agree_F] = CLASSES.index("changed")
    out_F[rho_F >= t.chat_only_min] = CLASSES.index("chat_only")
    return out_F


def chat_minus_base_FD(cc: CrossCoder) -> torch.Tensor:
    """Each latent's chat-minus-base write per unit code, in raw model units [F, D]: d^chat / s_chat
    − d^base / s_base (the change a firing of latent j makes to chat's activation beyond base's)."""
    dec_MFD = cc.decoders_MFD().detach()
    return dec_MFD[1] / cc.scales_M[1] - dec_MFD[0] / cc.scales_M[0]


def class_counts(table: LatentTable, alive_F: torch.Tensor | None = None) -> dict[str, int]:
    """Latents per class (only the `alive_F` ones when given)."""
    cls_F = table.class_F if alive_F is None else table.class_F[alive_F]
    return {name: int((cls_F == i).sum()) for i, name in enumerate(CLASSES)}


@torch.no_grad()
def difference_explained(cc: CrossCoder, batches_B2D) -> float:
    """Share of the variance of Δ = x_chat − x_base (model units) that the crosscoder's own
    difference x̂_chat − x̂_base reproduces, 1 − E‖Δ − Δ̂‖² / E‖Δ − EΔ‖², over [B, 2D] batches in
    training units. A crosscoder that has not learnt where the models differ (decoders still at
    their shared init, or under-trained) scores near 0 whatever its classes say; NaN when the
    models agree on every token (nothing to explain)."""
    err = total = 0.0
    first_D, n = None, 0
    scales_M = cc.scales_M.view(1, 2, 1)
    for x_B2D in batches_B2D:
        x_BMD = cc.split(x_B2D.to(cc.W_enc.device, torch.float32)) / scales_M
        x_hat_BMD = cc.split(cc.forward(x_B2D.to(cc.W_enc.device, torch.float32))) / scales_M
        diff_BD = (x_BMD[:, 1] - x_BMD[:, 0]).double()
        err += float((diff_BD - (x_hat_BMD[:, 1] - x_hat_BMD[:, 0]).double()).pow(2).sum())
        total += float(diff_BD.pow(2).sum())
        first_D = diff_BD.sum(0) if first_D is None else first_D + diff_BD.sum(0)
        n += diff_BD.shape[0]
    if n == 0:
        return float("nan")
    variance = total / n - float((first_D / n).pow(2).sum())
    return 1 - (err / n) / variance if variance > 1e-12 * max(total / n, 1e-30) else float("nan")
