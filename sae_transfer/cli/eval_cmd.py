"""`sae-transfer evaluate | outliers | segments | weight-diff | positions`: transfer evaluation
commands. Each appends rows to Parquet tables under the results folder (`--out`)."""

from __future__ import annotations

import logging
from pathlib import Path

import typer

from sae_transfer.cli._common import parse_int_list, print_table, require
from sae_transfer.errors import UserError
from sae_transfer.study import EvalSection, OutlierSection

log = logging.getLogger(__name__)

SaeOpt = typer.Option(..., "--sae", help="SAE folder (SAELens layout); repeat for several")
ModelOpt = typer.Option(..., "--model", help="Hugging Face checkpoint folder or Hub id; repeat for several")
HookOpt = typer.Option(..., "--hook", help="hook point, e.g. blocks.6.hook_resid_pre")
OutOpt = typer.Option(..., "--out", help="results folder; tables go to OUT/<table>/part-*.parquet")
_EVAL, _OUTLIERS = EvalSection(), OutlierSection()  # the study config's defaults are the CLI's
TokensOpt = typer.Option(_EVAL.tokens, "--tokens", min=1, help="held-out eval tokens per model")
CorpusOpt = typer.Option("stdlib", "--corpus", help="corpus: 'stdlib', a local file/folder, or a Hub dataset id")
CtxOpt = typer.Option(None, "--context-size", min=2, help="tokens per sequence (default: the SAE's training context, else 128)")
BatchOpt = typer.Option(_EVAL.batch_tokens, "--batch-tokens", min=1, help="tokens per forward batch")
ThreshOpt = typer.Option(None, "--threshold", help="absolute outlier threshold on scaled norms, one for every model "
                         "(default: median + 10 MAD on the first model, printed)")
RuleOpt = typer.Option(_OUTLIERS.rule, "--outlier-rule", help="which tokens 'excluded' drops: absolute, k_median or either")
MadOpt = typer.Option(_OUTLIERS.mad_k, "--mad-k", help="robust default threshold: median + k * 1.4826 * MAD")
KMedOpt = typer.Option(_OUTLIERS.k_median, "--k-median", help="second outlier rule: scaled norm > k * median")
DeviceOpt = typer.Option(None, "--device", help="cuda, cpu, ... (default: CUDA when available)")
DtypeOpt = typer.Option("float32", "--dtype", help="model dtype: float32, bfloat16, float16")
SeedOpt = typer.Option(0, "--seed", help="bootstrap seed")


def _eval_config(batch_tokens, threshold, mad_k, k_median, seed, device, n_bootstrap=_EVAL.bootstrap,
                 token_errors=True, rule=_OUTLIERS.rule):
    """The evaluator's config from the flags, through the study's own sections (one set of defaults)."""
    from pydantic import ValidationError

    from sae_transfer.evals.api import eval_config
    from sae_transfer.study import EvalSettings, ModelLoading

    require(mad_k > 0, "--mad-k", mad_k, "the robust threshold is median + k MAD: pass k > 0, e.g. 10")
    require(k_median > 1, "--k-median", k_median, "the rule flags norms above k x median: pass k > 1, e.g. 3")
    try:
        settings = EvalSettings(
            eval=EvalSection(batch_tokens=batch_tokens, bootstrap=n_bootstrap),
            outliers=OutlierSection(rule=rule, threshold=threshold, mad_k=mad_k, k_median=k_median),
            loading=ModelLoading(device=device), seed=seed)
    except ValidationError as exc:
        err = exc.errors()[0]
        raise UserError(f"--{'-'.join(str(p) for p in err['loc'][-1:]).replace('_', '-')}: {err['msg']} "
                        f"(got {err.get('input')!r})") from None
    return eval_config(settings, token_errors=token_errors)


def _pair_threshold(cfg, model, info, toks, hook):
    """Fix one absolute threshold for every model of this call (estimated on the first), and say so."""
    from sae_transfer.evals.run import with_pair_threshold

    if cfg.outliers.threshold is None:
        cfg = with_pair_threshold(model, info, toks, hook, cfg)
        typer.echo(f"outlier threshold {cfg.outliers.threshold:.4g} ({cfg.outliers.threshold_source}); "
                   "pass --threshold to set one (the study used Qwen1.5 50, Gemma 300, Mistral 200)")
    return cfg


def _load(spec: str, device, dtype):
    from sae_transfer.evals.api import load_eval_model
    from sae_transfer.study import ModelLoading

    return load_eval_model(spec, ModelLoading(device=device, dtype=dtype))


def _plain_tokens(model, corpus: str, context_size: int, n_tokens: int):
    from sae_transfer.evals.api import plain_tokens

    return plain_tokens(model, corpus, context_size, n_tokens)


def _context(saes, context_size: int | None) -> int:
    from sae_transfer.evals.api import sae_context

    return context_size or sae_context(saes)


