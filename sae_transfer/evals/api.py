"""Whole analyses from folder and model names to table rows: what a pipeline step runs.

Each function loads what it needs (SAEs, one model, held-out tokens), calls `evals.run`, and
returns `{table name: rows}` for `sae_transfer.storage.tables.append_rows`. Pairing errors (d_in, hook)
surface before the model's first forward pass.
"""

from __future__ import annotations

from pathlib import Path

from sae_transfer.corpus import CorpusConfig, tokenize_sequences
from sae_transfer.errors import UserError
from sae_transfer.evals.loading import check_pairings, load_saes, model_shape
from sae_transfer.evals.outliers import OutlierRule
from sae_transfer.evals.positions import context_sizes
from sae_transfer.evals.transfer import EvalConfig, TokenSet
from sae_transfer.models import default_device, load_model, model_identity

Rows = dict[str, list[dict]]


def eval_config(*, threshold=None, k_median=3.0, n_bootstrap=1000, seed=0, device=None, batch_tokens=4096,
                token_errors=True, mad_k=10.0, rule="absolute", threshold_source="config") -> EvalConfig:
    """An EvalConfig from flat options (what the CLI and the study config carry)."""
    try:
        outliers = OutlierRule(rule=rule, threshold=threshold, mad_k=mad_k, k_median=k_median,
                               threshold_source=threshold_source)
    except ValueError as exc:
        raise UserError(str(exc)) from None
    return EvalConfig(batch_tokens=batch_tokens, outliers=outliers, n_bootstrap=n_bootstrap, seed=seed,
                      keep_token_errors=token_errors, device=device)


def _corpus(corpus) -> CorpusConfig:
    if isinstance(corpus, CorpusConfig):
        return corpus
    if isinstance(corpus, str):
        return CorpusConfig(source=corpus)
    return CorpusConfig(source=corpus.source, text_column=corpus.text_column, seed=corpus.seed)


def load_eval_model(spec: str, *, device=None, dtype="float32", revision_label: str | None = None,
                    trust_remote_code: bool = False, attn_implementation: str = "auto"):
    """(model, provenance dict) for `spec` (a folder, a Hub id, or `org/name@revision`: the
    revision is loaded and recorded); `revision_label` (e.g. `step-50`, a watched checkpoint) is
    recorded as the revision, with `spec` as given as the model id; `trust_remote_code` lets a
    Hub model's own code run (the pair config's flag). `attn_implementation` ("auto": SDPA on
    CUDA, eager on CPU) is recorded in the provenance as the kernel that actually runs."""
    from sae_transfer.attention import attention_of

    model = load_model(spec, device=device or default_device(), dtype=dtype, trust_remote_code=trust_remote_code,
                       attn_implementation=attn_implementation)
    info = model_identity(spec)
    if revision_label:  # a watched checkpoint: its rows name it as the checkpoints table does (spec as given)
        info = {"model_id": spec, "model_revision": revision_label}
    return model, {**info, "attn_implementation": attention_of(model)}


def plain_tokens(model, corpus, context_size: int, n_tokens: int, prepend_bos: bool = True) -> TokenSet:
    """Held-out (eval split) sequences of the corpus, tokenised by `model`'s tokenizer."""
    seqs = tokenize_sequences(_corpus(corpus), model.tokenizer, context_size=context_size, n_tokens=n_tokens,
                              split="eval", prepend_bos=prepend_bos)
    return TokenSet.plain(seqs.tokens_NS, seqs.roles_NS, seqs.fingerprint)


def sae_context(saes, default: int = 128) -> int:
    """The SAEs' training context size (cfg metadata), else `default`."""
    known = [s.context_size for s in saes if s.context_size]
    return int(known[0]) if known else default


def evaluate_transfer(sae_paths: list[str], model: str, hook: str, *, corpus, n_tokens: int, revision_label=None,
                      device=None, dtype="float32", trust_remote_code=False, **options) -> Rows:
    """Every SAE spliced into `model`, outliers excluded and included -> metrics, token_errors."""
    from sae_transfer.evals.run import transfer_records

    saes = load_saes(sae_paths, hook)
    check_pairings([model], saes, hook)
    m, info = load_eval_model(model, device=device, dtype=dtype, trust_remote_code=trust_remote_code,
                              revision_label=revision_label)
    toks = plain_tokens(m, corpus, sae_context(saes), n_tokens)
    rec = transfer_records(m, info, saes, toks, hook, eval_config(device=device, **options))
    return {"metrics": rec.metrics, "token_errors": rec.token_errors}


