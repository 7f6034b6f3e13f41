"""evaluate_checkpoint: the study's existing SAEs on one new model checkpoint."""

from __future__ import annotations

import json
from pathlib import Path

from prefect import flow
from prefect.futures import wait

from sae_transfer.flows._runs import share_cpu_threads
from sae_transfer.errors import UserError
from sae_transfer.models import is_local
from sae_transfer.study import StudyConfig
from sae_transfer.storage.fingerprint import hash_payload
from sae_transfer.storage.layout import StudyLayout, slug
from sae_transfer.tasks._cache import code_version
from sae_transfer.tasks.activations import cache_activations
from sae_transfer.tasks.checkpoints import publish_drift, record_checkpoint
from sae_transfer.tasks.diffing import checkpoint_drift
from sae_transfer.tasks.sae import TRAINING_CODE
from sae_transfer.tasks.evaluate import evaluate_transfer


def study_state(config: StudyConfig) -> dict:
    """The study's state file: `saes` (hook -> SAE folders: base, chat, fine-tuned) and
    `thresholds` (hook -> the pair's outlier threshold, which checkpoints are evaluated with too)."""
    state = StudyLayout(config.results_dir).study_state
    if not state.is_file():
        raise UserError(f"{state} not found: run the study first (sae-transfer run CONFIG) so there are SAEs to evaluate")
    return json.loads(state.read_text())


def _checkpoint_drift(config: StudyConfig, checkpoint: str, step: int, saes: dict[str, list[str]]) -> list:
    """Cache the checkpoint's activations and briefly fine-tune the base SAE on them, per hook."""
    layout = StudyLayout(config.results_dir)
    corpus = config.corpus.model_copy(update={"train_tokens": config.diffing.checkpoint_finetune_tokens})
    acts = cache_activations(checkpoint, list(saes), corpus, str(layout.activations), act_dtype=config.act_dtype,
                             model_dtype=config.dtype, device=config.device, trust_remote_code=config.pair.trust_remote_code)
    out = []
    for a in acts:
        key = hash_payload(code_version(*TRAINING_CODE), a.path, saes[a.hook][0], config.finetune.model_dump(),
                           config.diffing.checkpoint_finetune_tokens, config.seed)
        run_dir = str(layout.sae_run(f"checkpoint-ft-{slug(a.hook)}-{key}"))
        out.append(checkpoint_drift.submit(saes[a.hook][0], a, config, run_dir, step))
    return out


@flow(name="evaluate_checkpoint", log_prints=True)
def evaluate_checkpoint(config: StudyConfig, checkpoint: str, step: int = -1) -> dict:
    """Evaluate every study SAE on `checkpoint` (a local HF folder, or a Hub `repo@revision`)
    at every hook; publish the drift table so far as an artifact."""
    if is_local(checkpoint) and not (Path(checkpoint).expanduser() / "config.json").is_file():
        raise UserError(f"checkpoint {checkpoint!r} is not a Hugging Face checkpoint folder (no config.json): "
                        "pass a folder saved with save_pretrained, or a Hub repo@revision")
    share_cpu_threads(config)
    label = f"step-{step}" if step >= 0 else None
    state = study_state(config)
    thresholds = state.get("thresholds", {})
    futures = [evaluate_transfer.submit(paths, checkpoint, config, hook, revision_label=label, threshold=thresholds.get(hook))
               for hook, paths in state["saes"].items()]
    if config.diffing.enabled and config.diffing.checkpoint_finetune_tokens:
        futures += _checkpoint_drift(config, checkpoint, step, state["saes"])
    wait(futures)
    rows = sum(f.result().rows.get("metrics", 0) for f in futures)
    ckpt_id = record_checkpoint(config, checkpoint, step, "evaluated")
    publish_drift(config, step)
    return {"checkpoint": checkpoint, "checkpoint_id": ckpt_id, "step": step, "metrics_rows": rows}
