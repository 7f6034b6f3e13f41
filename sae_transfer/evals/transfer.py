"""Evaluate SAEs on one model: reconstruction and CE/KL metrics with outliers excluded and
included, from as few forward passes as possible.

Per model and token set: one hook-only pass for norms (scale factor, outlier flags), then per
batch one clean pass, one zero-ablated pass (shared by every SAE), and one spliced pass per
(SAE, outlier policy); patched passes at resid_pre hooks resume at the hook's block (see
`splice`). Returns records; nothing here touches the disk.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field

import torch

from sae_transfer.corpus import ROLE_CODE
from sae_transfer.evals import splice
from sae_transfer.evals.bootstrap import ce_score_ci
from sae_transfer.evals.metrics import ReconAccumulator, ReconMetrics
from sae_transfer.evals.outliers import Flags, OutlierRule, choose_threshold, flag_tokens, suggest_threshold
from sae_transfer.sae.scaling import scale_factor_of
from sae_transfer.study import EvalSection

log = logging.getLogger(__name__)

POLICIES = ("excluded", "included")


@dataclass(frozen=True)
class EvalConfig:
    """How a transfer evaluation runs."""

    batch_tokens: int = EvalSection().batch_tokens  # tokens per forward batch; their clean and patched logits are held
    outliers: OutlierRule = field(default_factory=OutlierRule)  # threshold rule on scaled norms
    n_bootstrap: int = 1000  # resamples of sequences for the ce_loss_score interval
    ci_level: float = 0.95  # percentile interval level
    seed: int = 0  # bootstrap generator seed
    keep_token_errors: bool = True  # return per-token (scaled norm, squared error) for the MSE-vs-norm plot
    device: str | None = None  # None: the model's device
    policies: tuple[str, ...] = POLICIES  # outlier policies to report; each costs one spliced pass per SAE
    zero_segment: bool = False  # also zero-ablate only the counted positions (ce_zero_segment; the seed study's segment evals)


@dataclass
class TokenSet:
    """Sequences to evaluate and which positions count."""

    tokens_NS: torch.Tensor  # int64 token ids, right-padded
    roles_NS: torch.Tensor  # uint8 corpus ROLES codes
    valid_NS: torch.Tensor  # bool: a real token (False on padding)
    counted_NS: torch.Tensor  # bool: positions of the evaluated segment (splice + metrics here only)
    segment: str = "text"  # "text", "user_prompt", "rollout" or "template"
    fingerprint: str = ""  # hash identifying the token set

    @classmethod
    def plain(cls, tokens_NS: torch.Tensor, roles_NS: torch.Tensor, fingerprint: str = "") -> TokenSet:
        """Every position of fixed-length corpus sequences counts."""
        ones = torch.ones_like(tokens_NS, dtype=torch.bool)
        return cls(tokens_NS, roles_NS, ones, ones.clone(), "text", fingerprint)


@dataclass
class NormStats:
    """Per-token activation norms of one model on one token set, and what follows from them."""

    norms_NS: torch.Tensor  # raw ||x|| (float32, cpu; 0 on padding)
    scale: float  # s_eval = sqrt(d_model) / E||x|| (on this token set, or given: e.g. the main corpus's)
    rule: str  # the configured exclusion rule: "absolute", "k_median" or "either"
    threshold: float  # absolute threshold on scaled norms (one per pair)
    threshold_source: str  # "config", "pair:<model>" or the robust estimate's name on this model
    suggested_threshold: float  # robust estimate (median + k MAD) on this model's scaled norms, recorded
    kmedian_threshold: float  # k_median x median scaled norm of this model
    flags: Flags  # per-token flags [N, S] of both rules and of the configured rule (valid tokens only)
    median_scaled: float  # median scaled norm over valid tokens
    d_in: int  # width of the hooked activation

    @property
    def outlier_NS(self) -> torch.Tensor:
        """True where the configured rule flags a valid token."""
        return self.flags.outlier_N


@dataclass
class PolicyResult:
    """Metrics of one (SAE, model, outlier policy)."""

    recon: ReconMetrics
    ce_clean: float
    ce_sae: float
    ce_zero: float
    ce_zero_segment: float  # hook zeroed at the counted positions only (nan unless cfg.zero_segment)
    ce_ci: tuple[float, float]
    kl_sae: float
    kl_zero: float
    n_sequences: int


@dataclass
class PairResult:
    """Everything measured for one (SAE, model) on one token set."""

    policies: dict[str, PolicyResult]
    token_errors: dict[str, torch.Tensor] | None  # seq_id, pos, scaled_norm, sq_error, l0, is_outlier (counted tokens)


def sequence_batches(n_seqs: int, seq_len: int, batch_tokens: int):
    """Slices of whole sequences holding about `batch_tokens` tokens each (at least one sequence)."""
    step = max(1, batch_tokens // max(seq_len, 1))
    for start in range(0, n_seqs, step):
        yield slice(start, min(start + step, n_seqs))


def run_device(model, device: str | None) -> torch.device:
    """`device` when given, else the device the model's weights are on."""
    return torch.device(device) if device else next(model.parameters()).device



