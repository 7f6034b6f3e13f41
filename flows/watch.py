"""watch_checkpoints: evaluate each new fine-tuning checkpoint exactly once."""

from __future__ import annotations

from pathlib import Path

from prefect import flow, get_run_logger

from sae_transfer.checkpoints import Checkpoint, scan_folder, scan_hub
from sae_transfer.study import StudyConfig
from storage import tables
from storage.fingerprint import fingerprint


def _checkpoint_id(ckpt: Checkpoint) -> str:
    return fingerprint(ckpt.path) if Path(ckpt.path).exists() else f"{ckpt.path}:{ckpt.revision}"


def seen_ids(config: StudyConfig) -> set[str]:
    """Checkpoint ids already started or evaluated for this study."""
    return set(tables.read_table(config.results_dir, "checkpoints").column("checkpoint_id").to_pylist())


@flow(name="watch_checkpoints", log_prints=True)
def watch_checkpoints(config: StudyConfig, via_deployment: bool = False,
                      deployment: str = "evaluate_checkpoint/demo-checkpoint", build: bool = True) -> dict:
    """Scan the checkpoint folder (and Hub repo, if configured); start one evaluation per new one.

    `via_deployment`: start each evaluation as a run of `deployment`, keyed by an idempotency
    key of (study, checkpoint content) so a checkpoint is never evaluated twice even when two
    watchers race; otherwise evaluate inline as subflows.
    """
    from flows.checkpoints import evaluate_checkpoint

    log = get_run_logger()
    found = scan_folder(config.pair.checkpoints) if config.pair.checkpoints else []
    if config.pair.checkpoints_repo:
        found += scan_hub(config.pair.checkpoints_repo)
    seen, started = seen_ids(config), []
    for ckpt in found:
        ckpt_id = _checkpoint_id(ckpt)
        if ckpt_id in seen:
            continue
        tables.append_rows(config.results_dir, "checkpoints", [dict(
            checkpoint_id=ckpt_id, path=ckpt.path, step=ckpt.step, status="seen", flow_run_id=None)])
        if via_deployment:
            from prefect.deployments import run_deployment

            run = run_deployment(deployment, parameters={"config": config.model_dump(), "checkpoint": ckpt.path, "step": ckpt.step},
                                 idempotency_key=f"{config.fingerprint()}-{ckpt_id}", timeout=0)
            log.info("started %s for %s (run %s)", deployment, ckpt.path, run.id)
        else:
            evaluate_checkpoint(config, ckpt.path, ckpt.step)
        started.append(ckpt.path)
    if build and started and not via_deployment:
        from tasks.report import build_report

        build_report(config)
    log.info("%d checkpoints found, %d new", len(found), len(started))
    return {"found": len(found), "evaluated": started}
