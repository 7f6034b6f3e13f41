"""Tasks: transfer evaluation, outlier tagging, position curves, weight diffs, rollouts, segments.
Each computes rows with the pure code in `sae_transfer.evals.api` and appends them to the
study's Parquet tables (one new part file per call, so concurrent runs lose nothing).

Every evaluation task takes the study's `EvalSettings` (what evaluation reads: held-out text,
budget, outlier rule, model loading, seed), never the whole study config, so a knob of another
stage (diffing, training, the report) leaves their cache keys alone."""

from __future__ import annotations

from prefect import get_run_logger, task

from sae_transfer.evals import api
from sae_transfer.evals.rollouts import Rollouts
from sae_transfer.evals.weight_diff import weight_diff_rows
from sae_transfer.storage import tables
from sae_transfer.study import EvalSettings, InstructionSection, ModelLoading
from sae_transfer.tasks._cache import cached, run_name
from sae_transfer.tasks.records import RowsRecord, SAERecord

_CODE = cached("sae_transfer.evals", "sae_transfer.sae", "sae_transfer.corpus", "sae_transfer.models",
               "sae_transfer.storage.sae_format", "sae_transfer.storage.tables")


def _append(results_dir: str, step: str, produced: dict[str, list[dict]]) -> RowsRecord:
    for name, rows in produced.items():
        tables.append_rows(results_dir, name, rows)
    counts = {name: len(rows) for name, rows in produced.items()}
    get_run_logger().info("%s: appended %s", step, counts)
    return RowsRecord(step=step, rows=counts)


def sae_paths(saes: list[SAERecord]) -> list[str]:
    """The SAE folders of some records, in order."""
    return [s.path for s in saes]


@task(name="pair-threshold", task_run_name=run_name("pair-threshold", "hook"), **_CODE)
def pair_threshold(base: str, hook: str, settings: EvalSettings) -> dict:
    """The one absolute outlier threshold of the pair at `hook` (configured, else estimated on base)."""
    thr = api.pair_threshold(base, hook, settings)
    get_run_logger().info("outlier threshold at %s: %.4g (%s)", hook, thr["threshold"], thr["source"])
    return thr


@task(name="evaluate-transfer", task_run_name=run_name("evaluate-transfer", "model", "hook"), **_CODE)
def evaluate_transfer(saes: list[SAERecord], model: str, hook: str, settings: EvalSettings, results_dir: str,
                      threshold: dict | None = None, revision_label: str | None = None) -> RowsRecord:
    """Every SAE spliced into `model` at `hook`, outliers excluded and included -> metrics, token_errors."""
    rows = api.evaluate_transfer(sae_paths(saes), model, hook, settings, threshold, revision_label)
    return _append(results_dir, f"evaluate {model}", rows)


@task(name="tag-outliers", task_run_name=run_name("tag-outliers", "model", "hook"), **_CODE)
def tag_outliers(model: str, hook: str, settings: EvalSettings, results_dir: str, threshold: dict | None = None) -> RowsRecord:
    """Per-token norms and outlier flags of `model` at `hook` -> outliers, outlier_summary."""
    return _append(results_dir, f"outliers {model}", api.tag_outliers(model, hook, settings, threshold))


@task(name="position-curves", task_run_name=run_name("position-curves", "model", "hook"), **_CODE)
def position_curves(saes: list[SAERecord], model: str, hook: str, settings: EvalSettings, results_dir: str,
                    threshold: dict | None = None) -> RowsRecord:
    """Reconstruction by position bucket at 1x/2x/4x the SAEs' training context -> positions."""
    rows = api.position_curves(sae_paths(saes), model, hook, settings, threshold)
    return _append(results_dir, f"positions {model}", rows)


@task(name="weight-diff", **_CODE)
def weight_diff(base: str, chat: str, results_dir: str) -> RowsRecord:
    """||W_chat - W_base|| / ||W_base|| per layer and matrix -> weight_diff."""
    return _append(results_dir, "weight diff", {"weight_diff": weight_diff_rows(base, chat)})


@task(name="rollouts", task_run_name=run_name("rollouts", "chat"), **_CODE)
def make_rollouts(chat: str, instructions: InstructionSection, loading: ModelLoading, results_dir: str) -> Rollouts:
    """Greedy chat rollouts on the instruction set (checked) -> rollouts; the record is what the
    segment evaluation and the causal check score."""
    made = api.make_rollouts(chat, instructions, loading)
    _append(results_dir, "rollouts", {"rollouts": made.rows()})
    return made


@task(name="evaluate-segments", task_run_name=run_name("evaluate-segments", "hook"), **_CODE)
def evaluate_segments(saes: list[SAERecord], chat: str, hook: str, settings: EvalSettings, made: Rollouts,
                      results_dir: str, threshold: dict | None = None) -> RowsRecord:
    """Metrics per segment of the chat rollouts `made` (user prompt, rollout, template) -> metrics."""
    rows = api.evaluate_segments(sae_paths(saes), chat, hook, settings, made, threshold)
    return _append(results_dir, "segments", rows)
