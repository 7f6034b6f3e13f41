"""Tasks: feature-level diffing (what changed inside): per-latent stats, matching and drift of the
study's SAEs, a BatchTopK crosscoder with its latent taxonomy and Latent Scaling, max-activating
examples, and the causal check. The maths is in `sae_transfer.diffing`; each task appends its
tables to the study's results and returns a small record. Each takes the part of the study it
reads: the DiffingSection (analyses), the CrosscoderPlan (training), the FinetuneSection."""

from __future__ import annotations

from pathlib import Path

import pyarrow as pa
from prefect import get_run_logger, task

from sae_transfer.diffing.api import drift_table
from sae_transfer.diffing.crosscoder_run import CrosscoderConfig
from sae_transfer.diffing.crosscoder_run import train_crosscoder as train
from sae_transfer.diffing.paired import open_pair
from sae_transfer.diffing.stage import (
    DiffingPlan,
    activation_diff_tables,
    causal_tables,
    chosen_latents,
    crosscoder_tables,
    sae_tables,
)
from sae_transfer.evals.loading import load_saes
from sae_transfer.evals.rollouts import Rollouts
from sae_transfer.storage import tables
from sae_transfer.storage.activations import local_dataset
from sae_transfer.storage.fingerprint import sha256_file
from sae_transfer.storage.layout import RunLayout
from sae_transfer.storage.mirror import local_copy, staged_output
from sae_transfer.storage.store import location
from sae_transfer.study import CrosscoderPlan, DiffingSection, FinetuneSection, ModelLoading
from sae_transfer.tasks._cache import cached, run_name
from sae_transfer.tasks.records import ActsRecord, DiffRecord, RowsRecord, SAERecord
from sae_transfer.training.api import finetune_on_dataset
from sae_transfer.training.config import TrainConfig

_CODE = cached("sae_transfer.diffing", "sae_transfer.sae", "sae_transfer.training", "sae_transfer.evals",
               "sae_transfer.storage.diffing_tables", "sae_transfer.storage.crosscoder_format",
               "sae_transfer.storage.activations_scan", "sae_transfer.storage.tables")


def _append(results_dir: str, step: str, produced: dict) -> dict[str, int]:
    counts = {}
    for name, parts in produced.items():
        for part in parts:
            tables.append_rows(results_dir, name, part)
        counts[name] = sum(p.num_rows for p in parts)
    get_run_logger().info("%s: appended %s", step, counts)
    return counts


@task(name="diff-saes", task_run_name=run_name("diff-saes", "base_acts.hook"), **_CODE)
def diff_saes(saes: list[SAERecord], base_acts: ActsRecord, chat_acts: ActsRecord, diffing: DiffingSection,
              device: str | None, results_dir: str) -> DiffRecord:
    """Per-latent stats of every SAE on both models, examples, base-vs-chat and parent-vs-child
    matching, drift of the fine-tuned SAE, Latent Scaling of the base SAE on chat; the record
    names the latents the causal check ablates (`stage.chosen_latents`)."""
    loaded = dict(zip([s.role for s in saes], load_saes([s.path for s in saes], base_acts.hook)))
    produced = sae_tables(loaded, {"base": base_acts.path, "chat": chat_acts.path}, DiffingPlan.of(diffing, device),
                          {"base": base_acts.model, "chat": chat_acts.model})
    ids = [loaded[r].info["sae_id"] for r in ("base", "chat")]
    sae_id, set_name, latents = chosen_latents(pa.concat_tables(produced["latent_stats"]), ids, diffing.top_latents)
    counts = _append(results_dir, f"diff SAEs at {base_acts.hook}", produced)
    return DiffRecord(step=f"diff SAEs at {base_acts.hook}", rows=counts,
                      chosen={"sae_id": sae_id, "set_name": set_name, "latents": latents})


@task(name="activation-diff", task_run_name=run_name("activation-diff", "base_acts.hook"), **_CODE)
def activation_diff(saes: list[SAERecord], base_acts: ActsRecord, chat_acts: ActsRecord, stats_tokens: int,
                    device: str | None, results_dir: str) -> RowsRecord:
    """chat − base on the first `stats_tokens` paired rows (`DiffingSection.stats_tokens`, the one
    knob of the section it reads, so the others leave its cache key alone), per token, role and
    position bucket, with its principal directions and the study SAEs' latents aligned with them
    (`activation_diff`). The token check runs here: a difference of misaligned rows is noise."""
    pair = open_pair(base_acts.path, chat_acts.path)
    loaded = dict(zip([s.role for s in saes], load_saes([s.path for s in saes], base_acts.hook)))
    produced = activation_diff_tables(pair, DiffingPlan(stats_tokens=stats_tokens, device=device), loaded,
                                      chat_model=chat_acts.model)
    step = f"activation diff at {base_acts.hook}"
    return RowsRecord(step=step, rows=_append(results_dir, step, produced))


