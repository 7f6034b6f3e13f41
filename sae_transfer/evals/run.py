"""One call per analysis, returning table rows: what a CLI command or a Prefect task runs
between loading inputs and appending rows through `sae_transfer.storage.tables`."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, replace

from sae_transfer.evals import positions as pos_mod
from sae_transfer.evals import records, rollouts, transfer
from sae_transfer.evals.loading import LoadedSAE, check_width
from sae_transfer.evals.rollouts import Rollouts, check_rollout_ce
from sae_transfer.evals.segments import SEGMENTS, pad_transcripts, prompt_roles, rollout_transcript, segment_mask
from sae_transfer.evals.transfer import EvalConfig, NormStats, TokenSet
from sae_transfer.models import check_hooks
from sae_transfer.sae.scaling import cross_model_ratio, rescaled, training_scale


@dataclass
class TransferRecords:
    """Rows for the `metrics` and `token_errors` tables, and the norms they used."""

    metrics: list[dict]
    token_errors: list[dict]
    norms: NormStats


def checked_norms(
    model, saes: list[LoadedSAE], toks: TokenSet, hook: str, cfg: EvalConfig, *, scale: float | None = None,
    threshold: tuple[str, float] | None = None,
) -> NormStats:
    """Hook name check, the norm pass, then the SAE width check (UserError on a mismatch)."""
    check_hooks(model, [hook])
    norms = transfer.norm_pass(model, toks, hook, cfg, scale=scale, threshold=threshold)
    check_width(norms.d_in, saes, hook)
    return norms


def as_applied(saes: list[LoadedSAE], s_eval: float) -> dict[str, tuple[object, dict]]:
    """sae_id -> (the SAE as applied to a model with scale factor s_eval, its scale columns).

    A saved SAE reads raw activations of its own model (s_train folded in); on a model with
    factor s_eval it reconstructs x_hat = SAE(r x) / r, r = s_eval / s_train (DESIGN.md)."""
    out = {}
    for s in saes:
        s_train = training_scale(s.sae)
        r = cross_model_ratio(s_eval, s_train)
        cols = {"scale_factor_train": s_train, "scale_factor_eval": s_eval, "scale_ratio": r}
        out[s.info["sae_id"]] = (rescaled(s.sae, r), cols)
    return out


def transfer_records(
    model, model_info: dict, saes: list[LoadedSAE], toks: TokenSet, hook: str, cfg: EvalConfig,
    norms: NormStats | None = None,
) -> TransferRecords:
    """Every SAE on one model and token set, both outlier policies (norm pass unless given)."""
    norms = norms or checked_norms(model, saes, toks, hook, cfg)
    applied = as_applied(saes, norms.scale)
    results = transfer.evaluate_saes(model, {sid: a[0] for sid, a in applied.items()}, toks, hook, norms, cfg)
    metrics, errors = [], []
    for s in saes:
        sid = s.info["sae_id"]
        res = results[sid]
        kw = dict(sae_info=s.info, model_info=model_info, hook=hook, toks=toks)
        metrics += records.metrics_rows(res, norms=norms, cfg=cfg, scales=applied[sid][1], **kw)
        errors += records.token_error_rows(res, **kw)
    return TransferRecords(metrics, errors, norms)


def segment_records(
    model, model_info: dict, saes: list[LoadedSAE], transcripts: TokenSet, hook: str, cfg: EvalConfig,
    reference: NormStats,
) -> list[dict]:
    """Metrics rows per segment (user_prompt, rollout, template), splicing only at that
    segment's positions, with the segment-only zero ablation as well. Scale factor and absolute
    threshold come from `reference` (the main corpus's norm pass), as the seed study did."""
    norms = checked_norms(model, saes, transcripts, hook, cfg, scale=reference.scale,
                          threshold=(reference.threshold_source, reference.threshold))
    seg_cfg = replace(cfg, zero_segment=True)
    rows = []
    for seg in SEGMENTS:
        mask = segment_mask(transcripts.roles_NS, transcripts.valid_NS, seg)
        toks = TokenSet(transcripts.tokens_NS, transcripts.roles_NS, transcripts.valid_NS, mask, seg, transcripts.fingerprint)
        rows += transfer_records(model, model_info, saes, toks, hook, seg_cfg, norms).metrics
    _check_rollout_rows(rows, model, model_info)
    return rows


def _check_rollout_rows(rows: list[dict], model, model_info: dict) -> None:
    """Fail (UserError) when the clean CE on the rollout segment is above ln(vocab): the scored
    tokens are then not the model's own greedy tokens (`rollouts.check_rollout_ce`)."""
    vocab = int(getattr(model.cfg, "d_vocab", 0) or model.tokenizer.vocab_size)
    for row in rows:
        if row["segment"] == "rollout" and row["n_tokens"] > 0:
            check_rollout_ce(row["ce_clean"], vocab, model_info["model_id"])


def with_pair_threshold(model, model_info: dict, toks: TokenSet, hook: str, cfg: EvalConfig) -> EvalConfig:
    """`cfg` with its absolute outlier threshold fixed for every model of the pair: the configured
    value, else the robust estimate on `model` (pass the pair's base model first)."""
    if cfg.outliers.threshold is not None:
        return cfg
    norms = transfer.norm_pass(model, toks, hook, cfg)
    source = f"pair estimate: median+{cfg.outliers.mad_k:g}mad on {model_info['model_id']}"
    return replace(cfg, outliers=replace(cfg.outliers, threshold=norms.suggested_threshold, threshold_source=source))


def outlier_records(model, model_info: dict, toks: TokenSet, hook: str, cfg: EvalConfig) -> tuple[list[dict], list[dict]]:
    """(per-token `outliers` rows, `outlier_summary` rows) for one model."""
    check_hooks(model, [hook])
    norms = transfer.norm_pass(model, toks, hook, cfg)
    kw = dict(model_info=model_info, hook=hook, cfg=cfg)
    return (records.outlier_rows(norms, toks, model.tokenizer, **kw),
            records.outlier_summary_rows(norms, toks, model.tokenizer, **kw))


def position_records(
    model, model_info: dict, saes: list[LoadedSAE], token_sets: dict[int, TokenSet], hook: str, cfg: EvalConfig,
    sae_context: int, threshold: tuple[str, float] | None = None,
) -> list[dict]:
    """`positions` rows for each context size in `token_sets` (size -> sequences of that length).

    Scale factor and threshold come from the sequences at the SAE's own context size."""
    norms = checked_norms(model, saes, token_sets[sae_context], hook, cfg, threshold=threshold)
    applied = as_applied(saes, norms.scale)
    by_id = {s.info["sae_id"]: s for s in saes}
    rows = []
    for _size, toks in sorted(token_sets.items()):
        curves = pos_mod.position_curves(
            model, {k: a[0] for k, a in applied.items()}, toks.tokens_NS, hook, scale=norms.scale,
            threshold=norms.threshold, batch_tokens=cfg.batch_tokens, device=cfg.device,
        )
        for r in curves:
            r.update(by_id[r["sae_id"]].info, **model_info, **applied[r["sae_id"]][1], hook=hook,
                     sae_context_size=sae_context, beyond_training_context=r["bucket_lo"] >= sae_context)
        rows += curves
    return rows


def chat_transcripts(model, made: Rollouts) -> TokenSet:
    """The rollouts `made` (by this model: `rollouts.rollouts_of`) as right-padded transcripts with
    roles: the prompt's ids followed by the generated ids, exactly as generated."""
    tok = model.tokenizer
    special = set(tok.all_special_ids) | set(rollouts.stop_ids(model.original_model, tok))
    transcripts = [rollout_transcript(r.prompt_ids, prompt_roles(tok, p)[1], r.reply_ids, special)
                   for p, r in zip(made.prompts, made.made)]
    tokens_NS, roles_NS, valid_NS = pad_transcripts(transcripts, rollouts.pad_id(tok), max_len=getattr(model.cfg, "n_ctx", None))
    fingerprint = hashlib.sha256(tokens_NS.numpy().tobytes()).hexdigest()[:16]
    return TokenSet(tokens_NS, roles_NS, valid_NS, valid_NS.clone(), "all", fingerprint)