def _device(model, cfg) -> torch.device:
    return run_device(model, cfg.device)


@torch.inference_mode()
def norm_pass(
    model, toks: TokenSet, hook: str, cfg: EvalConfig, scale: float | None = None,
    threshold: tuple[str, float] | None = None,
) -> NormStats:
    """Per-token norms from hook-only passes, then the scale factor and outlier flags.

    `scale` (s_eval) and `threshold` ((source, value)) override the estimates on this token set:
    segments use the main corpus's, and a study uses one absolute threshold per model pair."""
    device = _device(model, cfg)
    norms = torch.zeros(toks.tokens_NS.shape, dtype=torch.float32)
    d_in = 0
    for sl in sequence_batches(*toks.tokens_NS.shape, cfg.batch_tokens):
        x_BSD = splice.hook_activations(model, toks.tokens_NS[sl].to(device), hook)
        norms[sl] = x_BSD.float().norm(dim=-1).cpu()
        d_in = x_BSD.shape[-1]
    valid = toks.valid_NS
    s = scale if scale is not None else scale_factor_of(norms[valid], d_in)
    scaled = norms * s
    source, abs_threshold = threshold if threshold is not None else choose_threshold(scaled[valid], cfg.outliers)
    median = float(scaled[valid].median())
    kmed = cfg.outliers.k_median * median
    f = flag_tokens(scaled, abs_threshold, kmed, cfg.outliers.rule)
    flags = Flags(f.absolute_N & valid, f.k_median_N & valid, f.outlier_N & valid)
    suggested = suggest_threshold(scaled[valid], cfg.outliers.mad_k)
    return NormStats(norms, s, cfg.outliers.rule, abs_threshold, source, suggested, kmed, flags, median, d_in)


class _Sums:
    """Per-sequence sums for one (SAE, policy)."""

    def __init__(self, d_in: int):
        self.recon = ReconAccumulator(d_in)
        self.parts: dict[str, list[torch.Tensor]] = {
            k: [] for k in ("clean", "sae", "zero", "zero_seg", "kl_sae", "kl_zero", "n")}

    def add(self, mask_BS: torch.Tensor, **per_token_BS: torch.Tensor) -> None:
        m = mask_BS.float()
        for name, value_BS in per_token_BS.items():
            self.parts[name].append((value_BS.float() * m).sum(1).double().cpu())
        self.parts["n"].append(m.sum(1).double().cpu())

    def result(self, scale: float, cfg: EvalConfig) -> PolicyResult:
        cat = {k: torch.cat(v) if v else torch.zeros(0, dtype=torch.float64) for k, v in self.parts.items()}
        n = float(cat["n"].sum()) or float("nan")
        keep = cat["n"] > 0
        ci = ce_score_ci(
            cat["clean"][keep], cat["sae"][keep], cat["zero"][keep],
            n_resamples=cfg.n_bootstrap, level=cfg.ci_level, seed=cfg.seed,
        )
        mean = {k: float(cat[k].sum()) / n if cat[k].numel() else float("nan")
                for k in ("clean", "sae", "zero", "zero_seg", "kl_sae", "kl_zero")}
        return PolicyResult(
            self.recon.result(scale), mean["clean"], mean["sae"], mean["zero"], mean["zero_seg"], ci,
            mean["kl_sae"], mean["kl_zero"], int(keep.sum()),
        )