def _prepare(saes_dirs: list[str], models: list[str], hook: str):
    from sae_transfer.evals.loading import check_pairings, load_saes

    saes = load_saes(saes_dirs, hook)
    check_pairings(models, saes, hook)
    return saes


def evaluate(
    sae: list[str] = SaeOpt, model: list[str] = ModelOpt, hook: str = HookOpt, tokens: int = TokensOpt,
    out: Path = OutOpt, corpus: str = CorpusOpt, context_size: int | None = CtxOpt,
    batch_tokens: int = BatchOpt, threshold: float | None = ThreshOpt, mad_k: float = MadOpt,
    k_median: float = KMedOpt, outlier_rule: str = RuleOpt,
    bootstrap: int = typer.Option(_EVAL.bootstrap, "--bootstrap", min=0, help="bootstrap resamples for the CE score CI"),
    seed: int = SeedOpt, device: str | None = DeviceOpt, dtype: str = DtypeOpt,
    token_errors: bool = typer.Option(True, "--token-errors/--no-token-errors", help="write per-token errors (MSE vs norm)"),
) -> None:
    """Every SAE x every model: l0, CE loss recovered (+ bootstrap CI), KL, explained variance, mse,
    with outliers excluded and included -> OUT/metrics (and OUT/token_errors)."""
    from sae_transfer.evals.run import transfer_records
    from sae_transfer.storage.tables import append_rows

    saes = _prepare(sae, model, hook)
    cfg = _eval_config(batch_tokens, threshold, mad_k, k_median, seed, device, bootstrap, token_errors, outlier_rule)
    ctx = _context(saes, context_size)
    rows = []
    for spec in model:
        m, info = _load(spec, device, dtype)
        toks = _plain_tokens(m, corpus, ctx, tokens)
        cfg = _pair_threshold(cfg, m, info, toks, hook)
        rec = transfer_records(m, info, saes, toks, hook, cfg)
        append_rows(out, "metrics", rec.metrics)
        append_rows(out, "token_errors", rec.token_errors)
        rows += rec.metrics
        del m
    print_table(["sae_id", "model_id", "outlier_policy", "l0", "ce_loss_score", "ce_delta", "explained_variance", "mse",
                 "n_tokens"], rows)


def outliers(
    model: list[str] = ModelOpt, hook: str = HookOpt, tokens: int = TokensOpt, out: Path = OutOpt,
    corpus: str = CorpusOpt, context_size: int = typer.Option(128, "--context-size", min=2, help="tokens per sequence"),
    batch_tokens: int = BatchOpt, threshold: float | None = ThreshOpt, mad_k: float = MadOpt,
    k_median: float = KMedOpt, outlier_rule: str = RuleOpt, device: str | None = DeviceOpt, dtype: str = DtypeOpt,
) -> None:
    """Per-token norms and outlier flags -> OUT/outliers; the study's breakdown -> OUT/outlier_summary."""
    from sae_transfer.evals.run import outlier_records
    from sae_transfer.storage.tables import append_rows

    cfg = _eval_config(batch_tokens, threshold, mad_k, k_median, 0, device, rule=outlier_rule)
    summary = []
    for spec in model:
        m, info = _load(spec, device, dtype)
        toks = _plain_tokens(m, corpus, context_size, tokens)
        cfg = _pair_threshold(cfg, m, info, toks, hook)
        per_token, rows = outlier_records(m, info, toks, hook, cfg)
        append_rows(out, "outliers", per_token)
        append_rows(out, "outlier_summary", rows)
        summary += rows
    print_table(["model_id", "outlier_rule", "outlier_threshold", "frac_outliers", "frac_bos", "frac_first10", "frac_newline",
                 "frac_other"], summary)


