"""Causal check of a latent set (issue 10, analysis 6): does the chat model need these latents?

The chosen latents are ablated through the SAE splice, keeping the SAE's error term:
x' = x − Σ_{j∈set} f_j(x) d_j at every real position of the hook, i.e. x̂ without those latents
plus (x − x̂). The model runs on with x' (`evals.splice.patched_logits`), and the KL divergence
KL(clean ‖ ablated) of each position's next-token distribution is averaged separately over the
user-prompt, rollout and chat-template positions (`evals.segments`), and over all of them.

The baseline is a random set of the same size (seeded), drawn from the latents that fire at
least once on the same tokens and are not in the chosen set, so a dead latent never makes the
baseline look harmless. An empty set must give KL 0 (the patched pass equals the clean one).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np
import torch

from sae_transfer.diffing.latent_stats import applied_sae
from sae_transfer.evals import splice
from sae_transfer.evals.segments import SEGMENTS, segment_mask
from sae_transfer.evals.transfer import run_device, sequence_batches
from sae_transfer.sae.base import SAE
from sae_transfer.sae.scaling import scale_factor_of

ALL = "all"


@dataclass(frozen=True)
class CausalConfig:
    """How the ablation runs."""

    batch_tokens: int = 2048  # tokens per forward batch (the clean and one ablated [B, S, V] logits are held)
    seed: int = 0  # generator seed of the random baseline set
    device: str | None = None  # None: the model's device


@dataclass
class SegmentKL:
    """KL of one latent set on one segment."""

    n_tokens: int = 0  # positions counted
    kl_sum: float = 0.0  # Σ KL(clean || ablated), nats
    kl_max: float = 0.0
    frac_sum: float = 0.0  # Σ ||Σ_j f_j d_j|| / ||x||

    @property
    def kl_mean(self) -> float:
        return self.kl_sum / self.n_tokens if self.n_tokens else float("nan")

    @property
    def ablated_norm_frac(self) -> float:
        return self.frac_sum / self.n_tokens if self.n_tokens else float("nan")


@dataclass
class AblationResult:
    """One latent set's effect, per segment ("user_prompt", "rollout", "template", "all")."""

    name: str  # e.g. "given" or "random"
    latents: list[int]
    ratio: float  # r applied to the SAE (SAE(r x) / r)
    segments: dict[str, SegmentKL] = field(default_factory=dict)


def ablation_patch(sae: SAE, latents: list[int]):
    """x_BSD -> x − Σ_{j in latents} f_j(x) d_j (same dtype as x); the identity for no latents."""
    idx = torch.tensor(sorted(latents), dtype=torch.long, device=sae.W_dec.device)
    W_dec_LD = sae.W_dec.index_select(0, idx)

    def patch(x_BSD: torch.Tensor) -> torch.Tensor:
        feats_BSL = sae.encode(x_BSD.float()).index_select(-1, idx)
        return (x_BSD.float() - feats_BSL @ W_dec_LD).to(x_BSD.dtype)

    return patch


def _device(model, cfg: CausalConfig) -> torch.device:
    return run_device(model, cfg.device)


@torch.inference_mode()
def transcript_scale(model, toks, hook: str, cfg: CausalConfig = CausalConfig()) -> float:
    """s = sqrt(D) / E‖x‖ of the model at `hook` over the transcripts' real positions."""
    device = _device(model, cfg)
    norms = []
    for sl in sequence_batches(*toks.tokens_NS.shape, cfg.batch_tokens):
        x_BSD = splice.hook_activations(model, toks.tokens_NS[sl].to(device), hook)
        norms.append(x_BSD.float().norm(dim=-1)[toks.valid_NS[sl].to(device)].cpu())
    return scale_factor_of(torch.cat(norms), x_BSD.shape[-1])


@torch.inference_mode()
def firing_counts(model, sae: SAE, toks, hook: str, s_eval: float, cfg: CausalConfig = CausalConfig()) -> torch.Tensor:
    """Tokens (real positions) where each latent fires on these transcripts [F] (int64, CPU)."""
    device = _device(model, cfg)
    used, _ = applied_sae(sae, s_eval, device)
    count_F = torch.zeros(sae.d_sae, dtype=torch.int64, device=device)
    for sl in sequence_batches(*toks.tokens_NS.shape, cfg.batch_tokens):
        x_BSD = splice.hook_activations(model, toks.tokens_NS[sl].to(device), hook)
        feats = used.encode(x_BSD.float())[toks.valid_NS[sl].to(device)]
        count_F += (feats != 0).sum(0)
    return count_F.cpu()


def random_latents(fire_count_F: torch.Tensor, size: int, exclude: list[int], seed: int) -> list[int]:
    """`size` latents drawn without replacement (seeded) among those that fire and are not excluded."""
    pool = np.setdiff1d(np.flatnonzero(fire_count_F.numpy() > 0), np.asarray(exclude, dtype=np.int64))
    size = min(size, len(pool))
    return sorted(np.random.default_rng(seed).choice(pool, size=size, replace=False).tolist())


@torch.inference_mode()
def ablation_kl(
    model, sae: SAE, toks, hook: str, latent_sets: dict[str, list[int]], s_eval: float,
    cfg: CausalConfig = CausalConfig(),
) -> dict[str, AblationResult]:
    """KL(clean ‖ ablated) per segment for each named latent set, on the transcripts `toks`
    (tokens_NS, roles_NS, valid_NS: right-padded). `s_eval` is the model's scale factor."""
    device = _device(model, cfg)
    used, r = applied_sae(sae, s_eval, device)
    results = {name: AblationResult(name, sorted(int(j) for j in latents), r) for name, latents in latent_sets.items()}
    for res in results.values():
        res.segments = {seg: SegmentKL() for seg in (*SEGMENTS, ALL)}
    patches = {name: ablation_patch(used, res.latents) for name, res in results.items()}
    for sl in sequence_batches(*toks.tokens_NS.shape, cfg.batch_tokens):
        tok_BS = toks.tokens_NS[sl].to(device)
        valid_BS = toks.valid_NS[sl].to(device)
        masks = {seg: segment_mask(toks.roles_NS[sl], toks.valid_NS[sl], seg).to(device) for seg in SEGMENTS}
        masks[ALL] = valid_BS
        x_BSD, logits = splice.clean_pass(model, tok_BS, hook)
        p_clean = torch.softmax(logits.float(), dim=-1)
        clean = splice.logit_stats(logits, tok_BS, p_clean)
        del logits
        x_norm_BS = x_BSD.float().norm(dim=-1).clamp(min=1e-30)
        for name, patch in patches.items():
            x_new_BSD = patch(x_BSD)
            frac_BS = (x_BSD.float() - x_new_BSD.float()).norm(dim=-1) / x_norm_BS
            ablated = splice.patched_logits(model, tok_BS, hook, lambda act, x_new=x_new_BSD: x_new, x_BSD)
            kl_BS = splice.logit_stats(ablated, tok_BS, p_clean).kl_from(clean)
            for seg, mask_BS in masks.items():
                acc = results[name].segments[seg]
                acc.n_tokens += int(mask_BS.sum())
                acc.kl_sum += float(kl_BS[mask_BS].double().sum())
                acc.kl_max = max(acc.kl_max, float(kl_BS[mask_BS].max())) if bool(mask_BS.any()) else acc.kl_max
                acc.frac_sum += float(frac_BS[mask_BS].double().sum())
    return results
