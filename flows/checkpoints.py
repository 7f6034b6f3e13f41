"""evaluate_checkpoint: the study's existing SAEs on one new model checkpoint."""

from __future__ import annotations

import json
from pathlib import Path

from prefect import flow
from prefect.futures import wait

from flows._runs import share_cpu_threads

from sae_transfer.errors import UserError
from sae_transfer.study import StudyConfig
from storage import tables
from storage.fingerprint import fingerprint
from storage.layout import StudyLayout
from tasks.evaluate import evaluate_transfer


def study_saes(config: StudyConfig) -> dict[str, list[str]]:
    """Hook -> SAE folders the study trained (base, chat, fine-tuned), from its state file."""
    state = StudyLayout(config.results_dir).study_state
    if not state.is_file():
        raise UserError(f"{state} not found: run the study first (sae-transfer run CONFIG) so there are SAEs to evaluate")
    return json.loads(state.read_text())["saes"]


@flow(name="evaluate_checkpoint", log_prints=True)
def evaluate_checkpoint(config: StudyConfig, checkpoint: str, step: int = -1) -> dict:
    """Evaluate every study SAE on `checkpoint` (a local HF folder or Hub id) at every hook."""
    if not Path(checkpoint).exists() and not config.pair.checkpoints_repo:
        raise UserError(f"checkpoint {checkpoint!r} does not exist: pass a Hugging Face checkpoint folder")
    share_cpu_threads(config)
    label = f"step-{step}" if step >= 0 else None
    futures = [evaluate_transfer.submit(paths, checkpoint, config, hook, revision_label=label)
               for hook, paths in study_saes(config).items()]
    wait(futures)
    rows = sum(f.result().rows.get("metrics", 0) for f in futures)
    checkpoint_id = fingerprint(checkpoint) if Path(checkpoint).exists() else checkpoint
    tables.append_rows(config.results_dir, "checkpoints", [dict(
        checkpoint_id=checkpoint_id, path=checkpoint, step=step, status="evaluated", flow_run_id=None)])
    return {"checkpoint": checkpoint, "step": step, "metrics_rows": rows}
