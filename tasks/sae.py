"""Tasks: train an SAE on cached activations, or every SAE of a model (all hooks, every variant
of a sweep) from one live stream; fine-tune existing SAEs on another model's activations (cached,
or live from one stream). Run folders on an object store are staged in this host's mirror and
published with run.json last."""

from __future__ import annotations

from contextlib import ExitStack

from prefect import get_run_logger, task

from sae_transfer.corpus import CorpusConfig
from sae_transfer.models import check_device, load_model
from sae_transfer.storage.activations import local_dataset
from sae_transfer.storage.layout import RunLayout
from sae_transfer.storage.mirror import StagedOutput, local_copy, staged_output
from sae_transfer.study import CorpusSection, FinetuneSection, ModelLoading, SAESection
from sae_transfer.tasks._cache import cached, run_name
from sae_transfer.tasks.records import ActsRecord, SAERecord
from sae_transfer.training.api import (
    LiveRun,
    finetune_on_dataset,
    finetune_run,
    sae_train_config,
    train_live_group,
    train_on_dataset,
)

# What a trained SAE depends on: flows also put its hash into the run folder's name, so a
# trainer fix trains a new SAE instead of finding the old run complete.
TRAINING_CODE = ("sae_transfer.sae", "sae_transfer.training", "sae_transfer.storage.sae_format",
                 "sae_transfer.storage.checkpoints", "sae_transfer.storage.activations_read")
_CODE = cached(*TRAINING_CODE)


def _record(result, out: StagedOutput, model: str, hook: str, role: str, parent: str | None = None,
            variant: str | None = None) -> SAERecord:
    return SAERecord(
        path=out.remote_of(result.sae_dir), run_dir=out.remote_of(RunLayout.holding(result.sae_dir).root), model=model,
        hook=hook, role=role, finetuned_from=parent, tokens=int(result.metrics.get("tokens", 0)), final_metrics=result.metrics,
        variant=variant,
    )


def _run_folder(out_dir: str):
    """The run folder, staged in this host's mirror when `out_dir` is on an object store."""
    return staged_output(out_dir, RunLayout.MANIFEST_FILE, exclude=(RunLayout.CHECKPOINTS_DIR,))


def _live_inputs(model: str, corpus: CorpusSection, loading: ModelLoading):
    """(the loaded model, the corpus) a live source reads."""
    m = load_model(model, device=check_device(loading.device), dtype=loading.dtype, trust_remote_code=loading.trust_remote_code)
    return m, CorpusConfig(source=corpus.source, text_column=corpus.text_column, seed=corpus.seed)


@task(name="train-sae", task_run_name=run_name("train-sae", "role", "acts.hook", "variant"), **_CODE)
def train_sae(acts: ActsRecord, sae: SAESection, role: str, out_dir: str, seed: int = 0, device: str | None = None,
              variant: str | None = None) -> SAERecord:
    """Train an SAE of the study's architecture on one activation dataset (resumes if interrupted)
    on `device` (the study's; None: CUDA when available, else CPU). `variant` labels one SAE of a sweep."""
    with _run_folder(out_dir) as out:
        result = train_on_dataset(local_dataset(acts.path), out.local, sae_train_config(sae, seed, device),
                                  expansion=sae.expansion, variant=variant)
    get_run_logger().info("%s SAE %s: %s", role, "reused" if result.skipped else "trained", result.metrics)
    return _record(result, out, acts.model, acts.hook, role, variant=variant)


@task(name="finetune-sae", task_run_name=run_name("finetune-sae", "acts.hook", "parent.variant"), **_CODE)
def finetune_sae(parent: SAERecord, acts: ActsRecord, finetune: FinetuneSection, out_dir: str, seed: int = 0,
                 device: str | None = None) -> SAERecord:
    """Fine-tune `parent` on `acts` with the study's recipe (same LR, 5% warm-up, 20% decay) on
    `device` (None: CUDA when available, else CPU)."""
    with _run_folder(out_dir) as out:
        result = finetune_on_dataset(local_copy(parent.path), local_dataset(acts.path), out.local, total_tokens=finetune.tokens,
                                     batch_size=finetune.batch_size, seed=seed, device=device, variant=parent.variant)
    get_run_logger().info("fine-tuned SAE %s: %s", "reused" if result.skipped else "trained", result.metrics)
    return _record(result, out, acts.model, acts.hook, "finetuned", parent=parent.path, variant=parent.variant)


@task(name="train-saes-live", task_run_name=run_name("train-saes-live", "role"), **_CODE)
def train_saes_live(model: str, corpus: CorpusSection, loading: ModelLoading, runs: list[dict], role: str,
                    buffer_tokens: int, seed: int = 0) -> list[SAERecord]:
    """Train every SAE of `runs` ({hook, variant, sae: SAESection, out_dir}: every hook of the study,
    every setting of its sweep) from one live stream of `model`: one forward pass per batch for all
    of them (training/group.py). Each resumes on its own; each record in the order of `runs`."""
    m, text = _live_inputs(model, corpus, loading)
    with ExitStack() as stack:
        outs = [stack.enter_context(_run_folder(r["out_dir"])) for r in runs]
        planned = [LiveRun(r["hook"], sae_train_config(r["sae"], seed, loading.device), out.local,
                           expansion=r["sae"].expansion, variant=r["variant"]) for r, out in zip(runs, outs)]
        results = train_live_group(m, text, planned, context_size=corpus.context_size, buffer_tokens=buffer_tokens,
                                   prepend_bos=corpus.prepend_bos, model_dtype=loading.dtype)
    done = sum(not r.skipped for r in results)
    get_run_logger().info("%s SAEs (live, one stream): %d trained, %d reused", role, done, len(results) - done)
    return [_record(res, out, model, r["hook"], role, variant=r["variant"]) for r, res, out in zip(runs, results, outs)]


@task(name="finetune-saes-live", task_run_name=run_name("finetune-saes-live", "model"), **_CODE)
def finetune_saes_live(parents: list[SAERecord], model: str, corpus: CorpusSection, loading: ModelLoading,
                       finetune: FinetuneSection, buffer_tokens: int, out_dirs: list[str], seed: int = 0) -> list[SAERecord]:
    """Fine-tune every SAE of `parents` (into `out_dirs`, in order) on one live stream of `model`
    with the study's recipe: one forward pass per batch for all of them."""
    m, text = _live_inputs(model, corpus, loading)
    with ExitStack() as stack:
        outs = [stack.enter_context(_run_folder(d)) for d in out_dirs]
        planned = [finetune_run(local_copy(p.path), p.hook, out.local, variant=p.variant, total_tokens=finetune.tokens,
                                batch_size=finetune.batch_size, seed=seed, device=loading.device)
                   for p, out in zip(parents, outs, strict=True)]
        results = train_live_group(m, text, planned, context_size=corpus.context_size, buffer_tokens=buffer_tokens,
                                   prepend_bos=corpus.prepend_bos, model_dtype=loading.dtype)
    get_run_logger().info("fine-tuned %d SAEs (live, one stream)", len(results))
    return [_record(res, out, model, p.hook, "finetuned", parent=p.path, variant=p.variant)
            for p, res, out in zip(parents, results, outs)]