def segments(
    sae: list[str] = SaeOpt, model: str = typer.Option(..., "--model", help="the chat model (rollouts and evaluation)"),
    hook: str = HookOpt, out: Path = OutOpt,
    prompts: str = typer.Option("demo", "--prompts", help="JSONL of {\"prompt\": ...}, 'demo', or a Hub dataset id"),
    max_prompts: int = typer.Option(50, "--max-prompts", min=1, help="prompts to use"),
    max_new_tokens: int = typer.Option(64, "--max-new-tokens", min=1, help="greedy rollout length"),
    batch_tokens: int = BatchOpt, threshold: float | None = ThreshOpt, mad_k: float = MadOpt,
    k_median: float = KMedOpt, outlier_rule: str = RuleOpt, seed: int = SeedOpt, device: str | None = DeviceOpt,
    dtype: str = DtypeOpt, corpus: str = CorpusOpt,
    tokens: int = typer.Option(_EVAL.tokens, "--tokens", min=1, help="main-corpus tokens for the scale factor and threshold"),
) -> None:
    """Greedy chat rollouts (appended to OUT/rollouts) -> user_prompt / rollout / template masks ->
    metrics per segment, splicing only at that segment's positions, with the segment-only zero
    ablation too -> OUT/metrics. Scale factor and threshold come from the main corpus (--corpus)."""
    from sae_transfer.evals.rollouts import load_prompts, rollouts_of
    from sae_transfer.evals.run import chat_transcripts, checked_norms, segment_records
    from sae_transfer.storage.tables import append_rows

    saes = _prepare(sae, [model], hook)
    cfg = _eval_config(batch_tokens, threshold, mad_k, k_median, seed, device, token_errors=False, rule=outlier_rule)
    prompt_list = load_prompts(prompts, max_prompts)
    if not prompt_list:
        raise UserError(f"instruction set {prompts!r} has no prompts: pass a JSONL with one {{\"prompt\": ...}} per line")
    m, info = _load(model, device, dtype)
    if not getattr(m.tokenizer, "chat_template", None):
        raise UserError(f"model {model!r} has no chat template (tokenizer_config.json): segments need a chat model; "
                        "pass the chat fine-tune, or add a template with tokenizer.chat_template")
    main = _plain_tokens(m, corpus, _context(saes, None), tokens)
    cfg = _pair_threshold(cfg, m, info, main, hook)
    made = rollouts_of(m, info, prompt_list, max_new_tokens)
    append_rows(out, "rollouts", made.rows())
    transcripts = chat_transcripts(m, made)
    rows = segment_records(m, info, saes, transcripts, hook, cfg, checked_norms(m, saes, main, hook, cfg))
    append_rows(out, "metrics", rows)
    print_table(["sae_id", "segment", "outlier_policy", "l0", "ce_loss_score", "ce_loss_score_segment",
                 "explained_variance_legacy", "n_tokens", "reliable"], rows)


def weight_diff(
    base: str = typer.Option(..., "--base", help="base checkpoint folder (safetensors)"),
    chat: str = typer.Option(..., "--chat", help="fine-tuned checkpoint folder (safetensors)"),
    out: Path = OutOpt,
) -> None:
    """||W_chat - W_base||_F / ||W_base||_F per layer and weight matrix -> OUT/weight_diff."""
    from sae_transfer.evals.weight_diff import weight_diff_rows
    from sae_transfer.storage.tables import append_rows

    for spec in (base, chat):
        if not Path(spec).expanduser().is_dir():
            raise UserError(f"{spec!r} is not a local checkpoint folder: weight-diff reads safetensors files directly")
    rows = weight_diff_rows(Path(base).expanduser(), Path(chat).expanduser())
    append_rows(out, "weight_diff", rows)
    print_table(["param", "layer", "kind", "rel_diff"], sorted(rows, key=lambda r: -r["rel_diff"])[:12])


def positions(
    sae: list[str] = SaeOpt, model: list[str] = ModelOpt, hook: str = HookOpt, tokens: int = TokensOpt,
    out: Path = OutOpt, corpus: str = CorpusOpt, context_size: int | None = CtxOpt,
    multiples: str = typer.Option("1,2,4", "--multiples", help="context sizes to evaluate, as multiples of the SAE's"),
    max_positions: int | None = typer.Option(None, "--max-positions", min=2,
                                             help="longest sequence to try (default: the model config's "
                                             "max_position_embeddings; rotary models run past it)"),
    batch_tokens: int = BatchOpt, threshold: float | None = ThreshOpt, mad_k: float = MadOpt,
    device: str | None = DeviceOpt, dtype: str = DtypeOpt,
) -> None:
    """MSE / explained variance by position bucket at 1x, 2x, 4x the SAE's training context
    (where the model allows) -> OUT/positions."""
    from sae_transfer.evals.loading import model_shape
    from sae_transfer.evals.positions import context_sizes
    from sae_transfer.evals.run import position_records
    from sae_transfer.storage.tables import append_rows

    factors = parse_int_list(multiples, "--multiples")
    saes = _prepare(sae, model, hook)
    cfg = _eval_config(batch_tokens, threshold, mad_k, 3.0, 0, device)
    ctx = _context(saes, context_size)
    rows = []
    for spec in model:
        m, info = _load(spec, device, dtype)
        limit = max_positions or model_shape(spec)[2]
        sizes = set(context_sizes(ctx, limit, factors)) | {ctx}
        token_sets = {size: _plain_tokens(m, corpus, size, tokens) for size in sizes}
        rows += position_records(m, info, saes, token_sets, hook, cfg, ctx)
    append_rows(out, "positions", rows)
    print_table(["sae_id", "model_id", "context_size", "bucket_lo", "bucket_hi", "mse", "explained_variance", "n_tokens"],
                [r for r in rows if r["outlier_policy"] == "excluded"])


def register(app: typer.Typer) -> None:
    """Add this module's commands to `app`."""
    app.command("evaluate")(evaluate)
    app.command("outliers")(outliers)
    app.command("segments")(segments)
    app.command("weight-diff")(weight_diff)
    app.command("positions")(positions)
