"""watch_checkpoints: evaluate each new fine-tuning checkpoint exactly once."""

from __future__ import annotations

from collections import deque

from prefect import flow, get_run_logger

from sae_transfer.checkpoints import Checkpoint, checkpoint_id, scan_folder, scan_hub
from sae_transfer.flows._runs import worker_pool
from sae_transfer.flows.checkpoints import finish_checkpoint, study_saes, submit_checkpoint
from sae_transfer.study import StudyConfig
from sae_transfer.tasks.checkpoints import publish_watch, record_checkpoint, seen_ids
from sae_transfer.tasks.records import SAERecord
from sae_transfer.tasks.report import build_report


def new_checkpoints(config: StudyConfig) -> tuple[list[Checkpoint], list[Checkpoint]]:
    """(every checkpoint found, the ones never seen before): scans the checkpoint folder and Hub
    repo (if configured) and records each new one as "seen", so no later watch starts it again."""
    found = scan_folder(config.pair.checkpoints) if config.pair.checkpoints else []
    if config.pair.checkpoints_repo:
        found += scan_hub(config.pair.checkpoints_repo)
    seen, new = seen_ids(config), []
    for ckpt in found:
        ckpt_id = checkpoint_id(ckpt.path)
        if ckpt_id in seen:
            continue
        seen.add(ckpt_id)  # a branch and a tag on one commit are one checkpoint
        record_checkpoint(config, ckpt.path, ckpt.step, "seen")
        new.append(ckpt)
    return found, new


def evaluate_new(config: StudyConfig, new: list[Checkpoint], saes: dict[str, list], thresholds: dict) -> list[dict]:
    """Evaluate the `new` checkpoints in the calling flow, `runner.max_checkpoints` of them in
    flight at once (each fanned out over hooks on the flow's task runner), oldest finished first;
    returns what `finish_checkpoint` says of each."""
    pending: deque = deque()
    done = []
    for ckpt in new:
        if len(pending) >= config.runner.max_checkpoints:
            oldest, futures = pending.popleft()
            done.append(finish_checkpoint(config, oldest.path, oldest.step, futures))
        pending.append((ckpt, submit_checkpoint(config, ckpt.path, ckpt.step, saes, thresholds)))
    while pending:
        oldest, futures = pending.popleft()
        done.append(finish_checkpoint(config, oldest.path, oldest.step, futures))
    return done


@flow(name="watch_checkpoints", log_prints=True, task_runner=worker_pool())
def watch_checkpoints(config: StudyConfig, via_deployment: bool = False,
                      deployment: str = "evaluate_checkpoint/demo-checkpoint", build: bool = True,
                      saes: dict[str, list[SAERecord]] | None = None, thresholds: dict[str, dict] | None = None) -> dict:
    """Scan for checkpoints; evaluate each new one once.

    `via_deployment`: start each evaluation as a run of `deployment`, keyed by an idempotency
    key of (study, checkpoint id) so a checkpoint is never evaluated twice even when two
    watchers race; otherwise evaluate them here (`evaluate_new`: several at once, at most
    `runner.max_checkpoints`), with the study's `saes` and `thresholds` when the caller has them
    (else the study's own tasks, cache hits once it has run). A markdown artifact says what was new.
    """
    log = get_run_logger()
    found, new = new_checkpoints(config)
    if via_deployment:
        from prefect.deployments import run_deployment

        for ckpt in new:
            run = run_deployment(deployment,
                                 parameters={"config": config.model_dump(), "checkpoint": ckpt.path, "step": ckpt.step},
                                 idempotency_key=f"{config.fingerprint()}-{checkpoint_id(ckpt.path)}", timeout=0)
            log.info("started %s for %s (run %s)", deployment, ckpt.path, run.id)
    elif new:
        if saes is None or thresholds is None:
            saes, thresholds = study_saes(config)
        evaluate_new(config, new, saes, thresholds)
    if build and new and not via_deployment:
        build_report(config)
    log.info(publish_watch(config, found, new, "via deployment" if via_deployment else "inline"))
    return {"found": len(found), "evaluated": [c.path for c in new]}
