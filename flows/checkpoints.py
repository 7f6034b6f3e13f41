"""evaluate_checkpoint: the study's SAEs on one new model checkpoint."""

from __future__ import annotations

from pathlib import Path

from prefect import flow
from prefect.futures import PrefectFuture, wait

from sae_transfer.errors import UserError
from sae_transfer.flows._runs import worker_pool
from sae_transfer.flows.saes import run_dir, submit_saes
from sae_transfer.models import is_local
from sae_transfer.storage.layout import StudyLayout
from sae_transfer.study import StudyConfig
from sae_transfer.tasks.activations import cache_activations
from sae_transfer.tasks.checkpoints import publish_drift, record_checkpoint
from sae_transfer.tasks.diffing import checkpoint_drift
from sae_transfer.tasks.evaluate import evaluate_transfer
from sae_transfer.tasks.models import prepare_pair
from sae_transfer.tasks.records import SAERecord


def study_saes(config: StudyConfig) -> tuple[dict[str, list[SAERecord]], dict[str, dict]]:
    """(hook -> SAE records, hook -> the pair's threshold) of the study: its own tasks, served
    from Prefect's cache when the study has run (trained here when it has not)."""
    study = submit_saes(config, prepare_pair(config.pair))
    saes = {hook: [_resolved(s) for s in study.of(hook)] for hook in config.hooks}
    return saes, {hook: fut.result() for hook, fut in study.thresholds.items()}


def _checkpoint_drift(config: StudyConfig, checkpoint: str, step: int, saes: dict[str, list]) -> list:
    """Cache the checkpoint's activations and briefly fine-tune the base SAE on them, per hook
    (waits for the checkpoint's cache and the base SAEs: call after everything else is submitted)."""
    layout, tokens = StudyLayout(config.results_dir), config.diffing.checkpoint_finetune_tokens
    corpus = config.corpus.model_copy(update={"train_tokens": tokens})
    acts = cache_activations.submit(checkpoint, list(saes), corpus, config.loading, config.act_dtype,
                                    str(layout.activations)).result()
    out = []
    for a in acts:
        base = _resolved(saes[a.hook][0])
        out_dir = run_dir(layout, "checkpoint-ft", a.hook, a.path, base.path, config.finetune.model_dump(), tokens,
                          config.seed)
        out.append(checkpoint_drift.submit(base, a, config.finetune, tokens, config.seed, config.device, out_dir,
                                           str(config.results_dir), step))
    return out


def check_checkpoint(checkpoint: str) -> None:
    """UserError unless `checkpoint` is a Hub id or a Hugging Face checkpoint folder."""
    if is_local(checkpoint) and not (Path(checkpoint).expanduser() / "config.json").is_file():
        raise UserError(f"checkpoint {checkpoint!r} is not a Hugging Face checkpoint folder (no config.json): "
                        "pass a folder saved with save_pretrained, or a Hub repo@revision")


def _resolved(value):
    """A record, or the result of a future of one."""
    return value.result() if isinstance(value, PrefectFuture) else value


def submit_checkpoint(config: StudyConfig, checkpoint: str, step: int, saes: dict[str, list],
                      thresholds: dict[str, object]) -> list[PrefectFuture]:
    """Submit the evaluation of every study SAE on `checkpoint` at every hook (and, when
    configured, the brief fine-tune that measures latent drift) in the calling flow. `saes`:
    hook -> SAE records or futures (base first); `thresholds`: hook -> threshold or its future."""
    check_checkpoint(checkpoint)
    label = f"step-{step}" if step >= 0 else None
    futures = [evaluate_transfer.submit(records, checkpoint, hook, config.eval_settings, str(config.results_dir),
                                        threshold=thresholds.get(hook), revision_label=label)
               for hook, records in saes.items()]
    if config.diffing.enabled and config.diffing.checkpoint_finetune_tokens:
        futures += _checkpoint_drift(config, checkpoint, step, saes)
    return futures


def finish_checkpoint(config: StudyConfig, checkpoint: str, step: int, futures: list[PrefectFuture]) -> dict:
    """Wait for one checkpoint's evaluation, record it as evaluated and publish the drift so far."""
    wait(futures)
    rows = sum(f.result().rows.get("metrics", 0) for f in futures)
    ckpt_id = record_checkpoint(config, checkpoint, step, "evaluated")
    publish_drift(config, step)
    return {"checkpoint": checkpoint, "checkpoint_id": ckpt_id, "step": step, "metrics_rows": rows}


@flow(name="evaluate_checkpoint", log_prints=True, task_runner=worker_pool())
def evaluate_checkpoint(config: StudyConfig, checkpoint: str, step: int = -1,
                        saes: dict[str, list[SAERecord]] | None = None, thresholds: dict[str, dict] | None = None) -> dict:
    """Evaluate every study SAE on `checkpoint` (a local HF folder, or a Hub `repo@revision`)
    at every hook; publish the drift table so far as an artifact. `saes` and `thresholds` are
    the study's (hook -> records, hook -> threshold); when not given, the study's own tasks
    provide them (cache hits once the study has run)."""
    check_checkpoint(checkpoint)
    if saes is None or thresholds is None:
        saes, thresholds = study_saes(config)
    return finish_checkpoint(config, checkpoint, step, submit_checkpoint(config, checkpoint, step, saes, thresholds))
