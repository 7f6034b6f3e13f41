"""Turn evaluation results into table rows (dicts keyed by `sae_transfer.storage.tables` column names)."""

from __future__ import annotations

import torch

from sae_transfer.corpus import ROLES
from sae_transfer.evals.outliers import breakdown, flagged_by, newline_mask
from sae_transfer.evals.transfer import EvalConfig, NormStats, PairResult, TokenSet, is_bos_mask


def _ratio(num: float, den: float) -> float:
    return num / den if den else float("nan")


# When a metric's denominator is too small to carry a finding (DESIGN.md: flagged, not printed
# as a result). Template tokens are the usual case: a few hundred near-identical tokens whose
# variance is a sliver of their energy give CE recovered 276 % and EV -514 %.
MIN_TOKENS = 500  # fewer counted tokens than this: every ratio is noise-dominated
MIN_CE_GAP = 0.1  # nats: ce_zero - ce_clean below this makes CE-recovered a ratio of two small differences
MAX_CI_WIDTH = 0.5  # a CE-recovered bootstrap interval wider than this says nothing
MIN_VARIANCE_SHARE = 0.05  # EV's denominator below 5 % of the tokens' energy: EV is dominated by the mean


def reliability(n_tokens: int, ce_gap: float, ci: tuple[float, float], variance_share: float) -> str | None:
    """Why a row's ratios should not be read as findings (None when they can)."""
    reasons = []
    if n_tokens < MIN_TOKENS:
        reasons.append(f"only {n_tokens} tokens (< {MIN_TOKENS})")
    if not ce_gap >= MIN_CE_GAP:
        reasons.append(f"ce_zero - ce_clean = {ce_gap:.3g} nats (< {MIN_CE_GAP})")
    if not (ci[1] - ci[0]) <= MAX_CI_WIDTH:
        reasons.append(f"CE-recovered interval width {ci[1] - ci[0]:.3g} (> {MAX_CI_WIDTH})")
    if not variance_share >= MIN_VARIANCE_SHARE:
        reasons.append(f"token variance is {variance_share:.1%} of their energy (< {MIN_VARIANCE_SHARE:.0%})")
    return "; ".join(reasons) or None


def metrics_rows(
    result: PairResult, *, sae_info: dict, model_info: dict, hook: str, toks: TokenSet, norms: NormStats,
    cfg: EvalConfig, scales: dict,
) -> list[dict]:
    """One metrics row per outlier policy for one (SAE, model, segment); `scales` holds
    scale_factor_train, scale_factor_eval and scale_ratio (r) of this SAE on this model."""
    rows = []
    for policy, r in result.policies.items():
        ce_score = _ratio(r.ce_zero - r.ce_sae, r.ce_zero - r.ce_clean)
        seg_gap = r.ce_zero_segment - r.ce_clean
        why = reliability(r.recon.n_tokens, r.ce_zero - r.ce_clean, r.ce_ci, r.recon.variance_share)
        rows.append({
            **sae_info, **model_info, **scales, "hook": hook, "segment": toks.segment, "outlier_policy": policy,
            "outlier_rule": norms.rule, "outlier_threshold": norms.threshold, "threshold_source": norms.threshold_source,
            "suggested_threshold": norms.suggested_threshold, "kmedian_threshold": norms.kmedian_threshold,
            "n_tokens": r.recon.n_tokens, "n_sequences": r.n_sequences,
            "l0": r.recon.l0, "mse": r.recon.mse, "explained_variance": r.recon.explained_variance,
            "explained_variance_legacy": r.recon.explained_variance_legacy, "variance_share": r.recon.variance_share,
            "ce_clean": r.ce_clean, "ce_sae": r.ce_sae, "ce_zero": r.ce_zero, "ce_delta": r.ce_sae - r.ce_clean,
            "ce_loss_score": ce_score,
            "ce_loss_score_lo": r.ce_ci[0], "ce_loss_score_hi": r.ce_ci[1], "ce_ci_level": cfg.ci_level,
            "ce_zero_segment": r.ce_zero_segment,
            "ce_loss_score_segment": _ratio(r.ce_zero_segment - r.ce_sae, seg_gap) if seg_gap == seg_gap else float("nan"),
            "kl_div_score": _ratio(r.kl_zero - r.kl_sae, r.kl_zero), "kl_sae": r.kl_sae, "kl_zero": r.kl_zero,
            "reliable": why is None, "unreliable_reason": why,
            "context_size": int(toks.tokens_NS.shape[1]), "tokens_fingerprint": toks.fingerprint, "seed": cfg.seed,
        })
    return rows