@task(name="train-crosscoder", task_run_name=run_name("train-crosscoder", "base_acts.hook"),
      **cached("sae_transfer.diffing", "sae_transfer.sae", "sae_transfer.training",
               "sae_transfer.storage.crosscoder_format", "sae_transfer.storage.checkpoints",
               "sae_transfer.storage.activations_read"))
def train_crosscoder(base_acts: ActsRecord, chat_acts: ActsRecord, plan: CrosscoderPlan, device: str | None,
                     out_dir: str) -> SAERecord:
    """A BatchTopK crosscoder on the paired base/chat caches (resumes if interrupted)."""
    pair = open_pair(base_acts.path, chat_acts.path)
    cfg = CrosscoderConfig(train=TrainConfig(
        arch="batchtopk", d_sae=plan.expansion * pair.d_model, k=plan.k, lr=plan.lr, total_tokens=plan.tokens,
        batch_size=plan.batch_size, seed=plan.seed, device=device))
    with staged_output(out_dir, RunLayout.MANIFEST_FILE, exclude=(RunLayout.CHECKPOINTS_DIR,)) as out:
        result = train(cfg, pair, out.local)
    get_run_logger().info("crosscoder %s: %s", "reused" if result.skipped else "trained", result.metrics)
    return SAERecord(path=out.remote_of(result.crosscoder_dir), run_dir=out_dir, model=f"{base_acts.model} + {chat_acts.model}",
                     hook=base_acts.hook, role="crosscoder", tokens=int(result.metrics.get("tokens", 0) or 0),
                     final_metrics=result.metrics)


@task(name="diff-crosscoder", task_run_name=run_name("diff-crosscoder", "base_acts.hook"), **_CODE)
def diff_crosscoder(crosscoder: SAERecord, base_acts: ActsRecord, chat_acts: ActsRecord, diffing: DiffingSection,
                    device: str | None, results_dir: str) -> RowsRecord:
    """The crosscoder's latent taxonomy, Latent Scaling of its chat-only latents, and its
    max-activating contexts on the paired tokens."""
    pair = open_pair(base_acts.path, chat_acts.path, verify_tokens=False)
    folder = local_copy(crosscoder.path)
    weights = next(Path(folder).glob("*.safetensors"))
    sae_id = f"crosscoder-{location(crosscoder.run_dir).name}:{sha256_file(weights)[:12]}"
    produced = crosscoder_tables(folder, pair, DiffingPlan.of(diffing, device), sae_id, chat_acts.model)
    step = f"diff crosscoder at {base_acts.hook}"
    return RowsRecord(step=step, rows=_append(results_dir, step, produced))


@task(name="causal-check", task_run_name=run_name("causal-check", "hook"), **_CODE)
def causal_check(saes: list[SAERecord], chat: str, hook: str, diff: DiffRecord, made: Rollouts, loading: ModelLoading,
                 results_dir: str) -> RowsRecord:
    """Ablate the latents the SAE diffing chose (`diff.chosen`: latents that fire on chat and are
    silent on base) on the chat rollouts `made`, and a random set of the same size: KL to the
    clean chat model per segment."""
    paths = [s.path for s in saes if s.role == "base"] + [s.path for s in saes if s.role == "chat"]
    produced = causal_tables(paths, chat, hook, made, diff.chosen, loading)
    step = f"causal check at {hook}"
    return RowsRecord(step=step, rows=_append(results_dir, step, produced))


@task(name="checkpoint-drift", **_CODE)
def checkpoint_drift(base_sae: SAERecord, acts: ActsRecord, finetune: FinetuneSection, tokens: int, seed: int,
                     device: str | None, out_dir: str, results_dir: str, step: int) -> RowsRecord:
    """Briefly fine-tune the study's base SAE on one checkpoint's activations (the study's recipe,
    `tokens` tokens) and record each latent's drift from it."""
    with staged_output(out_dir, RunLayout.MANIFEST_FILE, exclude=(RunLayout.CHECKPOINTS_DIR,)) as out:
        result = finetune_on_dataset(local_copy(base_sae.path), local_dataset(acts.path), out.local, total_tokens=tokens,
                                     batch_size=finetune.batch_size, seed=seed, device=device)
    child, parent = load_saes([str(result.sae_dir), base_sae.path], acts.hook)
    table = drift_table(child, parent, checkpoint=acts.model, step=step)
    name = f"checkpoint drift at step {step}"
    return RowsRecord(step=name, rows=_append(results_dir, name, {"latent_drift": [table]}))
