"""Turn evaluation results into table rows (dicts keyed by `storage.tables` column names)."""

from __future__ import annotations

import torch

from sae_transfer.corpus import ROLES
from sae_transfer.evals.outliers import breakdown, newline_mask
from sae_transfer.evals.transfer import EvalConfig, NormStats, PairResult, TokenSet, is_bos_mask


def _ratio(num: float, den: float) -> float:
    return num / den if den else float("nan")


def metrics_rows(
    result: PairResult, *, sae_info: dict, model_info: dict, hook: str, toks: TokenSet, norms: NormStats, cfg: EvalConfig
) -> list[dict]:
    """One metrics row per outlier policy for one (SAE, model, segment)."""
    rows = []
    for policy, r in result.policies.items():
        rows.append({
            **sae_info, **model_info, "hook": hook, "segment": toks.segment, "outlier_policy": policy,
            "outlier_rule": norms.rule, "outlier_threshold": norms.threshold, "scale_factor": norms.scale,
            "n_tokens": r.recon.n_tokens, "n_sequences": r.n_sequences,
            "l0": r.recon.l0, "mse": r.recon.mse, "explained_variance": r.recon.explained_variance,
            "explained_variance_legacy": r.recon.explained_variance_legacy,
            "ce_clean": r.ce_clean, "ce_sae": r.ce_sae, "ce_zero": r.ce_zero, "ce_delta": r.ce_sae - r.ce_clean,
            "ce_loss_score": _ratio(r.ce_zero - r.ce_sae, r.ce_zero - r.ce_clean),
            "ce_loss_score_lo": r.ce_ci[0], "ce_loss_score_hi": r.ce_ci[1], "ce_ci_level": cfg.ci_level,
            "kl_div_score": _ratio(r.kl_zero - r.kl_sae, r.kl_zero), "kl_sae": r.kl_sae, "kl_zero": r.kl_zero,
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
    """One row per valid token: ids, text, role, raw and scaled norms, both rules' flags."""
    valid = toks.valid_NS
    seq_NS = torch.arange(valid.shape[0])[:, None].expand(valid.shape)
    pos_NS = torch.arange(valid.shape[1])[None, :].expand(valid.shape)
    ids = toks.tokens_NS[valid]
    texts = {int(t): tokenizer.decode([int(t)]) for t in torch.unique(ids)}
    norm = norms.norms_NS[valid]
    scaled = norm * norms.scale
    k_med = cfg.outliers.k_median
    base = {**model_info, "hook": hook, "scale_factor": norms.scale, "outlier_rule": norms.rule,
            "outlier_threshold": norms.threshold, "k_median": k_med, "tokens_fingerprint": toks.fingerprint}
    cols = zip(seq_NS[valid].tolist(), pos_NS[valid].tolist(), ids.tolist(), toks.roles_NS[valid].tolist(),
               norm.tolist(), scaled.tolist())
    return [
        {**base, "seq_id": s, "pos": p, "token_id": t, "token_text": texts[t], "role": ROLES[r], "norm": n,
         "scaled_norm": sn, "is_outlier_abs": sn > norms.threshold, "is_outlier_kmedian": sn > k_med * norms.median_scaled,
         "is_newline": "\n" in texts[t]}
        for s, p, t, r, n, sn in cols
    ]


def outlier_summary_rows(
    norms: NormStats, toks: TokenSet, tokenizer, *, model_info: dict, hook: str, cfg: EvalConfig
) -> list[dict]:
    """The seed study's outlier table: one row per rule (absolute threshold, k x median)."""
    valid = toks.valid_NS
    scaled = norms.norms_NS[valid] * norms.scale
    pos = torch.arange(valid.shape[1])[None, :].expand(valid.shape)[valid]
    bos, nl = is_bos_mask(toks)[valid], newline_mask(toks.tokens_NS[valid], tokenizer)
    k_med = cfg.outliers.k_median
    rules = [(norms.rule, norms.threshold), (f"{k_med:g}xmedian", k_med * norms.median_scaled)]
    rows = []
    for rule, threshold in rules:
        b = breakdown(scaled > threshold, bos, pos, nl)
        rows.append({
            **model_info, "hook": hook, "outlier_rule": rule, "outlier_threshold": threshold,
            "n_tokens": b.n_tokens, "n_outliers": b.n_outliers, "frac_outliers": b.frac_outliers,
            "frac_bos": b.frac_bos, "frac_first10": b.frac_first10, "frac_newline": b.frac_newline,
            "frac_other": b.frac_other, "median_scaled_norm": norms.median_scaled, "scale_factor": norms.scale,
            "tokens_fingerprint": toks.fingerprint,
        })
    return rows
