"""Whole analyses from folder and model names to table rows: what a pipeline step runs.

Each function loads what it needs (SAEs, one model, held-out tokens), calls `evals.run`, and
returns `{table name: rows}` for `sae_transfer.storage.tables.append_rows`. Pairing errors (d_in, hook)
surface before the model's first forward pass.
"""

from __future__ import annotations

from sae_transfer.attention import attention_of
from sae_transfer.corpus import CorpusConfig, tokenize_sequences
from sae_transfer.errors import UserError
from sae_transfer.evals import rollouts
from sae_transfer.evals.loading import check_pairings, load_saes, model_shape
from sae_transfer.evals.outliers import OutlierRule
from sae_transfer.evals.positions import context_sizes
from sae_transfer.evals.rollouts import Rollouts
from sae_transfer.evals.run import (
    chat_transcripts,
    checked_norms,
    outlier_records,
    position_records,
    segment_records,
    transfer_records,
)
from sae_transfer.evals.transfer import EvalConfig, TokenSet, norm_pass
from sae_transfer.models import check_device, check_hooks, load_model, model_identity
from sae_transfer.study import EvalSettings, InstructionSection, ModelLoading, TextSource

Rows = dict[str, list[dict]]


def eval_config(settings: EvalSettings, threshold: dict | None = None, token_errors: bool = True) -> EvalConfig:
    """The evaluator's EvalConfig from the study's evaluation settings; `threshold`
    ({"threshold", "source"}, from `pair_threshold`) fixes the pair's absolute outlier cut-off."""
    out = settings.outliers
    thr = threshold or {"threshold": out.threshold, "source": "config"}
    try:
        rule = OutlierRule(rule=out.rule, threshold=thr["threshold"], mad_k=out.mad_k, k_median=out.k_median,
                           threshold_source=thr["source"])
    except ValueError as exc:
        raise UserError(str(exc)) from None
    return EvalConfig(batch_tokens=settings.eval.batch_tokens, outliers=rule, n_bootstrap=settings.eval.bootstrap,
                      seed=settings.seed, keep_token_errors=token_errors, device=settings.loading.device)


def _corpus(text: TextSource | str) -> CorpusConfig:
    if isinstance(text, str):
        return CorpusConfig(source=text)
    return CorpusConfig(source=text.source, text_column=text.text_column, seed=text.seed)


def load_eval_model(spec: str, loading: ModelLoading = ModelLoading(), *, revision_label: str | None = None,
                    attn_implementation: str = "auto"):
    """(model, provenance dict) for `spec` (a folder, a Hub id, or `org/name@revision`: the
    revision is loaded and recorded); `revision_label` (e.g. `step-50`, a watched checkpoint) is
    recorded as the revision, with `spec` as given as the model id. `loading` says device, dtype
    and whether a Hub model's own code may run. `attn_implementation` ("auto": SDPA on CUDA,
    eager on CPU) is recorded in the provenance as the kernel that actually runs."""
    model = load_model(spec, device=check_device(loading.device), dtype=loading.dtype,
                       trust_remote_code=loading.trust_remote_code, attn_implementation=attn_implementation)
    info = model_identity(spec)
    if revision_label:  # a watched checkpoint: its rows name it as the checkpoints table does (spec as given)
        info = {"model_id": spec, "model_revision": revision_label}
    return model, {**info, "attn_implementation": attention_of(model)}


def plain_tokens(model, text: TextSource | str, context_size: int, n_tokens: int, prepend_bos: bool = True) -> TokenSet:
    """Held-out (eval split) sequences of the corpus, tokenised by `model`'s tokenizer."""
    seqs = tokenize_sequences(_corpus(text), model.tokenizer, context_size=context_size, n_tokens=n_tokens,
                              split="eval", prepend_bos=prepend_bos)
    return TokenSet.plain(seqs.tokens_NS, seqs.roles_NS, seqs.fingerprint)


def sae_context(saes, default: int = 128) -> int:
    """The SAEs' training context size (cfg metadata), else `default`."""
    known = [s.context_size for s in saes if s.context_size]
    return int(known[0]) if known else default


