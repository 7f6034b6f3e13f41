"""Tasks: transfer evaluation, outlier tagging, position curves, weight diffs, segments.
Each computes rows with the pure code in `sae_transfer.evals.api` and appends them to the
study's Parquet tables (one new part file per call, so concurrent runs lose nothing)."""

from __future__ import annotations

from prefect import get_run_logger, task

from sae_transfer.study import StudyConfig
from sae_transfer.storage import tables
from sae_transfer.tasks._cache import cached, run_name
from sae_transfer.tasks.records import RowsRecord, SAERecord

_CODE = cached("sae_transfer.evals", "sae_transfer.sae", "sae_transfer.corpus", "sae_transfer.models", "sae_transfer.storage.sae_format", "sae_transfer.storage.tables")


def _append(results_dir: str, step: str, produced: dict[str, list[dict]]) -> RowsRecord:
    for name, rows in produced.items():
        tables.append_rows(results_dir, name, rows)
    counts = {name: len(rows) for name, rows in produced.items()}
    get_run_logger().info("%s: appended %s", step, counts)
    return RowsRecord(step=step, rows=counts)


def _eval_options(config: StudyConfig, threshold: dict | None = None) -> dict:
    """Evaluation options of a study; `threshold` is the pair's (from `pair_threshold`)."""
    out = config.outliers
    thr = threshold or {"threshold": out.threshold, "source": "config"}
    return dict(
        corpus=config.corpus, n_tokens=config.eval.tokens, rule=out.rule, threshold=thr["threshold"],
        threshold_source=thr["source"], mad_k=out.mad_k, k_median=out.k_median, n_bootstrap=config.eval.bootstrap,
        seed=config.seed, device=config.device, dtype=config.dtype, trust_remote_code=config.pair.trust_remote_code,
    )


@task(name="pair-threshold", task_run_name=run_name("pair-threshold", "base"), **_CODE)
def pair_threshold(base: str, config: StudyConfig, hook: str) -> dict:
    """The one absolute outlier threshold of the pair at `hook` (configured, else estimated on base)."""
    from sae_transfer.evals.api import pair_threshold as run

    thr = run(base, hook, context_size=config.corpus.context_size, **_eval_options(config))
    get_run_logger().info("outlier threshold at %s: %.4g (%s)", hook, thr["threshold"], thr["source"])
    return thr


@task(name="evaluate-transfer", task_run_name=run_name("evaluate-transfer", "model"), **_CODE)
def evaluate_transfer(sae_paths: list[str], model: str, config: StudyConfig, hook: str, revision_label: str | None = None,
                      threshold: dict | None = None) -> RowsRecord:
    """Every SAE spliced into `model` at `hook`, outliers excluded and included -> metrics, token_errors."""
    from sae_transfer.evals.api import evaluate_transfer as run

    rows = run(sae_paths, model, hook, revision_label=revision_label, **_eval_options(config, threshold))
    return _append(str(config.results_dir), f"evaluate {model}", rows)


@task(name="tag-outliers", task_run_name=run_name("tag-outliers", "model"), **_CODE)
def tag_outliers(model: str, config: StudyConfig, hook: str, threshold: dict | None = None) -> RowsRecord:
    """Per-token norms and outlier flags of `model` at `hook` -> outliers, outlier_summary."""
    from sae_transfer.evals.api import tag_outliers as run

    rows = run(model, hook, context_size=config.corpus.context_size, **_eval_options(config, threshold))
    return _append(str(config.results_dir), f"outliers {model}", rows)


@task(name="position-curves", task_run_name=run_name("position-curves", "model"), **_CODE)
def position_curves(sae_paths: list[str], model: str, config: StudyConfig, hook: str, threshold: dict | None = None) -> RowsRecord:
    """Reconstruction by position bucket at 1x/2x/4x the SAEs' training context -> positions."""
    from sae_transfer.evals.api import position_curves as run

    rows = run(sae_paths, model, hook, multiples=tuple(config.eval.position_multiples), **_eval_options(config, threshold))
    return _append(str(config.results_dir), f"positions {model}", rows)


@task(name="weight-diff", **_CODE)
def weight_diff(base: str, chat: str, results_dir: str) -> RowsRecord:
    """||W_chat - W_base|| / ||W_base|| per layer and matrix -> weight_diff."""
    from sae_transfer.evals.weight_diff import weight_diff_rows

    return _append(results_dir, "weight diff", {"weight_diff": weight_diff_rows(base, chat)})


@task(name="evaluate-segments", **_CODE)
def evaluate_segments(sae_paths: list[str], chat: str, config: StudyConfig, hook: str, threshold: dict | None = None) -> RowsRecord:
    """Greedy chat rollouts on the instruction set, then metrics per segment -> metrics, rollouts."""
    from sae_transfer.evals.api import evaluate_segments as run

    ins = config.instructions
    rows = run(sae_paths, chat, hook, source=ins.source, n_prompts=ins.n_prompts, max_new_tokens=ins.max_new_tokens,
               results_dir=str(config.results_dir), **_eval_options(config, threshold))
    return _append(str(config.results_dir), "segments", rows)


def sae_paths(saes: list[SAERecord]) -> list[str]:
    """The SAE folders of some records, in order."""
    return [s.path for s in saes]
