"""Tasks: feature-level diffing (what changed inside): per-latent stats, matching and drift of the
study's SAEs, a BatchTopK crosscoder with its latent taxonomy and Latent Scaling, max-activating
examples, and the causal check. The maths is in `sae_transfer.diffing`; each task appends its
tables to the study's results and returns a small record."""

from __future__ import annotations

from prefect import get_run_logger, task

from sae_transfer.study import StudyConfig
from sae_transfer.storage import tables
from sae_transfer.tasks._cache import cached
from sae_transfer.tasks.records import ActsRecord, RowsRecord, SAERecord

_CODE = cached("sae_transfer.diffing", "sae_transfer.sae", "sae_transfer.training", "sae_transfer.evals",
               "sae_transfer.storage.diffing_tables", "sae_transfer.storage.crosscoder_format", "sae_transfer.storage.activations_scan", "sae_transfer.storage.tables")


def _plan(config: StudyConfig):
    from sae_transfer.diffing.stage import DiffingPlan

    d = config.diffing
    return DiffingPlan(stats_tokens=d.stats_tokens, examples_k=d.examples_k, top_latents=d.top_latents, device=config.device)


def _append(results_dir: str, step: str, produced: dict) -> RowsRecord:
    counts = {}
    for name, parts in produced.items():
        for part in parts:
            tables.append_rows(results_dir, name, part)
        counts[name] = sum(p.num_rows for p in parts)
    get_run_logger().info("%s: appended %s", step, counts)
    return RowsRecord(step=step, rows=counts)


@task(name="diff-saes", **_CODE)
def diff_saes(saes: list[SAERecord], base_acts: ActsRecord, chat_acts: ActsRecord, config: StudyConfig) -> RowsRecord:
    """Per-latent stats of every SAE on both models, examples, base-vs-chat and parent-vs-child
    matching, drift of the fine-tuned SAE, Latent Scaling of the base SAE on chat."""
    from sae_transfer.diffing.stage import sae_tables
    from sae_transfer.evals.loading import load_saes

    loaded = dict(zip([s.role for s in saes], load_saes([s.path for s in saes], base_acts.hook)))
    produced = sae_tables(loaded, {"base": base_acts.path, "chat": chat_acts.path}, _plan(config),
                          {"base": base_acts.model, "chat": chat_acts.model})
    return _append(str(config.results_dir), f"diff SAEs at {base_acts.hook}", produced)


@task(name="train-crosscoder", **cached("sae_transfer.diffing", "sae_transfer.sae", "sae_transfer.training",
                                        "sae_transfer.storage.crosscoder_format", "sae_transfer.storage.checkpoints", "sae_transfer.storage.activations_read"))
def train_crosscoder(base_acts: ActsRecord, chat_acts: ActsRecord, config: StudyConfig, out_dir: str) -> SAERecord:
    """A BatchTopK crosscoder on the paired base/chat caches (resumes if interrupted)."""
    from sae_transfer.diffing.crosscoder_run import CrosscoderConfig, train_crosscoder as train
    from sae_transfer.diffing.paired import open_pair
    from sae_transfer.training.config import TrainConfig

    d, pair = config.diffing, open_pair(base_acts.path, chat_acts.path)
    cfg = CrosscoderConfig(train=TrainConfig(
        arch="batchtopk", d_sae=d.crosscoder_expansion * pair.d_model, k=d.crosscoder_k, lr=d.crosscoder_lr,
        total_tokens=d.crosscoder_tokens, batch_size=config.sae.batch_size, seed=config.seed, device=config.device))
    result = train(cfg, pair, out_dir)
    get_run_logger().info("crosscoder %s: %s", "reused" if result.skipped else "trained", result.metrics)
    return SAERecord(path=str(result.crosscoder_dir), run_dir=out_dir, model=f"{base_acts.model} + {chat_acts.model}",
                     hook=base_acts.hook, role="crosscoder", tokens=int(result.metrics.get("tokens", 0) or 0),
                     final_metrics=result.metrics)


@task(name="diff-crosscoder", **_CODE)
def diff_crosscoder(crosscoder: SAERecord, base_acts: ActsRecord, chat_acts: ActsRecord, config: StudyConfig) -> RowsRecord:
    """The crosscoder's latent taxonomy, Latent Scaling of its chat-only latents, and its
    max-activating contexts on the paired tokens."""
    from sae_transfer.diffing.paired import open_pair
    from sae_transfer.diffing.stage import crosscoder_tables
    from sae_transfer.storage.fingerprint import sha256_file
    from pathlib import Path

    pair = open_pair(base_acts.path, chat_acts.path, verify_tokens=False)
    weights = next(Path(crosscoder.path).glob("*.safetensors"))
    sae_id = f"crosscoder-{Path(crosscoder.run_dir).name}:{sha256_file(weights)[:12]}"
    produced = crosscoder_tables(crosscoder.path, pair, _plan(config), sae_id, chat_acts.model)
    return _append(str(config.results_dir), f"diff crosscoder at {base_acts.hook}", produced)


@task(name="causal-check", **_CODE)
def causal_check(saes: list[SAERecord], chat: str, config: StudyConfig, hook: str, upstream: list[RowsRecord]) -> RowsRecord:
    """Ablate the study SAEs' latents that appear on chat (fire on chat, silent on base) on chat
    transcripts, and a random set of the same size: KL to the clean chat model per segment."""
    from sae_transfer.diffing.stage import causal_tables

    paths = [s.path for s in saes if s.role == "base"] + [s.path for s in saes if s.role == "chat"]
    produced = causal_tables(paths, chat, hook, config.instructions, _plan(config), str(config.results_dir),
                             dtype=config.dtype)
    return _append(str(config.results_dir), f"causal check at {hook}", produced)


@task(name="checkpoint-drift", **_CODE)
def checkpoint_drift(base_sae: str, acts: ActsRecord, config: StudyConfig, out_dir: str, step: int) -> RowsRecord:
    """Briefly fine-tune the study's base SAE on one checkpoint's activations (the study's recipe,
    `diffing.checkpoint_finetune_tokens` tokens) and record each latent's drift from it."""
    from sae_transfer.diffing.api import drift_table
    from sae_transfer.evals.loading import load_saes
    from sae_transfer.training.api import finetune_on_dataset

    ft = config.finetune
    result = finetune_on_dataset(base_sae, acts.path, out_dir, tokens=config.diffing.checkpoint_finetune_tokens,
                                 batch_size=ft.batch_size, seed=config.seed, device=config.device)
    child, parent = load_saes([str(result.sae_dir), base_sae], acts.hook)
    table = drift_table(child, parent, checkpoint=acts.model, step=step)
    return _append(str(config.results_dir), f"checkpoint drift at step {step}", {"latent_drift": [table]})