def apply_sae(sae, x_BSD: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(x_hat [B, S, D] in the SAE's dtype, active features per token [B, S]) from raw activations."""
    dtype = sae.W_enc.dtype
    feats = sae.encode(x_BSD.to(dtype))
    return sae.decode(feats), (feats != 0).sum(-1)


@torch.inference_mode()
def evaluate_saes(model, saes: dict, toks: TokenSet, hook: str, norms: NormStats, cfg: EvalConfig) -> dict[str, PairResult]:
    """Metrics of every SAE in `saes` (id -> SAE) on `model`, both outlier policies.

    CE numbers are nats per counted next-token prediction; mse in scaled units (see package doc).
    """
    device = _device(model, cfg)
    for sae in saes.values():
        sae.to(device)
    sums = {(sid, p): _Sums(norms.d_in) for sid in saes for p in cfg.policies}
    errors: dict[str, list[dict]] = {sid: [] for sid in saes}
    for sl in sequence_batches(*toks.tokens_NS.shape, cfg.batch_tokens):
        tok_BS = toks.tokens_NS[sl].to(device)
        valid_BS = toks.valid_NS[sl].to(device)
        counted_BS = toks.counted_NS[sl].to(device) & valid_BS
        outlier_BS = norms.outlier_NS[sl].to(device)
        masks = {"excluded": counted_BS & ~outlier_BS, "included": counted_BS}
        masks = {p: masks[p] for p in cfg.policies}
        x_BSD, clean_logits = splice.clean_pass(model, tok_BS, hook)  # kept in the model's dtype
        clean = chunked_logit_stats(clean_logits, tok_BS, clean_logits)
        zero = chunked_logit_stats(splice.zero_logits(model, tok_BS, hook, x_BSD), tok_BS, clean_logits)
        kl_zero = zero.kl_from(clean)
        zero_seg = ({p: _zero_at(model, tok_BS, hook, x_BSD, m, clean_logits).loss_BS for p, m in masks.items()}
                    if cfg.zero_segment else {})
        for sid, sae in saes.items():
            x_hat_BSD, l0_BS = apply_sae(sae, x_BSD)
            for policy, mask_BS in masks.items():
                acc = sums[(sid, policy)]
                acc.recon.add(x_BSD[mask_BS], x_hat_BSD[mask_BS], l0_BS[mask_BS])
                spliced = chunked_logit_stats(
                    splice.spliced_logits(model, tok_BS, hook, x_hat_BSD, mask_BS, x_BSD), tok_BS, clean_logits)
                extra = {"zero_seg": zero_seg[policy]} if cfg.zero_segment else {}
                acc.add(splice.loss_mask(mask_BS, valid_BS), clean=clean.loss_BS, zero=zero.loss_BS,
                        sae=spliced.loss_BS, kl_zero=kl_zero, kl_sae=spliced.kl_from(clean), **extra)
            if cfg.keep_token_errors:
                errors[sid].append(_token_errors(sl, x_BSD, x_hat_BSD, l0_BS, counted_BS, outlier_BS, norms))
    return {
        sid: PairResult(
            {p: sums[(sid, p)].result(norms.scale, cfg) for p in cfg.policies},
            {k: torch.cat([e[k] for e in errors[sid]]) for k in errors[sid][0]} if errors[sid] else None,
        )
        for sid in saes
    }


def _zero_at(model, tok_BS, hook: str, x_BSD: torch.Tensor, mask_BS: torch.Tensor, clean_logits):
    """Logit stats with the hook zeroed only at `mask_BS` (segment-only zero ablation)."""
    zeros = torch.zeros_like(x_BSD)
    return chunked_logit_stats(splice.spliced_logits(model, tok_BS, hook, zeros, mask_BS, x_BSD), tok_BS, clean_logits)


LOGIT_CHUNK_TOKENS = 512  # tokens whose float32 [tokens, vocab] temporaries exist at once (1/8 of the default batch)


def chunked_logit_stats(logits_BSV: torch.Tensor, tokens_BS: torch.Tensor, clean_logits_BSV: torch.Tensor,
                        chunk_tokens: int = LOGIT_CHUNK_TOKENS) -> splice.LogitStats:
    """`splice.logit_stats(logits, tokens, softmax(clean_logits))`, a few sequences at a time: the
    float32 copies, the logsumexp temporary and p_clean exist for ~chunk_tokens tokens only, so
    beyond the two passes' own logits the peak does not grow with batch x vocabulary."""
    B, S = tokens_BS.shape
    rows = max(1, chunk_tokens // max(S, 1))
    parts = []
    for b in range(0, B, rows):
        p_clean = torch.softmax(clean_logits_BSV[b:b + rows].float(), dim=-1)
        parts.append(splice.logit_stats(logits_BSV[b:b + rows], tokens_BS[b:b + rows], p_clean))
        del p_clean
    if len(parts) == 1:
        return parts[0]
    return splice.LogitStats(*(torch.cat([getattr(p, f) for p in parts]) for f in ("loss_BS", "lse_BS", "dot_BS")))


def _token_errors(sl: slice, x_BSD, x_hat_BSD, l0_BS, counted_BS, outlier_BS, norms: NormStats) -> dict[str, torch.Tensor]:
    """Per counted token: seq_id, pos, scaled norm, squared error (scaled units), l0, outlier flag."""
    seq_B = torch.arange(sl.start, sl.stop)
    seq_BS = seq_B[:, None].expand(counted_BS.shape)
    pos_BS = torch.arange(counted_BS.shape[1])[None, :].expand(counted_BS.shape)
    m = counted_BS.cpu()
    sq_err_BS = (x_BSD.float() - x_hat_BSD.float()).pow(2).sum(-1).cpu() * norms.scale**2
    return {
        "seq_id": seq_BS[m], "pos": pos_BS[m],
        "scaled_norm": norms.norms_NS[sl][m] * norms.scale, "sq_error": sq_err_BS[m],
        "l0": l0_BS.cpu()[m], "is_outlier": outlier_BS.cpu()[m],
    }


def is_bos_mask(toks: TokenSet) -> torch.Tensor:
    """True at BOS positions (by role code)."""
    return toks.roles_NS == ROLE_CODE["bos"]