def token_error_rows(result: PairResult, *, sae_info: dict, model_info: dict, hook: str, toks: TokenSet) -> list[dict]:
    """Per counted token: scaled norm and squared reconstruction error, for the MSE-vs-norm plot."""
    if not result.token_errors:
        return []
    cols = {k: v.tolist() for k, v in result.token_errors.items()}
    base = {**sae_info, **model_info, "hook": hook, "tokens_fingerprint": toks.fingerprint}
    return [{**base, **{k: cols[k][i] for k in cols}} for i in range(len(cols["seq_id"]))]


def outlier_rows(
    norms: NormStats, toks: TokenSet, tokenizer, *, model_info: dict, hook: str, cfg: EvalConfig
) -> list[dict]:
    """One row per valid token: ids, text, role, raw and scaled norms, each rule's flag, which
    rule(s) flagged it and whether the configured rule excludes it."""
    valid = toks.valid_NS
    seq_NS = torch.arange(valid.shape[0])[:, None].expand(valid.shape)
    pos_NS = torch.arange(valid.shape[1])[None, :].expand(valid.shape)
    ids = toks.tokens_NS[valid]
    texts = {int(t): tokenizer.decode([int(t)]) for t in torch.unique(ids)}
    norm = norms.norms_NS[valid]
    f = norms.flags
    base = {**model_info, "hook": hook, "scale_factor": norms.scale, "outlier_rule": norms.rule,
            "outlier_threshold": norms.threshold, "threshold_source": norms.threshold_source,
            "k_median": cfg.outliers.k_median, "kmedian_threshold": norms.kmedian_threshold,
            "tokens_fingerprint": toks.fingerprint}
    cols = zip(seq_NS[valid].tolist(), pos_NS[valid].tolist(), ids.tolist(), toks.roles_NS[valid].tolist(),
               norm.tolist(), (norm * norms.scale).tolist(), f.absolute_N[valid].tolist(),
               f.k_median_N[valid].tolist(), f.outlier_N[valid].tolist())
    return [
        {**base, "seq_id": s, "pos": p, "token_id": t, "token_text": texts[t], "role": ROLES[r], "norm": n,
         "scaled_norm": sn, "is_outlier_abs": a, "is_outlier_kmedian": k, "is_outlier": o,
         "flagged_by": flagged_by(a, k), "is_newline": "\n" in texts[t]}
        for s, p, t, r, n, sn, a, k, o in cols
    ]


def outlier_summary_rows(
    norms: NormStats, toks: TokenSet, tokenizer, *, model_info: dict, hook: str, cfg: EvalConfig
) -> list[dict]:
    """The seed study's outlier table: one row per rule (absolute, k x median, and the configured
    rule when it is "either"), with the robust threshold suggestion recorded on each."""
    valid = toks.valid_NS
    pos = torch.arange(valid.shape[1])[None, :].expand(valid.shape)[valid]
    bos, nl = is_bos_mask(toks)[valid], newline_mask(toks.tokens_NS[valid], tokenizer)
    f = norms.flags
    rules = [("absolute", norms.threshold, f.absolute_N), ("k_median", norms.kmedian_threshold, f.k_median_N)]
    if norms.rule == "either":
        rules.append(("either", float("nan"), f.outlier_N))
    rows = []
    for rule, threshold, flags_NS in rules:
        b = breakdown(flags_NS[valid], bos, pos, nl)
        rows.append({
            **model_info, "hook": hook, "outlier_rule": rule, "outlier_threshold": threshold,
            "threshold_source": norms.threshold_source if rule == "absolute" else f"{cfg.outliers.k_median:g}xmedian",
            "excludes": rule == norms.rule, "suggested_threshold": norms.suggested_threshold,
            "n_tokens": b.n_tokens, "n_outliers": b.n_outliers, "frac_outliers": b.frac_outliers,
            "frac_bos": b.frac_bos, "frac_first10": b.frac_first10, "frac_newline": b.frac_newline,
            "frac_other": b.frac_other, "median_scaled_norm": norms.median_scaled, "scale_factor": norms.scale,
            "tokens_fingerprint": toks.fingerprint,
        })
    return rows