def tag_outliers(model: str, hook: str, *, corpus, n_tokens: int, context_size: int = 128, device=None,
                 dtype="float32", trust_remote_code=False, **options) -> Rows:
    """Per-token norms with outlier flags, and the study's breakdown -> outliers, outlier_summary."""
    from sae_transfer.evals.run import outlier_records

    m, info = load_eval_model(model, device=device, dtype=dtype, trust_remote_code=trust_remote_code)
    toks = plain_tokens(m, corpus, context_size, n_tokens)
    per_token, summary = outlier_records(m, info, toks, hook, eval_config(device=device, **options))
    return {"outliers": per_token, "outlier_summary": summary}


def pair_threshold(model: str, hook: str, *, corpus, n_tokens: int, context_size: int = 128, device=None,
                   dtype="float32", trust_remote_code=False, **options) -> dict:
    """{"threshold", "source"}: the one absolute threshold a model pair is evaluated with.

    The configured value when there is one; else the robust estimate (median + mad_k MAD of the
    scaled norms) on `model`, the pair's base model, so base and chat share one cut-off as in
    the seed study (a per-model estimate would give two silently different cut-offs)."""
    cfg = eval_config(device=device, **options)
    if cfg.outliers.threshold is not None:
        return {"threshold": cfg.outliers.threshold, "source": cfg.outliers.threshold_source}
    from sae_transfer.evals.transfer import norm_pass
    from sae_transfer.models import check_hooks

    m, info = load_eval_model(model, device=device, dtype=dtype, trust_remote_code=trust_remote_code)
    check_hooks(m, [hook])
    norms = norm_pass(m, plain_tokens(m, corpus, context_size, n_tokens), hook, cfg)
    return {"threshold": norms.suggested_threshold,
            "source": f"pair estimate: median+{cfg.outliers.mad_k:g}mad on {info['model_id']}"}


def position_curves(sae_paths: list[str], model: str, hook: str, *, corpus, n_tokens: int,
                    multiples: tuple[int, ...] = (1, 2, 4), device=None, dtype="float32", trust_remote_code=False,
                    **options) -> Rows:
    """Reconstruction by position bucket at multiples of the SAEs' training context -> positions."""
    from sae_transfer.evals.run import position_records

    saes = load_saes(sae_paths, hook)
    check_pairings([model], saes, hook)
    m, info = load_eval_model(model, device=device, dtype=dtype, trust_remote_code=trust_remote_code)
    ctx = sae_context(saes)
    sizes = set(context_sizes(ctx, model_shape(model)[2], tuple(multiples))) | {ctx}
    token_sets = {size: plain_tokens(m, corpus, size, n_tokens) for size in sizes}
    return {"positions": position_records(m, info, saes, token_sets, hook, eval_config(device=device, **options), ctx)}


def evaluate_segments(sae_paths: list[str], chat: str, hook: str, *, source: str, n_prompts: int, max_new_tokens: int,
                      results_dir: str | Path, device=None, dtype="float32", corpus=None, n_tokens=None,
                      trust_remote_code=False, **options) -> Rows:
    """Greedy chat rollouts (cached in the `rollouts` table under `results_dir`) -> metrics per
    segment (user_prompt, rollout, template)."""
    from sae_transfer.evals.rollouts import load_prompts
    from sae_transfer.evals.run import chat_transcripts, checked_norms, segment_records

    saes = load_saes(sae_paths, hook)
    check_pairings([chat], saes, hook)
    prompts = load_prompts(source, n_prompts)
    if not prompts:
        raise UserError(f"instruction set {source!r} has no prompts: pass a JSONL with one {{\"prompt\": ...}} per line")
    m, info = load_eval_model(chat, device=device, dtype=dtype, trust_remote_code=trust_remote_code)
    transcripts = chat_transcripts(m, info, prompts, max_new_tokens, results_dir)
    options["token_errors"] = False
    cfg = eval_config(device=device, **options)
    if corpus is None or not n_tokens:
        raise UserError("segments need the main corpus (--corpus) and a token budget: the scale factor and "
                        "outlier threshold are estimated there, as the seed study did")
    reference = checked_norms(m, saes, plain_tokens(m, corpus, sae_context(saes), n_tokens), hook, cfg)
    return {"metrics": segment_records(m, info, saes, transcripts, hook, cfg, reference)}