def evaluate_transfer(sae_paths: list[str], model: str, hook: str, settings: EvalSettings, threshold: dict | None = None,
                      revision_label: str | None = None) -> Rows:
    """Every SAE spliced into `model`, outliers excluded and included -> metrics, token_errors."""
    saes = load_saes(sae_paths, hook)
    check_pairings([model], saes, hook)
    m, info = load_eval_model(model, settings.loading, revision_label=revision_label)
    toks = plain_tokens(m, settings.text, sae_context(saes), settings.eval.tokens)
    rec = transfer_records(m, info, saes, toks, hook, eval_config(settings, threshold))
    return {"metrics": rec.metrics, "token_errors": rec.token_errors}


def tag_outliers(model: str, hook: str, settings: EvalSettings, threshold: dict | None = None) -> Rows:
    """Per-token norms with outlier flags, and the study's breakdown -> outliers, outlier_summary."""
    m, info = load_eval_model(model, settings.loading)
    toks = plain_tokens(m, settings.text, settings.context_size, settings.eval.tokens)
    per_token, summary = outlier_records(m, info, toks, hook, eval_config(settings, threshold))
    return {"outliers": per_token, "outlier_summary": summary}


def pair_threshold(model: str, hook: str, settings: EvalSettings) -> dict:
    """{"threshold", "source"}: the one absolute threshold a model pair is evaluated with.

    The configured value when there is one; else the robust estimate (median + mad_k MAD of the
    scaled norms) on `model`, the pair's base model, so base and chat share one cut-off as in
    the seed study (a per-model estimate would give two silently different cut-offs)."""
    cfg = eval_config(settings)
    if cfg.outliers.threshold is not None:
        return {"threshold": cfg.outliers.threshold, "source": cfg.outliers.threshold_source}

    m, info = load_eval_model(model, settings.loading)
    check_hooks(m, [hook])
    norms = norm_pass(m, plain_tokens(m, settings.text, settings.context_size, settings.eval.tokens), hook, cfg)
    return {"threshold": norms.suggested_threshold,
            "source": f"pair estimate: median+{cfg.outliers.mad_k:g}mad on {info['model_id']}"}


def position_curves(sae_paths: list[str], model: str, hook: str, settings: EvalSettings, threshold: dict | None = None) -> Rows:
    """Reconstruction by position bucket at multiples of the SAEs' training context -> positions."""
    saes = load_saes(sae_paths, hook)
    check_pairings([model], saes, hook)
    m, info = load_eval_model(model, settings.loading)
    ctx = sae_context(saes)
    sizes = set(context_sizes(ctx, model_shape(model)[2], tuple(settings.eval.position_multiples))) | {ctx}
    token_sets = {size: plain_tokens(m, settings.text, size, settings.eval.tokens) for size in sizes}
    return {"positions": position_records(m, info, saes, token_sets, hook, eval_config(settings, threshold), ctx)}


def make_rollouts(chat: str, instructions: InstructionSection, loading: ModelLoading) -> Rollouts:
    """Greedy rollouts of the chat model on the instruction set, checked (one repeated token, CE
    above ln vocab are refused): the prompts that fit the context and the ids generated."""
    prompts = rollouts.load_prompts(instructions.source, instructions.n_prompts)
    if not prompts:
        raise UserError(f"instruction set {instructions.source!r} has no prompts: pass a JSONL with one "
                        "{\"prompt\": ...} per line")
    m, info = load_eval_model(chat, loading)
    return rollouts.rollouts_of(m, info, prompts, instructions.max_new_tokens)


def evaluate_segments(sae_paths: list[str], chat: str, hook: str, settings: EvalSettings, made: Rollouts,
                      threshold: dict | None = None) -> Rows:
    """Metrics per segment (user_prompt, rollout, template) on the chat model's greedy rollouts
    `made`; scale factor and outlier threshold come from the main corpus, as the seed study did."""
    saes = load_saes(sae_paths, hook)
    check_pairings([chat], saes, hook)
    m, info = load_eval_model(chat, settings.loading)
    transcripts = chat_transcripts(m, made)
    cfg = eval_config(settings, threshold, token_errors=False)
    reference = checked_norms(m, saes, plain_tokens(m, settings.text, sae_context(saes), settings.eval.tokens), hook, cfg)
    return {"metrics": segment_records(m, info, saes, transcripts, hook, cfg, reference)}
