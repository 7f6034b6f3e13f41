"""Tasks: train an SAE on cached or live activations; fine-tune an existing SAE on another
model's (cached or live)."""

from __future__ import annotations

from prefect import get_run_logger, task

from sae_transfer.corpus import CorpusConfig
from sae_transfer.models import check_device, load_model
from sae_transfer.storage.activations import local_dataset
from sae_transfer.storage.layout import RunLayout
from sae_transfer.storage.mirror import StagedOutput, local_copy, staged_output
from sae_transfer.study import CorpusSection, FinetuneSection, ModelLoading, SAESection
from sae_transfer.tasks._cache import cached, run_name
from sae_transfer.tasks.records import ActsRecord, SAERecord
from sae_transfer.training.api import finetune_live, finetune_on_dataset, sae_train_config, train_live, train_on_dataset

# What a trained SAE depends on: flows also put its hash into the run folder's name, so a
# trainer fix trains a new SAE instead of finding the old run complete.
TRAINING_CODE = ("sae_transfer.sae", "sae_transfer.training", "sae_transfer.storage.sae_format",
                 "sae_transfer.storage.checkpoints", "sae_transfer.storage.activations_read")
_CODE = cached(*TRAINING_CODE)


def _record(result, out: StagedOutput, model: str, hook: str, role: str, parent: str | None = None) -> SAERecord:
    return SAERecord(
        path=out.remote_of(result.sae_dir), run_dir=out.remote_of(RunLayout.holding(result.sae_dir).root), model=model,
        hook=hook, role=role, finetuned_from=parent, tokens=int(result.metrics.get("tokens", 0)), final_metrics=result.metrics,
    )


def _run_folder(out_dir: str):
    """The run folder, staged in this host's mirror when `out_dir` is on an object store."""
    return staged_output(out_dir, RunLayout.MANIFEST_FILE, exclude=(RunLayout.CHECKPOINTS_DIR,))


def _live_inputs(model: str, corpus: CorpusSection, loading: ModelLoading):
    """(the loaded model, the corpus) a live source reads."""
    m = load_model(model, device=check_device(loading.device), dtype=loading.dtype, trust_remote_code=loading.trust_remote_code)
    return m, CorpusConfig(source=corpus.source, text_column=corpus.text_column, seed=corpus.seed)


@task(name="train-sae", task_run_name=run_name("train-sae", "role", "acts.hook"), **_CODE)
def train_sae(acts: ActsRecord, sae: SAESection, role: str, out_dir: str, seed: int = 0, device: str | None = None) -> SAERecord:
    """Train an SAE of the study's architecture on one activation dataset (resumes if interrupted)
    on `device` (the study's; None: CUDA when available, else CPU)."""
    with _run_folder(out_dir) as out:
        result = train_on_dataset(local_dataset(acts.path), out.local, sae_train_config(sae, seed, device),
                                  expansion=sae.expansion)
    get_run_logger().info("%s SAE %s: %s", role, "reused" if result.skipped else "trained", result.metrics)
    return _record(result, out, acts.model, acts.hook, role)


@task(name="train-sae", task_run_name=run_name("train-sae", "role", "hook"), **_CODE)
def train_sae_live(model: str, hook: str, corpus: CorpusSection, loading: ModelLoading, sae: SAESection, role: str,
                   out_dir: str, seed: int = 0) -> SAERecord:
    """Train an SAE of the study's architecture on live activations of `model` at `hook` (a shuffle
    buffer over forward passes of the corpus's train split, nothing on disk; resumes if interrupted)."""
    m, text = _live_inputs(model, corpus, loading)
    with _run_folder(out_dir) as out:
        result = train_live(m, hook, text, out.local, sae_train_config(sae, seed, loading.device), expansion=sae.expansion,
                            context_size=corpus.context_size, buffer_tokens=sae.buffer_tokens,
                            prepend_bos=corpus.prepend_bos, model_dtype=loading.dtype)
    get_run_logger().info("%s SAE (live) %s: %s", role, "reused" if result.skipped else "trained", result.metrics)
    return _record(result, out, model, hook, role)


@task(name="finetune-sae", task_run_name=run_name("finetune-sae", "acts.hook"), **_CODE)
def finetune_sae(parent: SAERecord, acts: ActsRecord, finetune: FinetuneSection, out_dir: str, seed: int = 0,
                 device: str | None = None) -> SAERecord:
    """Fine-tune `parent` on `acts` with the study's recipe (same LR, 5% warm-up, 20% decay) on
    `device` (None: CUDA when available, else CPU)."""
    with _run_folder(out_dir) as out:
        result = finetune_on_dataset(local_copy(parent.path), local_dataset(acts.path), out.local, total_tokens=finetune.tokens,
                                     batch_size=finetune.batch_size, seed=seed, device=device)
    get_run_logger().info("fine-tuned SAE %s: %s", "reused" if result.skipped else "trained", result.metrics)
    return _record(result, out, acts.model, acts.hook, "finetuned", parent=parent.path)


@task(name="finetune-sae", task_run_name=run_name("finetune-sae", "hook"), **_CODE)
def finetune_sae_live(parent: SAERecord, model: str, hook: str, corpus: CorpusSection, loading: ModelLoading,
                      finetune: FinetuneSection, buffer_tokens: int, out_dir: str, seed: int = 0) -> SAERecord:
    """Fine-tune `parent` on live activations of `model` at `hook` with the study's recipe."""
    m, text = _live_inputs(model, corpus, loading)
    with _run_folder(out_dir) as out:
        result = finetune_live(local_copy(parent.path), m, hook, text, out.local, context_size=corpus.context_size,
                               buffer_tokens=buffer_tokens, prepend_bos=corpus.prepend_bos, model_dtype=loading.dtype,
                               total_tokens=finetune.tokens, batch_size=finetune.batch_size, seed=seed, device=loading.device)
    get_run_logger().info("fine-tuned SAE (live) %s: %s", "reused" if result.skipped else "trained", result.metrics)
    return _record(result, out, model, hook, "finetuned", parent=parent.path)
